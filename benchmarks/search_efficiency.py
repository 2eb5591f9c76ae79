"""What early stopping over whole task sequences buys: one search space, three protocols.

    uv run python benchmarks/search_efficiency.py                      # 3 studies x 3 seeds
    uv run python benchmarks/search_efficiency.py studies/quickstart.yaml --seeds 0

For each study, its first search stage alone (same space, trial count and sampler seed)
runs three ways, each a real `mmcl run` of a one- or two-stage study on a local Ray:

- ``fifo``: every trial trains every task (the reference: what the search can find);
- ``asha``: the stage's own scheduler (ASHA with the task index as time);
- ``task1``: the cheap baseline of the literature: every trial trains task 1 only
  (``tune_on: {first_k: 1}``), then the best config runs the whole sequence once.

Per protocol and sampler seed it prints: the best final objective on the whole sequence
(for ``task1`` that of its one full run), where that config ranks among FIFO's trials of
the same seed, the trials' summed time (``wall_time_s``: the work) and the wall time; then
the medians over seeds and ASHA's share of FIFO's work. Target (issue #16): ASHA's best
within 0.5 points of FIFO's at <= 40% of its work.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from _figures import write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["quickstart.yaml", "dgg_quickstart.yaml", "cma_quickstart.yaml"]


def _variant(study, protocol: str, seed: int):
    from mmcl.spec import SchedulerSpec, StudySpec, TuneOnSpec

    s: StudySpec = copy.deepcopy(study)
    search = next(st for st in s.stages if st.kind == "search")
    search = search.model_copy(update={"sampler_seed": seed, "name": "search"})
    if protocol == "fifo":
        search.scheduler = SchedulerSpec(kind="fifo")
    elif protocol == "task1":
        search.scheduler = SchedulerSpec(kind="fifo")
        search.tune_on = TuneOnSpec(first_k=1)
    stages = [search]
    if protocol == "task1":
        from mmcl.spec import AblationStage

        stages.append(AblationStage(kind="ablation", name="final", base="search", variants=["full"],
                                    seeds=[s.run.seed], metric=search.metric, mode=search.mode))  # fmt: skip
    return s.model_copy(update={"name": f"{s.name}-{protocol}-{seed}", "stages": stages})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", default=[str(REPO / "studies" / n) for n in DEFAULT])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--protocols", nargs="+", default=["fifo", "asha", "task1"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import pandas as pd

    from mmcl.backbones import ensure_pretrained
    from mmcl.spec import load_study
    from mmcl.storage import open_storage
    from mmcl.study import resolve_paths, run_study

    out_root = Path(tempfile.mkdtemp(prefix="mmcl-search-eff-"))
    rows = []
    for path in args.studies:
        study = resolve_paths(load_study(path), Path.cwd())
        if study.run.backbone.kind == "open_clip" and study.run.backbone.pretrained == "synthetic":
            ensure_pretrained(study.run.backbone)
        search = next(st for st in study.stages if st.kind == "search")
        sign = 1 if search.mode == "max" else -1
        for seed in args.seeds:
            fifo_values: list[float] = []
            for protocol in args.protocols:
                variant = _variant(study, protocol, seed)
                out = out_root / variant.name
                t0 = time.perf_counter()
                run_study(variant, open_storage(out))
                wall = time.perf_counter() - t0
                trials = pd.read_parquet(out / "trials.parquet")
                metric = search.metric
                if protocol == "task1":
                    best = float(trials.loc[trials.stage == "final", metric].iloc[0])
                else:
                    done = trials[(trials.stage == "search") & (trials.status == "completed")]
                    best = float((done[metric] * sign).max() * sign)
                if protocol == "fifo":
                    fifo_values = sorted(trials.loc[trials.stage == "search", metric].astype(float) * sign, reverse=True)
                rank = 1 + sum(v > best * sign + 1e-9 for v in fifo_values) if fifo_values else None
                rows.append({"study": study.name, "seed": seed, "protocol": protocol, "metric": metric,
                             "best": best, "rank_in_fifo": rank, "n_fifo": len(fifo_values),
                             "trial_time_s": float(trials.wall_time_s.fillna(0).sum()), "wall_s": wall,
                             "n_trials": int((trials.stage == "search").sum()),
                             "stopped": int((trials.status == "stopped").sum())})  # fmt: skip
                r = rows[-1]
                print(f"{study.name:<16} seed {seed} {protocol:<6} best {metric} {best:6.1f}  rank {rank}/{len(fifo_values)}"
                      f"  trial time {r['trial_time_s']:7.1f} s  wall {wall:6.1f} s  stopped {r['stopped']}", flush=True)

    df = pd.DataFrame(rows)
    print("\nmedians over sampler seeds")
    print(f"{'study':<16}{'protocol':<9}{'best':>7}{'gap to FIFO':>13}{'rank':>6}{'trial time s':>14}{'of FIFO':>9}{'wall s':>8}")
    summary = []
    for name, g in df.groupby("study", sort=False):
        fifo = g[g.protocol == "fifo"].set_index("seed")
        for protocol, h in g.groupby("protocol", sort=False):
            h = h.set_index("seed")
            gap = statistics.median((h.best - fifo.best).tolist()) if len(fifo) else float("nan")
            share = statistics.median((h.trial_time_s / fifo.trial_time_s).tolist()) if len(fifo) else float("nan")
            row = {"study": name, "protocol": protocol, "best": statistics.median(h.best), "gap": gap,
                   "rank": statistics.median(h.rank_in_fifo.dropna()) if h.rank_in_fifo.notna().any() else None,
                   "trial_time_s": statistics.median(h.trial_time_s), "share": share, "wall_s": statistics.median(h.wall_s)}  # fmt: skip
            summary.append(row)
            print(f"{name:<16}{protocol:<9}{row['best']:7.1f}{gap:+13.1f}{row['rank'] or 0:6.1f}"
                  f"{row['trial_time_s']:14.1f}{share:8.0%}{row['wall_s']:8.1f}")
    write_json(args.json, {"benchmark": "search_efficiency", "runs": rows, "summary": summary})
    print(f"\nresults: {out_root}")


if __name__ == "__main__":
    main()
