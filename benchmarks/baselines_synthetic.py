"""Does the offline benchmark behave like the real thing? Baselines on it, end to end.

    uv run python benchmarks/baselines_synthetic.py [--seeds 0 1] [--methods zeroshot finetune lwf er joint]

Runs each baseline through the real engine (`run_continual`) on the `synthetic`
benchmark with the pretrained tiny CLIP (the quickstart's run block) and prints per
method: zero-shot accuracy per task (row 0), Avg / Last / Transfer / BWT / forgetting
(mean over seeds) and the wall time of one run. The README's figures come from here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=["zeroshot", "finetune", "lwf", "er", "joint"])
    ap.add_argument("--study", default=str(REPO / "studies" / "quickstart.yaml"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from mmcl.engine import run_continual
    from mmcl.spec import apply_overrides, load_study

    torch.set_num_threads(1)
    base = load_study(args.study).run
    base = apply_overrides(base, {"torch_threads": 1})
    rows = []
    zero_shot = None
    for name in args.methods:
        per_seed = []
        for seed in args.seeds:
            run = apply_overrides(base, {"method.name": name, "method.config": {}, "seed": seed})
            t0 = time.perf_counter()
            res = run_continual(run)
            per_seed.append((res.metrics, time.perf_counter() - t0))
            if zero_shot is None:
                zero_shot = dict(zip(res.task_names, res.matrix[0]))
        m = {k: float(np.mean([p[0][k] for p in per_seed])) for k in ("avg", "last", "transfer", "bwt", "forgetting")}
        m["seconds"] = float(np.mean([p[1] for p in per_seed]))
        rows.append((name, m))

    print("zero-shot accuracy per task (row 0):")
    for task, acc in (zero_shot or {}).items():
        print(f"  {task:<12}{acc:6.1f}")
    print(f"\n{'method':<10}{'Avg':>7}{'Last':>7}{'Transfer':>10}{'BWT':>7}{'Forget':>8}{'s/run':>7}   (mean of seeds {args.seeds})")
    for name, m in rows:
        print(
            f"{name:<10}{m['avg']:7.1f}{m['last']:7.1f}{m['transfer']:10.1f}{m['bwt']:7.1f}"
            f"{m['forgetting']:8.1f}{m['seconds']:7.1f}"
        )


if __name__ == "__main__":
    main()
