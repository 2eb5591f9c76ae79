"""What a study's orchestration costs as it grows: one search stage of N seconds-long trials.

    uv run python benchmarks/study_scale.py                       # N = 25 50 100 200
    uv run python benchmarks/study_scale.py --trials 25 50 --repeats 1

Each N runs in a fresh driver process (so its peak memory is its own): the quickstart's
search space and run block, shrunk as ``--smoke`` shrinks it (3 tasks, 4 steps a task, 64
evaluation samples), one search stage of N trials, FIFO (every trial trains all 3 tasks:
equal work per trial, so what grows with N is orchestration), the study's 2 trials at a
time. Per N it prints:

- ``wall``: the study's wall time in the driver (``run_study``: Ray start, the stage,
  consolidation), the tiny CLIP's pretraining excluded (cached first);
- ``outside``: wall time not covered by trials, ``wall - sum(trial time) / 2``, where a
  trial's time is the engine's own (training + evaluation, ``wall_time_s``);
- ``per trial``: ``2 * outside / N``, slot-seconds a trial costs beyond its own work, and
  ``marginal``: the same between consecutive N (flat if nothing grows with N; a fixed
  cost such as Ray's start shows up in ``per trial`` only);
- ``consolidate``: the stage end's rebuild of the tables from ``parts/``, timed again on the
  finished folder (median of 3), with the part-file and row counts;
- ``driver RSS``: the driver's peak resident memory (``ru_maxrss``; Ray's own processes
  are not the driver);
- ``journal``: the Optuna journal's size.

Targets (issue #19): per-trial overhead flat in N, consolidation linear in rows and under
10 s at 200 trials, driver memory under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _figures import write_json

REPO = Path(__file__).resolve().parents[1]


def _one(n: int, out_root: Path) -> dict:
    """One study of ``n`` trials in this process; its figures."""
    import resource

    from mmcl.backbones import ensure_pretrained
    from mmcl.results import consolidate
    from mmcl.spec import SchedulerSpec, load_study
    from mmcl.storage import open_storage
    from mmcl.study import resolve_paths, run_study, smoke

    study = resolve_paths(load_study(REPO / "studies" / "quickstart.yaml"), Path.cwd())
    study = smoke(study)
    search = next(st for st in study.stages if st.kind == "search")
    search = search.model_copy(update={"num_samples": n, "scheduler": SchedulerSpec(kind="fifo"), "sampler_seed": 0})
    study = study.model_copy(update={"name": f"scale-{n}", "stages": [search], "storage": str(out_root)})
    ensure_pretrained(study.run.backbone)

    t0 = time.perf_counter()
    out = run_study(study, open_storage(out_root / study.name))
    wall = time.perf_counter() - t0

    storage = out
    trials = storage.read_parquet("trials.parquet")
    parts = storage.list_files("parts", suffix=".parquet")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        counts = consolidate(storage)
        times.append(time.perf_counter() - t)
    journal = sum(p.stat().st_size for p in (out_root / study.name).glob("optuna/*.journal"))
    return {
        "trials": n,
        "finished": int((trials.status == "TERMINATED").sum()) if "status" in trials else len(trials),
        "wall_s": wall,
        "trial_time_s": float(trials.wall_time_s.sum()),
        "concurrency": study.max_concurrent_trials,
        "consolidate_s": statistics.median(times),
        "part_files": len(parts),
        "rows": counts["accuracy"] + counts["curves"] + counts["trials"],
        "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "journal_kb": journal / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process's N
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one is not None:
        print("RESULT " + json.dumps(_one(args.one, Path(args.out))), flush=True)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="mmcl-scale-") as tmp:
        for n in args.trials:
            cmd = [sys.executable, __file__, "--one", str(n), "--out", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 * 60)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"the {n}-trial study failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            r = json.loads(line[len("RESULT ") :])
            r["outside_s"] = r["wall_s"] - r["trial_time_s"] / r["concurrency"]
            r["per_trial_s"] = r["concurrency"] * r["outside_s"] / n
            rows.append(r)
            print(f"{n} trials: wall {r['wall_s']:.0f} s, outside the trials {r['outside_s']:.0f} s", flush=True)

    print("\nOne search stage of N smoke-sized quickstart trials (FIFO, 2 at a time), one driver process per N")
    print(f"{'N':>5}{'wall s':>8}{'trials s':>10}{'outside s':>11}{'per trial s':>13}{'marginal s':>12}"
          f"{'consolidate s':>15}{'parts':>7}{'rows':>7}{'driver MB':>11}{'journal KB':>12}")  # fmt: skip
    prev = None
    for r in rows:
        marginal = "" if prev is None else f"{r['concurrency'] * (r['outside_s'] - prev['outside_s']) / (r['trials'] - prev['trials']):.2f}"
        print(f"{r['trials']:>5}{r['wall_s']:8.0f}{r['trial_time_s']:10.0f}{r['outside_s']:11.0f}{r['per_trial_s']:13.2f}"
              f"{marginal:>12}{r['consolidate_s']:15.2f}{r['part_files']:7d}{r['rows']:7d}{r['driver_rss_mb']:11.0f}"
              f"{r['journal_kb']:12.0f}")  # fmt: skip
        prev = r
    write_json(args.json, {"benchmark": "study_scale", "rows": rows})


if __name__ == "__main__":
    main()
