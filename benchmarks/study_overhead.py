"""Quickstart wall time and Ray overhead: study wall time against the trials' own time.

    uv run python benchmarks/study_overhead.py [STUDY] [--smoke] [--output DIR]

Runs the study end to end with `mmcl run` in this process (a local Ray starts unless
RAY_ADDRESS is set), then prints:

- the whole study's wall time (pretraining of the tiny CLIP excluded when it is cached:
  run once to warm the cache, or read the first line's figure);
- per stage: wall time, number of trials, the sum of the trials' own run times (the
  engine's time inside the trial: training + evaluation), and the ideal wall time with
  the study's concurrency (sum / max_concurrent_trials);
- the overhead = stage wall time / ideal - 1: what Ray Tune, trial start-up, model
  loading and checkpointing add on top of the work itself.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", nargs="?", default=str(REPO / "studies" / "quickstart.yaml"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--output")
    args = ap.parse_args()

    import pandas as pd

    from mmcl.backbones import ensure_pretrained
    from mmcl.spec import load_study
    from mmcl.storage import open_storage
    from mmcl.study import resolve_paths, run_study, smoke

    study = resolve_paths(load_study(args.study), Path.cwd())
    if args.smoke:
        study = smoke(study)
    t0 = time.perf_counter()
    if study.run.backbone.pretrained == "synthetic":
        ensure_pretrained(study.run.backbone)
    t_pre = time.perf_counter() - t0
    out = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="mmcl-bench-")) / study.name

    stage_wall: dict[str, float] = {}
    import mmcl.tune as mt

    original = mt.run_stage

    def timed(plan, **kwargs):
        t = time.perf_counter()
        try:
            return original(plan, **kwargs)
        finally:
            stage_wall[plan.stage] = time.perf_counter() - t

    mt.run_stage = timed
    t1 = time.perf_counter()
    run_study(study, open_storage(out))
    total = time.perf_counter() - t1

    trials = pd.read_parquet(out / "trials.parquet")
    print(f"pretraining (0 when cached): {t_pre:.1f} s")
    print(f"study wall time: {total:.1f} s  ({len(trials)} trials, results in {out})")
    print(f"{'stage':<12}{'trials':>7}{'wall s':>9}{'sum trial s':>13}{'ideal s':>9}{'overhead':>10}")
    for stage, wall in stage_wall.items():
        t = trials[trials.stage == stage]
        work = float(t.wall_time_s.fillna(0).sum())
        ideal = work / min(study.max_concurrent_trials, max(len(t), 1))
        over = wall / ideal - 1 if ideal > 0 else math.nan
        print(f"{stage:<12}{len(t):>7}{wall:>9.1f}{work:>13.1f}{ideal:>9.1f}{over:>9.0%}")
    work = float(trials.wall_time_s.fillna(0).sum())
    ideal = work / study.max_concurrent_trials
    print(f"{'all':<12}{len(trials):>7}{total:>9.1f}{work:>13.1f}{ideal:>9.1f}{total / ideal - 1:>9.0%}")


if __name__ == "__main__":
    main()
