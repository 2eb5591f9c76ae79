"""``mmcl``: run | resume | validate | plan | report | schema.

Exit status (``ray job submit`` reports a job FAILED for any but 0):

- 0: every stage ran to its end and no trial errored (beyond ``failure.max_errored_fraction``);
- 1: the study ran to its end and wrote its results, but trials errored beyond
  ``failure.max_errored_fraction`` (default 0: any errored trial), or a stage had every
  trial errored; the summary names each errored trial and its error;
- 2: a problem the user can fix (a bad study file, missing data or weights, an
  unreachable cluster, unwritable storage, a missing package): one message, no traceback;
- 3: interrupted (SIGINT / SIGTERM, or a stage cut off); ``mmcl resume DIR`` continues.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from mmcl.interrupt import EXIT_INTERRUPTED
from mmcl.spec import SpecError, StudySpec, load_study, parse_study
from mmcl.storage import Storage, StorageError
from mmcl.study import STATE_KEY

EXIT_OK, EXIT_TRIALS_ERRORED, EXIT_USAGE = 0, 1, 2


def _load(path: str, smoke: bool) -> StudySpec:
    from mmcl.study import resolve_paths, smoke as shrink

    study = load_study(path)
    if smoke:
        study = shrink(study)
    return resolve_paths(study, Path.cwd())


def _print_summary(out: Storage, study: StudySpec) -> int:
    """Print the stage table and the errored trials; return the exit status."""
    import analysis
    from analysis.report import write_report
    from analysis.report_html import write_html_report
    from analysis.tables import summary_table

    res = analysis.load(out)
    table = summary_table(res)
    print("\n" + table.to_string(index=False) if len(table) else "(no trials)")
    from mmcl.study import tuning_notes

    for st, note in tuning_notes(study).items():
        # Numbers of a search tuned on a subset are not comparable with the full run's.
        print(f"{st}: {note.sentence()}")
    md = write_report(out)
    print(f"\nresults: {out.where()}\nreport:  {md}\n         {write_html_report(out)}")
    code, lines = errored_verdict(res.trials, study.failure.max_errored_fraction)
    if lines:
        print("\n" + "\n".join(lines), file=sys.stderr)
    return code


def errored_verdict(trials, max_fraction: float) -> tuple[int, list[str]]:
    """(exit status, lines naming every errored trial) for a finished study's trials."""
    if trials is None or not len(trials):
        return EXIT_OK, []
    err = trials[trials["status"] == "error"]
    if not len(err):
        return EXIT_OK, []
    lines = [f"{len(err)} of {len(trials)} trial(s) errored:"]
    for _, t in err.iterrows():
        first = (str(t["error"] or "").strip().splitlines() or ["(no message)"])[0]
        lines.append(f"  {t['stage']}/{t['trial_id']} ({t['variant']}, seed {t['seed']}): {first[:300]}")
    all_failed = [st for st, g in trials.groupby("stage", sort=False) if (g["status"] == "error").all()]
    fraction = len(err) / len(trials)
    if all_failed:
        lines.append(f"every trial of stage(s) {', '.join(all_failed)} errored: exit status 1")
        return EXIT_TRIALS_ERRORED, lines
    if fraction > max_fraction:
        lines.append(
            f"{fraction:.0%} of the trials errored, above failure.max_errored_fraction "
            f"({max_fraction:g}): exit status 1"
        )
        return EXIT_TRIALS_ERRORED, lines
    lines.append(f"within failure.max_errored_fraction ({max_fraction:g}): exit status 0")
    return EXIT_OK, lines


def cmd_run(args: argparse.Namespace) -> int:
    from mmcl.study import run_study

    study = _load(args.study, args.smoke)
    out = Storage.open(args.output) if args.output else Storage.open(study.storage) / study.name
    if out.is_file(STATE_KEY):
        raise SpecError(
            f"{out.where()} already holds results of a study; continue it with `mmcl resume {shlex.quote(out.uri)}` "
            f"or pass another --output"
        )
    run_study(study, out, verbose=args.verbose)
    return _print_summary(out, study)


def cmd_resume(args: argparse.Namespace) -> int:
    import yaml

    from mmcl.study import run_study

    out = Storage.open(args.dir)
    if not out.is_file("study.yaml"):
        raise SpecError(f"{out.where()}: not a study output directory (no study.yaml); start it with `mmcl run`")
    study = parse_study(yaml.safe_load(out.read_text("study.yaml")), out.where("study.yaml"))
    run_study(study, out, resume=True, verbose=args.verbose)
    return _print_summary(out, study)


