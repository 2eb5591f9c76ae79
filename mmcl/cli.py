"""``mmcl``: run | resume | validate | plan | report.

Every user error (a bad study file, a missing dataset, an unfinished stage) is printed as
one clear message with exit status 2 (3 for an interrupted study); no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmcl.spec import SpecError, StudySpec, load_study, parse_study

EXIT_USAGE, EXIT_INTERRUPTED = 2, 3


def _load(path: str, smoke: bool) -> StudySpec:
    from mmcl.study import resolve_paths, smoke as shrink

    study = load_study(path)
    if smoke:
        study = shrink(study)
    return resolve_paths(study, Path.cwd())


def _print_summary(out: Path) -> None:
    import analysis
    from analysis.report import write_report
    from analysis.tables import summary_table

    res = analysis.load(out)
    table = summary_table(res)
    print("\n" + table.to_string(index=False) if len(table) else "(no trials)")
    print(f"\nresults: {out}\nreport:  {write_report(out)}")


def cmd_run(args: argparse.Namespace) -> int:
    from mmcl.study import run_study

    study = _load(args.study, args.smoke)
    out = Path(args.output).resolve() if args.output else Path(study.storage) / study.name
    if (out / "study_state.json").exists():
        raise SpecError(
            f"{out} already holds results of a study; continue it with `mmcl resume {out}` "
            f"or pass another --output"
        )
    run_study(study, out)
    _print_summary(out)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    import yaml

    from mmcl.study import run_study

    out = Path(args.dir).resolve()
    spec_file = out / "study.yaml"
    if not spec_file.exists():
        raise SpecError(f"{out}: not a study output directory (no study.yaml); start it with `mmcl run`")
    study = parse_study(yaml.safe_load(spec_file.read_text()), str(spec_file))
    run_study(study, out, resume=True)
    _print_summary(out)
    return 0


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

    print(describe_plan(_load(args.study, args.smoke)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import build_report, write_report
    from mmcl.results import consolidate

    out = Path(args.dir).resolve()
    if not out.is_dir():
        raise SpecError(f"{out}: no such results directory")
    if (out / "parts").exists():
        consolidate(out)
    print(build_report(out))
    print(f"\nwritten: {write_report(out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcl", description="Hyperparameter and ablation studies for continual learning")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run every stage of a study")
    r.add_argument("study", help="study YAML file")
    r.add_argument("--output", help="results directory (default: <storage>/<study name>)")
    r.add_argument("--smoke", action="store_true", help="shrink the study to a quick check")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("resume", help="continue an interrupted study")
    s.add_argument("dir", help="the study's results directory")
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
    pl.set_defaults(fn=cmd_plan)
    rp = sub.add_parser("report", help="print the paper tables of a results directory")
    rp.add_argument("dir")
    rp.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mmcl.study import StageInterrupted

    try:
        return args.fn(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted; continue with `mmcl resume <results dir>`", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
