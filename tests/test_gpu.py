"""The gpu tier (``pytest -m gpu``): the CUDA paths every real study takes.

Every test here runs on the CUDA device when one is visible and is skipped otherwise, at
collection, so the CPU suite pays nothing. ``MMCL_GPU_TIER_DEVICE=cpu`` runs the same steps
on the CPU (``benchmarks/gpu_check.sh --dry-run``): the tier itself is tested where no GPU
is lent. ``MMCL_GPU_TIER_METHODS=a,b`` narrows the per-method tests (the dry run in the CPU
suite takes one method per track); unset, every registered method runs.

- every method trains two tiny tasks under bf16 autocast and under fp16 with loss scaling:
  every loss finite, frozen weights bit-identical, a state round trip predicts identically;
- evaluation on the device equals evaluation on the CPU for the same weights;
- DataLoader workers with pinned memory give the run that no workers give;
- Tune trials with ``resources.gpu: 1`` taking turns and with ``gpu: 0.5`` two at a time,
  on a Ray node that offers one GPU, with the device and peak memory in trials.parquet.
"""

from __future__ import annotations

import io
import math
import os
import subprocess

import pytest
import torch

from cl_methods import get_method_class, registered_methods
from mmcl.data.base import collate
from mmcl.engine import evaluate, prepare, run_continual
from mmcl.spec import apply_overrides

from .conftest import mmcl_cmd
from .helpers import tiny_study
from .test_methods_contract import _contract_run, _same

DEVICE = os.environ.get("MMCL_GPU_TIER_DEVICE", "cuda")
_AVAILABLE = DEVICE == "cpu" or torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _AVAILABLE,
        reason="no CUDA device visible (the gpu tier runs where one is: benchmarks/gpu_check.sh; "
        "MMCL_GPU_TIER_DEVICE=cpu runs its steps on the CPU)",
    ),
]
# One method per track: what the dry run inside the CPU suite trains.
ONE_PER_TRACK = ["finetune", "gen_adapter", "cma"]


def _methods() -> list[str]:
    chosen = os.environ.get("MMCL_GPU_TIER_METHODS", "")
    names = registered_methods()
    if not chosen:
        return names
    wanted = chosen.split(",")
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise pytest.UsageError(f"MMCL_GPU_TIER_METHODS names unregistered methods {unknown}; registered: {names}")
    return wanted


