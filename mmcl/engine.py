"""One continual run, start to finish: the loop every method shares.

``run_continual`` evaluates the model before any training (row 0 of the accuracy matrix),
then for each task trains it (optimizer, schedule, mixed precision and clipping from the
run spec), lets the method do its end-of-task work, and evaluates every task of the
benchmark. After every row it calls ``on_task_end`` with the row and a state that resumes
the run exactly from that point. It knows nothing of Ray: the same function runs in a
test, in a notebook or inside a Tune trial.

Reproducibility: every random stream (torch's global generator, the data order, the
method's generator) is reseeded from (seed, task index) at the start of each task, so a
run resumed from a task boundary produces the same numbers as one that never stopped.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import pickle
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from mmcl.spec import RunSpec

log = logging.getLogger(__name__)

STATE_VERSION = 1


def load_state_file(path) -> dict[str, Any]:
    """Read a saved run state (a trial checkpoint) without running code from it.

    Checkpoints come back from shared storage that other machines write to, so they are
    read with ``weights_only=True``: tensors, numbers, strings and containers only. A
    file whose unpickling would import or call anything is refused (the contract suite
    checks that every method's state loads this way)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused to load: it holds more than tensors and plain data ({first})") from None


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue meaningfully."""


@dataclass
class TaskEnd:
    """What ``on_task_end`` receives after each row of the accuracy matrix."""

    step: int  # 0 = before training, s = after training the s-th task
    trained_task: str | None
    task_names: list[str]  # training order (= column order of ``matrix``)
    row: dict[str, float]  # eval task name -> score (percent)
    metric_names: dict[str, str]
    # Each task's full test-set size: the weights of faa_weighted, also when
    # evaluation.max_samples caps how many samples were scored.
    n_samples: dict[str, int]
    matrix: np.ndarray  # rows 0..step, one column per task in training order
    metrics: dict[str, float]  # running Avg / Last / Transfer / BWT ... on ``matrix``
    curves: list[dict[str, Any]]  # per-logged-step losses of this task
    state: dict[str, Any]  # pass back as ``resume=`` to continue from here
    trainable_params: int
    peak_memory_mb: float
    task_wall_time_s: float
    method_stats: dict[str, float] = field(default_factory=dict)  # Method.stats() after this row
    environment: dict[str, str] = field(default_factory=dict)  # environment_fingerprint()
    # Samples actually scored per task (= n_samples unless evaluation.max_samples caps it).
    n_eval: dict[str, int] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def done(self) -> bool:
        return self.step == self.n_tasks


@dataclass
class ContinualResult:
    task_names: list[str]
    matrix: np.ndarray
    metrics: dict[str, float]
    curves: list[dict[str, Any]] = field(default_factory=list)
    trainable_params: int = 0
    peak_memory_mb: float = 0.0
    wall_time_s: float = 0.0
    method_stats: dict[str, float] = field(default_factory=dict)  # Method.stats() at the end


# --------------------------------------------------------------------------- helpers


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed from a base seed and labels (no Python hash randomisation)."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _reseed(seed: int, task: int) -> None:
    s = derive_seed(seed, "task", task)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % (2**32))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no CUDA device is visible to this process")
    return torch.device(name)


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None  # CPU autocast is slower than fp32 for these models
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def environment_fingerprint(device: torch.device, amp_dtype: torch.dtype | None, run: RunSpec) -> dict[str, str]:
    """Where and how a run ran, for the trials table: reviewers blame gaps between
    results on GPUs, CUDA and precision, so each trial records them (empty on a CPU)."""
    import platform
    import subprocess

    env = {
        "hostname": platform.node(),
        # The interpreter (so the environment) the trial ran in: the driver's on a local Ray,
        # each node's own on a cluster.
        "python": sys.executable,
        "torch_version": torch.__version__,
        "device": device.type,
        "gpu_name": "",
        "gpu_count": "0",
        "cuda_version": "",
        "driver_version": "",
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
        # No gradient accumulation: one optimisation step sees training.batch_size samples.
        "effective_batch_size": str(run.training.batch_size),
    }
    if device.type == "cuda":
        env.update(
            gpu_name=torch.cuda.get_device_name(device),
            gpu_count=str(torch.cuda.device_count()),
            cuda_version=torch.version.cuda or "",
        )
        try:  # torch does not expose the driver's version; nvidia-smi does
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
            env["driver_version"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _TaskTagged(Dataset):
    """Adds the task's position to every sample so mixed-task batches stay scorable."""

    def __init__(self, base: Dataset, task: int):
        self.base, self.task = base, task

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        return {**self.base[i], "task": self.task}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _lr_lambda(total: int, warmup: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _make_optimizer(params: list[torch.nn.Parameter], run: RunSpec) -> torch.optim.Optimizer:
    tr = run.training
    if tr.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay)
    return torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(method, tasks, run: RunSpec, device: torch.device, amp_dtype) -> tuple[dict, dict, dict]:
    """Score the method on every task's test split; returns (scores, metric names, sizes).

    ``sizes`` are the samples scored per task: the test split's size, or
    ``evaluation.max_samples`` when that caps it (the run's weights are the full sizes,
    :func:`full_test_sizes`).

    The task's ``metric`` decides how: ``top1`` compares ``method.predict``'s logits with
    the labels; a text metric (``cider``, ``vqa_acc``) takes the generated strings
    ``method.predict`` returns and scores them against the samples' ``refs`` with
    :func:`mmcl.metrics_text.score_text` (CIDEr-D x 100, VQA accuracy in %). CIDEr's
    document frequencies come from the whole evaluated set, so strings are gathered over
    all batches and scored once per task.
    """
    from mmcl.data.base import collate, make_loader

    ev = run.evaluation
    scores, names, sizes = {}, {}, {}
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for task in tasks:
        data = task.test
        if ev.max_samples and len(data) > ev.max_samples:
            # A fixed subset, the same for every trial and every row.
            g = torch.Generator().manual_seed(0)
            data = Subset(data, torch.randperm(len(data), generator=g)[: ev.max_samples].tolist())
        correct = total = 0
        generated: list[str] = []
        refs: list[list[str]] = []
        for batch in make_loader(data, ev.batch_size, run.data_workers, device, shuffle=False, collate_fn=collate):
            batch = _to_device(batch, device)
            with autocast:
                out = method.predict(batch, task)
            if task.metric == "top1":
                correct += int((out.argmax(-1) == batch["label"]).sum())
                total += len(batch["label"])
            else:
                if not isinstance(out, (list, tuple)) or len(out) != len(batch["refs"]):
                    raise TypeError(
                        f"task {task.name} ({task.metric}): {type(method).__name__}.predict must return one generated "
                        f"string per sample, got {type(out).__name__}"
                    )
                generated.extend(str(x) for x in out)
                refs.extend(batch["refs"])
                total += len(batch["refs"])
        if task.metric == "top1":
            scores[task.name] = 100.0 * correct / max(total, 1)
        else:
            from mmcl.metrics_text import TEXT_METRICS, score_text

            if task.metric not in TEXT_METRICS:
                raise ValueError(f"task {task.name}: metric {task.metric!r} is not supported by this engine")
            scores[task.name] = (
                score_text(task.metric, generated, refs, ev.caption_tokenizer) if generated else float("nan")
            )
        names[task.name] = task.metric
        sizes[task.name] = total
    return scores, names, sizes


def full_test_sizes(tasks) -> dict[str, int]:
    """Each task's full test-set size: faa_weighted's weights (DGG's FAA weights every task
    by its test set), whatever evaluation.max_samples scores of it."""
    return {task.name: len(task.test) for task in tasks}


# --------------------------------------------------------------------------- the loop


@dataclass
class Prepared:
    """The parts of a run, built from its spec (what ``run_continual`` trains)."""

    run: RunSpec
    device: torch.device
    amp_dtype: torch.dtype | None
    backbone: Any
    tasks: list
    method: Any
    ctx: Any
    method_gen: torch.Generator

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def prepare(run: RunSpec) -> Prepared:
    """Load the backbone, build the benchmark and set the method up on them."""
    from cl_methods import build_method
    from cl_methods.base import MethodContext
    from mmcl.backbones import load_backbone
    from mmcl.data import build_benchmark, check_backbone_fits
    from mmcl.spec import check_track

    # Method, backbone and benchmark of different tracks fail here, before loading.
    check_track(run)
    check_backbone_fits(run.benchmark, run.backbone.kind)
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    device = resolve_device(run.device)
    torch.manual_seed(run.seed)
    backbone = load_backbone(run.backbone, device)
    bench = build_benchmark(run.benchmark, image_size=backbone.image_size, preprocess=backbone.preprocess)
    tasks = bench.tasks
    method_gen = torch.Generator()
    ctx = MethodContext(
        tasks=tasks,
        train_sets=[_TaskTagged(t.train, i) for i, t in enumerate(tasks)],
        device=device,
        generator=method_gen,
        templates=run.evaluation.templates,
        data_workers=run.data_workers,
    )
    method = build_method(run.method.name, run.method.config)
    method.setup(backbone, run, ctx)
    method.modules.to(device)
    return Prepared(run, device, _amp_dtype(run.training.amp, device), backbone, tasks, method, ctx, method_gen)


def run_continual(
    run: RunSpec,
    on_task_end: Callable[[TaskEnd], None] | None = None,
    resume: dict[str, Any] | None = None,
    prepared: Prepared | None = None,
) -> ContinualResult:
    """Run (or continue) one continual sequence and return its accuracy matrix.

    ``resume`` is a ``TaskEnd.state`` from an earlier call with the same ``run``;
    ``prepared`` lets a caller keep a handle on the method (tests, benchmarks).
    """
    from analysis.metrics import matrix_metrics

    t_start = time.perf_counter()
    p = prepared or prepare(run)
    device, amp_dtype, tasks, method, method_gen = p.device, p.amp_dtype, p.tasks, p.method, p.method_gen
    names = p.task_names
    fingerprint = environment_fingerprint(device, amp_dtype, run)
    if any(t.metric == "cider" for t in tasks):
        from mmcl.metrics_text import resolve_caption_tokenizer

        # Which tokenizer scores CIDEr on this node ("ptb" or "python"), for the trials
        # table; "ptb" without Java fails here, before any training.
        fingerprint["caption_tokenizer"] = resolve_caption_tokenizer(run.evaluation.caption_tokenizer)

    rows: list[list[float]] = []
    # sizes: full test-set sizes (the weights); n_eval: samples scored (max_samples cap).
    sizes: dict[str, int] = full_test_sizes(tasks)
    n_eval: dict[str, int] = {}
    opt_state = None
    start = 0
    trainable = 0
    if resume is not None:
        if resume.get("version") != STATE_VERSION or resume.get("task_names") != names:
            raise ValueError("resume state does not belong to this run (task order or version differ)")
        start = int(resume["completed"])
        rows = [list(r) for r in resume["matrix"]]
        # The state of row s holds rows 0..s: a state that disagrees would add rows twice.
        if not 0 <= start <= len(names) or len(rows) != start + 1:
            raise ValueError(
                f"resume state is inconsistent: {start} task(s) completed of {len(names)} but {len(rows)} matrix row(s)"
            )
        method.load_state_dict(resume["method"])
        method.modules.to(device)
        # The full sizes come from the tasks, not the state: a state written before
        # n_eval existed holds the scored (possibly capped) counts under n_samples.
        n_eval = dict(resume.get("n_eval", resume["n_samples"]))
        opt_state = resume.get("optimizer")
        trainable = int(resume.get("trainable_params", 0))

    all_curves: list[dict[str, Any]] = []
    optimizer = None

    def emit(step: int, t0: float, curves: list[dict]) -> None:
        # A snapshot, not references: optimizer and module state dicts hand out the live
        # tensors, which the next task would keep changing under the caller.
        state = copy.deepcopy({
            "version": STATE_VERSION,
            "task_names": names,
            "completed": step,
            "matrix": [list(r) for r in rows],
            "n_samples": sizes,
            "n_eval": n_eval,
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict() if (optimizer is not None and not run.training.reset_optimizer) else None,
            "rng": {"torch": torch.get_rng_state(), "method": method_gen.get_state()},
            "trainable_params": trainable,
        })
        if on_task_end is None:
            return
        mat = np.asarray(rows, dtype=float)
        on_task_end(
            TaskEnd(
                step=step,
                trained_task=names[step - 1] if step else None,
                task_names=names,
                row=dict(zip(names, rows[-1])),
                metric_names=metric_names,
                n_samples=dict(sizes),
                n_eval=dict(n_eval),
                matrix=mat,
                metrics=matrix_metrics(mat, zero_shot=True, n_samples=np.array([sizes[n] for n in names])),
                curves=curves,
                state=state,
                trainable_params=trainable,
                peak_memory_mb=_peak_memory_mb(device),
                task_wall_time_s=time.perf_counter() - t0,
                method_stats={k: float(v) for k, v in method.stats().items()},
                environment=fingerprint,
            )
        )

    metric_names: dict[str, str] = {}
    if resume is None:
        t0 = time.perf_counter()
        scores, metric_names, n_eval = evaluate(method, tasks, run, device, amp_dtype)
        rows.append([scores[n] for n in names])
        emit(0, t0, [])
    else:
        # Row ``start`` is in the state already: it is never evaluated (or appended) again.
        metric_names = {t.name: t.metric for t in tasks}
        if start == len(tasks):
            # Every task was trained before the interruption: report the final row again
            # (the caller's writes are idempotent) so the caller ends with the run's
            # result, and train nothing.
            emit(start, time.perf_counter(), [])

    for t in range(start, len(tasks)):
        t0 = time.perf_counter()
        _reseed(run.seed, t)
        method_gen.manual_seed(derive_seed(run.seed, "method", t))
        method.before_task(t, tasks[t])
        params = method.trainable_parameters()
        trainable = max(trainable, sum(p.numel() for p in params))
        curves: list[dict[str, Any]] = []
        if params:
            if optimizer is None or run.training.reset_optimizer:
                optimizer = _make_optimizer(params, run)
                if opt_state is not None:
                    optimizer.load_state_dict(opt_state)
                    opt_state = None
            curves = _train_task(method, optimizer, t, tasks[t].name, run, device, amp_dtype)
        method.after_task(t, tasks[t])
        scores, metric_names, n_eval = evaluate(method, tasks, run, device, amp_dtype)
        rows.append([scores[n] for n in names])
        all_curves.extend(curves)
        emit(t + 1, t0, curves)

    # The engine never trains past the last task: one row per task, plus row 0.
    assert len(rows) == len(tasks) + 1, f"{len(rows)} matrix rows for {len(tasks)} tasks"
    mat = np.asarray(rows, dtype=float)
    return ContinualResult(
        task_names=names,
        matrix=mat,
        metrics=matrix_metrics(mat, zero_shot=True, n_samples=np.array([sizes[n] for n in names])),
        curves=all_curves,
        trainable_params=trainable,
        peak_memory_mb=_peak_memory_mb(device),
        wall_time_s=time.perf_counter() - t_start,
        method_stats={k: float(v) for k, v in method.stats().items()},
    )


def _train_task(method, optimizer, t: int, task_name: str, run: RunSpec, device, amp_dtype) -> list[dict]:
    from mmcl.data.base import collate, make_loader

    tr = run.training
    data = method.train_dataset(t)
    g = torch.Generator().manual_seed(derive_seed(run.seed, "data", t))
    loader = make_loader(
        data, tr.batch_size, run.data_workers, device,
        shuffle=True, generator=g, drop_last=len(data) > tr.batch_size, collate_fn=collate,
    )
    total = max(1, math.ceil(tr.epochs * len(loader)))
    if tr.max_steps:
        total = min(total, tr.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", tr.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, tr.warmup_steps, tr.schedule, tr.min_lr_ratio)
    )
    # fp16 needs loss scaling; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    curves: list[dict] = []
    step, seen, tick = 0, 0, time.perf_counter()
    while step < total:
        for batch in loader:
            if step >= total:
                break
            batch = _to_device(batch, device)
            with autocast:
                terms = method.training_loss(batch, t)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                bad = [k for k, v in terms.items() if not torch.isfinite(v)]
                raise NonFiniteLossError(
                    f"loss became {float(loss.detach())} at task {t} ({task_name}), step {step}; "
                    f"non-finite terms: {', '.join(bad)} (lower training.lr or check the method's weights)"
                )
            scaler.scale(loss).backward()
            # Unscaled once, before both hooks and the clip: every hook sees (and adds
            # to) true gradients, and the scaler's step still skips an overflowed step.
            scaler.unscale_(optimizer)
            method.after_backward(step)
            if tr.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
            method.after_clip(step)  # terms the clip must not bound (DGG's guidance)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]
            sched.step()
            seen += len(batch["task"])  # every training sample carries its task (any track)
            step += 1
            if step % tr.log_every == 0 or step == total:
                now = time.perf_counter()
                curves.append(
                    {
                        "task": t,
                        "task_name": task_name,
                        "step": step,
                        "loss": float(loss.detach()),
                        "lr": lr,
                        "samples_per_s": seen / max(now - tick, 1e-9),
                        **{f"loss/{k}": float(v.detach()) for k, v in terms.items()},
                    }
                )
                seen, tick = 0, now
    return curves
