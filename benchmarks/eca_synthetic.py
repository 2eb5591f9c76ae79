"""Does ECA forget less than plain adapter fine-tuning on the offline generation benchmark?

    uv run python benchmarks/eca_synthetic.py [--seeds 0 1] [--variants no_replay single_adapter]

Runs, through the real engine (`run_continual`), the run block of
``studies/eca_quickstart.yaml`` (tiny pretrained BLIP-2, `synthetic_text`: captions then
four VQA tasks) with ``gen_adapter`` (one set of Q-Former adapters of ECA's widths,
trained task after task: the baseline) and with ECA's own config (plus any named ablation
variants), one thread each, and prints per method and seed: Avg / Last / BWT / forgetting,
the score of each task right after training it (diagonal) and after the last task, and
the wall time of one run. Captions are CIDEr-D x 100, the VQA tasks accuracy in %. The
README's ECA figures come from here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="*", default=[], help="ECA ablation variants besides full")
    ap.add_argument("--study", default=str(REPO / "studies" / "eca_quickstart.yaml"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from cl_methods import get_method_class
    from mmcl.engine import run_continual
    from mmcl.spec import apply_overrides, load_study

    torch.set_num_threads(1)
    base = apply_overrides(load_study(args.study).run, {"torch_threads": 1})
    cfg = base.method.config
    widths = {
        "attn_width": cfg.get("adapter_attn_width", 30),
        "ffn_width": cfg.get("adapter_ffn_width", 512),
        "scale": cfg.get("adapter_scale", 4.0),
    }
    baseline = {"method.name": "gen_adapter", "method.config": {"params": "adapters", "adapters": widths}}
    cases = [("gen_adapter", baseline), ("eca", {})]
    ablations = get_method_class("eca").ablations
    for v in args.variants:
        cases.append((f"eca:{v}", {f"method.{k}": val for k, val in ablations[v].items()}))

    print(f"{'method':<20}{'seed':>5}{'Avg':>7}{'Last':>7}{'BWT':>7}{'Forget':>8}{'s/run':>7}   diagonal -> after the last task")
    summary = []
    names = None
    for name, overrides in cases:
        bwts, lasts = [], []
        for seed in args.seeds:
            run = apply_overrides(base, {**overrides, "seed": seed})
            t0 = time.perf_counter()
            res = run_continual(run)
            dt = time.perf_counter() - t0
            m, R = res.metrics, res.matrix
            names = res.task_names
            diag = " ".join(f"{R[i + 1][i]:.0f}" for i in range(len(names)))
            final = " ".join(f"{x:.0f}" for x in R[-1])
            row = f"{name:<20}{seed:>5}{m['avg']:7.1f}{m['last']:7.1f}{m['bwt']:7.1f}"
            row += f"{m['forgetting']:8.1f}{dt:7.1f}"
            print(f"{row}   {diag} -> {final}", flush=True)
            bwts.append(m["bwt"])
            lasts.append(m["last"])
        summary.append((name, float(np.mean(lasts)), float(np.mean(bwts))))
    print(f"\ntasks: {names}")
    for name, last, bwt in summary:
        print(f"{name:<20} mean Last {last:6.1f}  mean BWT {bwt:6.1f}   (seeds {args.seeds})")


if __name__ == "__main__":
    main()