def cmd_validate(args: argparse.Namespace) -> int:
    from mmcl.study import check_study_data, plan_stage

    study = _load(args.study, smoke=False)
    n = sum(plan_stage(study, i, Path("."), {}).num_trials for i in range(len(study.stages)))
    data = ""
    if args.check_data:
        check_study_data(study)
        data = f"; data found under {study.run.benchmark.root}" if study.run.benchmark.root else "; no data to check"
    print(f"{args.study}: ok ({study.name}: {len(study.stages)} stage(s), {n} trial(s){data})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mmcl.study import describe_plan

    print(describe_plan(_load(args.study, args.smoke), params=not args.no_params))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from mmcl.schema import study_schema

    print(json.dumps(study_schema(), indent=1, sort_keys=True))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import build_report, write_report
    from mmcl.results import consolidate

    out = Storage.open(args.dir)
    if not out.exists():
        raise SpecError(f"{out.where()}: no such results directory")
    if out.exists("parts"):
        consolidate(out)
    from analysis.report_html import write_html_report

    print(build_report(out))
    print(f"\nwritten: {write_report(out)}\n         {write_html_report(out)}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``mmcl cache build STUDY``: decode the study's images now (as ``mmcl run`` would
    before its first trial); ``mmcl cache info``: list the entries of a cache folder."""
    from mmcl.data import image_cache

    if args.action == "build":
        if not args.study:
            raise SpecError("mmcl cache build: name the study whose images to decode (mmcl cache build STUDY.yaml)")
        from mmcl.backbones import ensure_pretrained
        from mmcl.study import build_image_caches, check_study_data

        study = _load(args.study, args.smoke)
        check_study_data(study)
        b = study.run.backbone
        if b.kind == "open_clip" and b.pretrained == "synthetic" and not b.checkpoint:
            ensure_pretrained(b)  # the cache keys follow the backbone's own transform
        built = build_image_caches(study)
        print("\n".join(built) if built else f"{args.study}: no benchmark of this study uses the image cache")
        return 0
    root = image_cache.cache_root(args.dir)
    rows = image_cache.describe(root)
    total = sum(r["bytes"] for r in rows)
    print(f"image cache {root}: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, {total / 2**30:.2f} GiB")
    for r in rows:
        print(f"  {r['key']}  {r['what']}: {r['images']} images at {r['size']} px, "
              f"{r['bytes'] / 2**20:.1f} MiB, built in {r['built_s']} s")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcl", description="Hyperparameter and ablation studies for continual learning")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run every stage of a study")
    r.add_argument("study", help="study YAML file")
    r.add_argument("--output", help="results directory or bucket URI, e.g. s3://bucket/x (default: <storage>/<study name>)")
    r.add_argument("--smoke", action="store_true", help="shrink the study to a quick check")
    r.add_argument("-v", "--verbose", action="store_true", help="also show Ray's and Tune's own output (trial tables, INFO logs)")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("resume", help="continue an interrupted study")
    s.add_argument("dir", help="the study's results directory or URI (from any machine)")
    s.add_argument("-v", "--verbose", action="store_true", help="also show Ray's and Tune's own output")
    s.set_defaults(fn=cmd_resume)
    v = sub.add_parser("validate", help="check a study file (no Ray, no data, no GPU)")
    v.add_argument("study")
    v.add_argument(
        "--check-data", action="store_true",
        help="also open every data root the study's trials read (existence of files, no decoding)",
    )
    v.set_defaults(fn=cmd_validate)
    pl = sub.add_parser("plan", help="show stages, trial counts and resources")
    pl.add_argument("study")
    pl.add_argument("--smoke", action="store_true")
    pl.add_argument(
        "--no-params", action="store_true",
        help="skip the trainable-parameter counts (each method on the study's backbone, from its config on the meta device)",
    )
    pl.set_defaults(fn=cmd_plan)
    sc = sub.add_parser("schema", help="print the study file's JSON Schema (for editors: > studies/study.schema.json)")
    sc.set_defaults(fn=cmd_schema)
    rp = sub.add_parser("report", help="print the paper tables of a results directory")
    rp.add_argument("dir", help="results directory or URI")
    rp.set_defaults(fn=cmd_report)
    ca = sub.add_parser("cache", help="the node's pre-decoded image cache: build it for a study ahead of time, or list it")
    ca.add_argument("action", choices=["build", "info"])
    ca.add_argument("study", nargs="?", help="build: the study YAML whose images to decode")
    ca.add_argument("--smoke", action="store_true", help="build: for the --smoke version of the study")
    ca.add_argument("--dir", help="the cache folder (default <$MMCL_CACHE or ~/.cache/mmcl>/images)")
    ca.set_defaults(fn=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mmcl import interrupt
    from mmcl.study import StageInterrupted, StageStarved

    if args.command in ("run", "resume"):
        interrupt.install()
    try:
        return args.fn(args)
    except (SpecError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        # A package this command needs is not in the environment (e.g. a partial install);
        # one of the project's own modules missing is a bug, with its traceback.
        if (e.name or "").split(".")[0] in ("mmcl", "cl_methods", "search_spaces", "analysis"):
            raise
        print(f"error: the Python package {e.name!r} is not installed in this environment, and `mmcl "
              f"{args.command}` needs it; fix: `uv sync` in the project (or `pip install {e.name}`)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    except StageStarved as e:  # resumable like an interrupted stage, but the cluster's fault
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StageInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted; continue with `mmcl resume <results dir>`", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
