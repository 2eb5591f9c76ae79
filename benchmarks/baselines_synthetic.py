"""Does the offline benchmark behave like the real thing? Baselines on it, end to end.

    uv run python benchmarks/baselines_synthetic.py [--seeds 0 1] [--methods zeroshot finetune lwf er joint]
    uv run python benchmarks/baselines_synthetic.py --study studies/dgg_quickstart.yaml \
        --methods lora --variants full no_scaling no_bernoulli ghat_only replay_only

Runs each baseline (with its default config) through the real engine (`run_continual`)
on the `synthetic` benchmark with the pretrained tiny CLIP (the study's run block: the
quickstart's by default) and prints per method: zero-shot accuracy per task (row 0),
Avg / Last / Transfer / BWT / forgetting (mean over seeds) and the wall time of one run.
``--variants`` adds rows for the study's own method, with its config and each named
ablation variant on top. The README's figures come from here.
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
    ap.add_argument("--variants", nargs="*", default=[], help="ablation variants of the study's own method")
    ap.add_argument("--study", default=str(REPO / "studies" / "quickstart.yaml"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from cl_methods import get_method_class
    from mmcl.engine import run_continual
    from mmcl.spec import apply_overrides, load_study

    torch.set_num_threads(1)
    base = load_study(args.study).run
    base = apply_overrides(base, {"torch_threads": 1})
    rows = []
    zero_shot = None
    cases = [(name, {"method.name": name, "method.config": {}}) for name in args.methods]
    ablations = get_method_class(base.method.name).ablations
    for v in args.variants:
        cases.append((f"{base.method.name}:{v}", {f"method.{k}": val for k, val in ablations[v].items()}))
    for name, overrides in cases:
        per_seed = []
        for seed in args.seeds:
            run = apply_overrides(base, {**overrides, "seed": seed})
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
    print(f"\n{'method':<20}{'Avg':>7}{'Last':>7}{'Transfer':>10}{'BWT':>7}{'Forget':>8}{'s/run':>7}   (mean of seeds {args.seeds})")
    for name, m in rows:
        print(
            f"{name:<20}{m['avg']:7.1f}{m['last']:7.1f}{m['transfer']:10.1f}{m['bwt']:7.1f}"
            f"{m['forgetting']:8.1f}{m['seconds']:7.1f}"
        )


if __name__ == "__main__":
    main()
