"""Markdown report of a results directory (``mmcl report DIR`` prints it, writes DIR/report.md)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.metrics import task_order
from analysis.tables import (
    ablation_table,
    fmt_pct,
    order_breakdown,
    order_robustness,
    search_leaderboard,
    summary_table,
)

if TYPE_CHECKING:
    from analysis import Results
    from mmcl.study import TuningNote

REPORT_NAME = "report.md"
log = logging.getLogger(__name__)


def _cell(x: object) -> str:
    if x is None or (not isinstance(x, (tuple, list, str)) and bool(pd.isna(x))):
        return "–"
    if isinstance(x, float):
        # General format keeps tiny hyperparameters (lr 1e-05) readable; percent columns
        # arrive already rounded to one decimal.
        return f"{x:.6g}"
    if isinstance(x, tuple):
        return " / ".join(_cell(v) for v in x)
    # Pipes would split the cell in Markdown.
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    """A GitHub-flavoured Markdown table (tabulate is not a dependency)."""
    if index:
        df = df.reset_index()
    headers = [_cell(c) for c in df.columns]
    rows = [[_cell(v) for v in rec] for rec in df.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns] if len(df.columns) else []
    sep = ["---:" if num else "---" for num in numeric]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


PERCENT_COLUMNS: frozenset[str] = frozenset(
    {"avg", "last", "transfer", "bwt", "fwt", "faa", "faa_weighted", "forgetting", "acc_seen"}
)


def _pct(df: pd.DataFrame) -> pd.DataFrame:
    """Percent columns as one-decimal strings (so 50 prints as 50.0), others untouched."""
    out = df.copy()
    for c in out.columns:
        name = str(c).removeprefix("best_").removeprefix("mean_")
        if name in PERCENT_COLUMNS and pd.api.types.is_numeric_dtype(out[c]):
            out[c] = [fmt_pct(v) for v in out[c]]
    return out


def _section(title: str, body: str, level: int = 2) -> list[str]:
    return ["#" * level + " " + title, "", body, ""]


def _or_none(df: pd.DataFrame, index: bool, what: str) -> str:
    return markdown_table(df, index=index) if len(df) else f"_No {what}._"


def _best_trial(df: pd.DataFrame) -> pd.Series | None:
    done = df[(df["status"] == "completed") & df["avg"].notna()]
    if done.empty:
        return None
    return done.loc[done["avg"].astype(float).idxmax()]


def accuracy_matrix(results: Results, stage: str, trial_id: str) -> pd.DataFrame:
    """Rows = step (0 = zero-shot), columns = eval tasks in training order, one decimal."""
    acc = results.accuracy
    g = acc[(acc["stage"] == stage) & (acc["trial_id"] == trial_id)]
    if g.empty:
        return pd.DataFrame()
    # Same column order as the metrics (eval_position, or else the step that trained a task).
    order = task_order(g.assign(eval_task=g["eval_task"].astype(str)), f"{stage}/{trial_id}")
    mat = g.assign(eval_task=g["eval_task"].astype(str)).pivot_table(
        index="step", columns="eval_task", values="value", aggfunc="last"
    )
    mat = mat.reindex(columns=order)
    trained = g.drop_duplicates("step").set_index("step")["trained_task"].reindex(mat.index)
    out = pd.DataFrame({"step": mat.index.astype(int), "trained": trained.fillna("").replace("", "(zero-shot)")})
    for task in order:
        out[task] = [fmt_pct(v) for v in mat[task]]
    return out.reset_index(drop=True)


def _stages(res: Results) -> list:
    m = res.metrics()
    return list(pd.unique(m["stage"].dropna())) if len(m) else []


def tuning_notes(path: Any) -> dict[str, "TuningNote"]:
    """Which stages' numbers were tuned on other data than the trials' own (a search with
    ``tune_on``, and the stages that start from it), from the results directory's
    study.yaml: stage -> one sentence (:func:`mmcl.study.tuning_notes`). Empty when the
    directory has no readable study.yaml (tables copied without it)."""
    import yaml

    from mmcl.spec import SpecError, StudySpec
    from mmcl.storage import open_storage
    from mmcl.study import tuning_notes as notes_of

    store = open_storage(path)
    if not store.is_file("study.yaml"):
        return {}
    try:
        return notes_of(StudySpec.model_validate(yaml.safe_load(store.read_text("study.yaml"))))
    except (ValueError, SpecError, yaml.YAMLError) as e:  # pydantic's ValidationError is a ValueError
        log.warning("%s: cannot say which data tuned which stage (%s)", store.where("study.yaml"), e)
        return {}


def build_report(path: Any) -> str:
    """The whole report as Markdown: summary, leaderboards, ablations, orders, best matrices."""
    import analysis

    res = analysis.load(path)
    metrics = res.metrics()
    lines = [f"# Study report: {res.study}", "", f"Results directory: `{res.path}`", ""]
    if metrics.empty:
        lines += ["_No trials recorded yet._", ""]
        return "\n".join(lines)

    lines += _section("Summary (Avg / Last / Transfer / BWT per stage)", markdown_table(_pct(summary_table(res))))
    tuned = tuning_notes(res.path)
    if tuned:
        lines += _section("Tuning data", "\n".join(f"- **{st}**: {note.sentence()}." for st, note in tuned.items()))

    search_stages = list(pd.unique(metrics.loc[metrics["variant"] == "search", "stage"]))
    for st in search_stages:
        where = f" (tuned on {tuned[st].data})" if st in tuned else ""
        lines += _section(f"Search leaderboard: {st}{where}", _or_none(_pct(search_leaderboard(res, stage=st)), False, "trials"))
        lines += _importance_section(res, st)

    ablation = ablation_table(res)
    if len(ablation):
        lines += _section("Ablations (mean ± std over seeds)", markdown_table(ablation, index=True))

    robust = order_robustness(res)
    if len(robust):
        parts = [markdown_table(robust, index=True)]
        for st in robust.index:
            parts += ["", f"Per order, {st}:", "", markdown_table(order_breakdown(res, st), index=True)]
        lines += _section("Task-order robustness (mean ± std over orders and seeds)", "\n".join(parts))

    lines += ["## Accuracy matrix of the best completed trial per stage", ""]
    for st in _stages(res):
        best = _best_trial(metrics[metrics["stage"] == st])
        if best is None:
            lines += [f"### {st}", "", "_No completed trial._", ""]
            continue
        mat = accuracy_matrix(res, st, str(best["trial_id"]))
        head = f"### {st}: {best['trial_id']} (variant {best['variant']}, avg {fmt_pct(best['avg'])})"
        lines += [head, "", _or_none(mat, False, "accuracy rows"), ""]
    return "\n".join(lines)


def _importance_section(res: "Results", stage: str) -> list[str]:
    """fANOVA importance at a common task index over complete and stopped trials
    (analysis/importance.py); nothing when the stage has no local journal."""
    from analysis.importance import load_search_study, rung_importance

    try:
        r = rung_importance(load_search_study(res.path, stage))
    except (FileNotFoundError, ValueError):
        return []
    except Exception as e:  # noqa: BLE001 - the report ends a study: an evaluator's failure must not
        return _section(f"Parameter importance: {stage}", f"_Not computed: {type(e).__name__}: {e}_", level=3)
    df = pd.DataFrame({"parameter": list(r.importances), "importance": [f"{v:.3f}" for v in r.importances.values()]})
    note = f"fANOVA on the objective at task {r.rung}, over the {r.n_trials} trials that reached it ({r.n_pruned} stopped by ASHA)."
    return _section(f"Parameter importance: {stage}", note + "\n\n" + markdown_table(df), level=3)


def write_report(path: Any) -> Path | str:
    """Write :func:`build_report` to ``DIR/report.md`` (a local path or a bucket URI) and
    return where it went."""
    from mmcl.storage import open_storage

    store = open_storage(path)
    store.write_text(REPORT_NAME, build_report(store) + "\n")
    return store.local_path / REPORT_NAME if store.local_path else store.where(REPORT_NAME)


__all__: Sequence[str] = ["build_report", "write_report", "markdown_table", "accuracy_matrix"]