def _on_device(name: str, **overrides):
    # The contract suite's two-task run of the method, on the tier's device.
    return apply_overrides(_contract_run(name, get_method_class(name)), {"device": DEVICE, **overrides})


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", _methods())
def test_method_trains_under_mixed_precision(name, amp):
    run = _on_device(name, **{"training.amp": amp})
    prep = prepare(run)
    assert prep.device.type == DEVICE and prep.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    initial = {n: p.detach().clone() for n, p in prep.backbone.named_parameters()}
    trained: set[int] = set()
    cls = type(prep.method)
    original_before = cls.before_task

    def record(self, t, task):  # the parameters the method trains in each task
        original_before(self, t, task)
        trained.update(id(p) for p in self.trainable_parameters())

    cls.before_task = record
    try:
        ends = []
        run_continual(run, on_task_end=ends.append, prepared=prep)
    finally:
        cls.before_task = original_before
    losses = [row["loss"] for e in ends for row in e.curves]
    assert bool(losses) == bool(trained), f"{name} under {amp}: trains {len(trained)} tensors, logged {len(losses)} losses"
    assert all(math.isfinite(v) for v in losses), f"{name} under {amp}: a loss is not finite"
    assert ends[-1].environment["amp_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[amp]
    for n, p in prep.backbone.named_parameters():
        if id(p) not in trained:
            assert torch.equal(p.detach(), initial[n]), f"{name} under {amp}: frozen parameter {n} changed"
    buf = io.BytesIO()
    torch.save(ends[-1].state, buf)
    buf.seek(0)
    fresh = prepare(run)
    fresh.method.load_state_dict(torch.load(buf, weights_only=True)["method"])
    batch = next(iter(torch.utils.data.DataLoader(prep.tasks[0].test, batch_size=8, collate_fn=collate)))
    batch = {k: v.to(prep.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for task in prep.tasks:
        with torch.autocast(prep.device.type, dtype=prep.amp_dtype):
            a, b = prep.method.predict(batch, task), fresh.method.predict(batch, task)
        assert _same(a, b), f"{name} under {amp}: predictions differ after a state round trip on {task.name}"


@pytest.mark.parametrize("name", [m for m in ONE_PER_TRACK if m in _methods()] or ONE_PER_TRACK[:1])
def test_evaluation_on_the_device_equals_evaluation_on_the_cpu(name):
    """Same trained weights, full precision: the device's scores are the CPU's (a test
    sample may flip only where two classes tie to float round-off)."""
    full = {"training.amp": "off"}
    if _on_device(name).backbone.kind in ("blip2", "llava"):
        full["backbone.dtype"] = "float32"  # "auto" is bf16 weights on a GPU
    on_cpu = prepare(apply_overrides(_on_device(name), {**full, "device": "cpu"}))
    ends = []
    run_continual(on_cpu.run, on_task_end=ends.append, prepared=on_cpu)
    state = ends[-1].state["method"]
    on_dev = prepare(apply_overrides(_on_device(name), full))
    on_dev.method.load_state_dict(state)
    cpu_scores, _, sizes = evaluate(on_cpu.method, on_cpu.tasks, on_cpu.run, on_cpu.device, None)
    dev_scores, _, _ = evaluate(on_dev.method, on_dev.tasks, on_dev.run, on_dev.device, None)
    for task, v in cpu_scores.items():
        one_sample = 100.0 / sizes[task]
        assert abs(dev_scores[task] - v) <= one_sample + 1e-6, (task, v, dev_scores[task])


def test_loader_workers_with_pinned_memory_change_nothing():
    from mmcl.data.base import make_loader

    dev = torch.device(DEVICE)
    base = _on_device("finetune")
    loader = make_loader(prepare(base).tasks[0].train, batch_size=4, workers=2, device=dev)
    assert loader.pin_memory == (dev.type == "cuda") and loader.num_workers == 2
    plain = run_continual(base)
    workers = run_continual(apply_overrides(base, {"data_workers": 2}))
    assert (plain.matrix == workers.matrix).all()


@pytest.fixture(scope="module")
def gpu_node(tmp_path_factory):
    """A one-node Ray cluster that offers 4 CPUs and 1 GPU (both declared: on the CPU in
    the dry run the trials then train on the CPU). The CPUs never limit the trials here:
    only the GPU does."""
    pytest.importorskip("ray", reason="Ray is not installed here (a device machine without the Ray wheel)")
    from .loopback import LoopbackCluster

    c = LoopbackCluster(tmp_path_factory.mktemp("gpu-node"))
    try:
        c.start_head(cpus=4, gpus=1)
        yield c
    finally:
        c.stop()


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


# [choice] The CPU dry run takes the fractional case only: with four trials it shows both
# the sharing (two at once) and the cap (never three), the scheduling gpu: 1 relies on too.
@pytest.mark.slow
@pytest.mark.parametrize("gpu", [1, 0.5] if DEVICE == "cuda" else [0.5])
def test_tune_trials_get_the_gpu(gpu_node, tmp_path, gpu):
    """Four trials asking ``gpu`` each, up to four allowed at once, on a node with one
    GPU: at most 1 / gpu of them run at the same time, and that many do. Each trial ran on
    the device and recorded its device and peak memory in trials.parquet."""
    import yaml

    import analysis

    study = tiny_study(tmp_path / "s.yaml", [{"name": "orders", "kind": "orders", "seeds": [0, 1]}], num_tasks=2,
                       steps=4, max_concurrent=4)  # fmt: skip
    spec = yaml.safe_load(study.read_text())
    spec["resources"] = {"cpu": 1, "gpu": gpu}
    spec["run"]["device"] = DEVICE
    study.write_text(yaml.safe_dump(spec, sort_keys=False))
    # Each trial pauses 8 s after its first row: trials that share the GPU overlap for
    # sure, trials that take turns cannot (a tiny trial alone lasts about a second).
    env = {**gpu_node.env, "RAY_ADDRESS": gpu_node.address, "MMCL_FAULT_INJECT": "pause:orders:0:8"}
    r = subprocess.run(mmcl_cmd("run", str(study)), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = analysis.load(tmp_path / "results" / "tiny")
    trials = res.trials
    assert len(trials) == 4 and (trials.status == "completed").all()
    assert (trials["env/device"] == DEVICE).all() and (trials.peak_memory_mb > 0).all()
    if DEVICE == "cuda":
        assert (trials["env/gpu_name"] != "").all()
    # When each trial wrote its first and last row: the most spans open at one moment.
    parts = tmp_path / "results" / "tiny" / "parts" / "accuracy" / "orders"
    spans = []
    for tid in trials.trial_id:
        steps = sorted((parts / tid).glob("step_*.parquet"))
        spans.append((steps[0].stat().st_mtime, steps[-1].stat().st_mtime))
    assert _most_at_once(spans) == int(1 / gpu), (gpu, spans)
