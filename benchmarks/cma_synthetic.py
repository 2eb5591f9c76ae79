"""README figures of the paired track: every paired method on the generated audio-visual
benchmark, class- and domain-incrementally, with the run block of studies/cma_quickstart.yaml.

    uv run python benchmarks/cma_synthetic.py [--methods cma,pm_finetune] [--protocols cil,dil]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mmcl.engine import run_continual
from mmcl.spec import apply_overrides, load_study

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "pm_finetune": {},
    "pm_lwf": {},
    "pm_ewc": {},
    "pm_er": {"buffer_size": 64},
    "pm_derpp": {"buffer_size": 64},
    "cma": {},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--protocols", default="cil,dil")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    base = load_study(REPO / "studies" / "cma_quickstart.yaml").run
    print("| protocol | method | Avg | Last | BWT | Forgetting | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for proto in args.protocols.split(","):
        for name in args.methods.split(","):
            run = apply_overrides(base, {"torch_threads": args.threads, "benchmark.options.protocol": proto,
                                         "method.name": name, "method.config": METHODS.get(name, {})})
            t = time.perf_counter()
            m = run_continual(run).metrics
            print(f"| {proto} | {name} | {m['avg']:.1f} | {m['last']:.1f} | {m['bwt']:.1f} | {m['forgetting']:.1f} "
                  f"| {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
