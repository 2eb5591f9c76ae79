"""What one task's report costs on a local disk vs an S3-compatible server.

    uv run python benchmarks/storage_overhead.py [--tasks 5] [--sizes quickstart vitb16_prompts lora128_7b]

Inside a real Ray Tune trial (local Ray), each "task" does what ``mmcl.tune._trial`` does
after a row of the accuracy matrix: the Parquet parts of the step (``TrialWriter``, the
quickstart's 6 tasks, 50 curve rows), ``torch.save`` of a checkpoint holding the given
synthetic tensors, and ``tune.report`` with that checkpoint (which Tune persists to the
study's storage). Media: a local directory, and a moto S3 server this script starts on
127.0.0.1 (fake credentials in this process's environment). Prints the median over tasks
of the per-task wall time, per medium and checkpoint size, and that time as a share of
an assumed task time:

- quickstart run block: the tiny CLIP image tower trained (638,592 parameters, fp32,
  2.5 MB); task time 10 s [assumed: the order of a quickstart task on this 2-core CPU];
- ViT-B/16 prompts: DIKI / DAGR prompts of 11 tasks (2 x 8 tokens x 12 blocks x 768,
  fp32) plus DAGR's graph (0.3 MB); task time 2.9 GPU-h / 11 tasks = 950 s (DAGR paper);
- LoRA rank 128 on a 7B LLM: every linear layer of LLaMA-7B's 32 blocks (q, k, v, o:
  4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 -> 4096), bf16, 320 M parameters,
  640 MB; task time 1 h [assumed: a LLaVA-1.5-7B LoRA epoch over a ~100k-sample VQA task
  on 8 GPUs].
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK_TIME_S = {"quickstart": 10.0, "vitb16_prompts": 2.9 * 3600 / 11, "lora128_7b": 3600.0}


def checkpoint(kind: str):
    import torch

    if kind == "quickstart":
        return {"image_tower": torch.zeros(638_592)}  # the tiny CLIP tower, fp32
    if kind == "vitb16_prompts":
        return {"prompts": torch.zeros(11, 2, 8, 12, 768), "graph": torch.zeros(75_000)}
    d, ff, r = 4096, 11008, 128
    layer = {}
    for name, (i, o) in {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, ff), "up": (d, ff),
                         "down": (ff, d)}.items():  # fmt: skip
        layer[f"{name}.A"] = torch.zeros(r, i, dtype=torch.bfloat16)
        layer[f"{name}.B"] = torch.zeros(o, r, dtype=torch.bfloat16)
    return {f"layers.{b}.{k}": v.clone() for b in range(32) for k, v in layer.items()}


def trainable(config):
    import numpy as np
    import torch
    from ray import tune

    from mmcl.engine import TaskEnd
    from mmcl.results import TrialWriter

    names = [f"t{i}" for i in range(6)]
    writer = TrialWriter(config["out"], "bench", "s", tune.get_context().get_trial_id(),
                         {"variant": "full", "order_id": "default", "seed": 0})  # fmt: skip
    state = checkpoint(config["kind"])
    times = []
    for step in range(config["tasks"]):
        end = TaskEnd(
            step=step, trained_task=names[step - 1] if step else None, task_names=names,
            row={n: 50.0 for n in names}, metric_names={n: "accuracy" for n in names},
            n_samples={n: 100 for n in names}, matrix=np.zeros((step + 1, 6)), metrics={},
            curves=[{"task": step, "task_name": "t", "step": i, "loss": 1.0, "lr": 1e-3, "samples_per_s": 1.0}
                    for i in range(50)],
            state={}, trainable_params=1, peak_memory_mb=0.0, task_wall_time_s=0.0,
        )  # fmt: skip
        t0 = time.perf_counter()
        writer.write_step(end)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"engine": state, "elapsed_s": 0.0}, Path(d) / "state.pt")
            tune.report({"task": step, "t": times[-1] if times else 0.0}, checkpoint=tune.Checkpoint.from_directory(d))
        times.append(time.perf_counter() - t0)
    Path(config["times"]).write_text(",".join(f"{t:.4f}" for t in times))


def run(out_uri: str, kind: str, tasks: int) -> list[float]:
    from ray import tune

    from mmcl.storage import Storage

    store = Storage.open(out_uri)
    times = Path(tempfile.mkstemp(suffix=".txt")[1])
    ray_dir = store / "ray"
    tuner = tune.Tuner(
        trainable,
        param_space={"out": store.uri, "kind": kind, "tasks": tasks, "times": str(times)},
        run_config=tune.RunConfig(
            name=f"bench-{kind}", storage_path=ray_dir.path(), storage_filesystem=None if store.local else store.fs,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0,
        ),  # fmt: skip
    )
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    return [float(x) for x in times.read_text().split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--sizes", nargs="+", default=list(TASK_TIME_S))
    args = ap.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        import pyarrow.fs as pafs
        import ray

        for _ in range(60):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        opts = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        pafs.FileSystem.from_uri(f"s3://bench?{opts}&allow_bucket_creation=true")[0].create_dir("bench")
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        local_root = Path(tempfile.mkdtemp(prefix="mmcl-bench-"))
        print(f"per-task report cost (parts + torch.save + tune.report with checkpoint), median of {args.tasks} tasks")
        print(f"{'checkpoint':<16}{'MB':>8}{'local s':>10}{'S3 s':>10}{'S3/local':>10}{'task s':>9}{'S3 share':>10}")
        for kind in args.sizes:
            mb = sum(t.numel() * t.element_size() for t in checkpoint(kind).values()) / 2**20
            loc = statistics.median(run(str(local_root / kind), kind, args.tasks))
            s3 = statistics.median(run(f"s3://bench/{kind}?{opts}", kind, args.tasks))
            share = 100 * s3 / TASK_TIME_S[kind]
            print(f"{kind:<16}{mb:>8.1f}{loc:>10.3f}{s3:>10.3f}{s3 / loc:>10.2f}{TASK_TIME_S[kind]:>9.0f}{share:>9.2f}%")
        ray.shutdown()
    finally:
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait(timeout=20)


if __name__ == "__main__":
    main()
