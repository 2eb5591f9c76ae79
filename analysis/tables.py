"""Paper tables from a :class:`analysis.Results`.

Percent figures are shown with one decimal. ``formatted=True`` tables hold strings
("mean ± std"); ``formatted=False`` keeps the unrounded numbers for further computation.
Standard deviations are sample standard deviations (ddof = 1) over seeds (and orders);
a single run has no std and is shown as its mean alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from analysis import Results

SEARCH_VARIANT = "search"
LEADERBOARD_METRICS: list[str] = ["avg", "last", "transfer", "bwt"]
ABLATION_METRICS: list[str] = ["avg", "last", "transfer", "bwt", "forgetting"]
SUMMARY_METRICS: list[str] = ["avg", "last", "transfer", "bwt"]
MISSING = "–"


def fmt_pct(x: object) -> str:
    """One decimal, or a dash for a missing value."""
    if x is None or (not isinstance(x, (str, tuple, list)) and bool(pd.isna(x))):
        return MISSING
    try:
        return f"{float(x):.1f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(x)


def fmt_mean_std(mean: float, std: float) -> str:
    """"mean ± std" with one decimal; the mean alone when there is no std (a single run)."""
    if mean is None or bool(pd.isna(mean)):
        return MISSING
    if std is None or bool(pd.isna(std)):
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {std:.1f}"


def _trials(results: Results, stage: str | None) -> pd.DataFrame:
    df = results.metrics()
    if stage is not None:
        if stage not in set(df["stage"]):
            known = ", ".join(map(str, pd.unique(df["stage"]))) or "none"
            raise KeyError(f"no stage {stage!r} in {results.path} (stages: {known})")
        df = df[df["stage"] == stage]
    return df


def _completed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "completed"]


def _ordered_unique(values: pd.Series, first: str | None = None) -> list:
    seen = list(pd.unique(values.dropna()))
    if first is not None and first in seen:
        seen.remove(first)
        seen.insert(0, first)
    return seen


def search_leaderboard(results: Results, stage: str | None = None, metric: str = "avg", top: int | None = 10) -> pd.DataFrame:
    """Search trials (variant ``search``): completed runs first, best ``metric`` first.

    Trials ASHA stopped early are listed after every completed one: their score covers
    only the first tasks (nothing forgotten yet) and is not comparable.

    Columns: ``stage`` (only when ``stage`` is None), trial_id, status, n_tasks_trained,
    avg/last/transfer/bwt (and ``metric`` if another), then the sampled configuration
    (``config/`` prefix dropped; keys no listed trial has are left out).
    """
    df = _trials(results, stage)
    df = df[df["variant"] == SEARCH_VARIANT]
    if metric not in df.columns:
        raise KeyError(f"unknown metric {metric!r}")
    df = df.assign(_rank=(df["status"] != "completed").astype(int))
    df = df.sort_values(["_rank", metric], ascending=[True, False], na_position="last", kind="stable")
    if top is not None:
        df = df.head(top)
    metrics = LEADERBOARD_METRICS + ([metric] if metric not in LEADERBOARD_METRICS else [])
    config = [c for c in df.columns if c.startswith("config/") and df[c].notna().any()]
    cols = (["stage"] if stage is None else []) + ["trial_id", "status", "n_tasks_trained", *metrics, *config]
    out = df[cols].copy()
    out[metrics] = out[metrics].astype(float).round(1)
    out = out.rename(columns={c: c.removeprefix("config/") for c in config})
    return out.reset_index(drop=True)


def _mean_std_table(df: pd.DataFrame, by: list[str], metrics: list[str], formatted: bool) -> pd.DataFrame:
    """Mean and std of ``metrics`` per group of ``by`` (groups in order of appearance)."""
    grouped = df.groupby(by, sort=False, dropna=False)
    stats = grouped[metrics].agg(["mean", "std"])
    stats[("n", "count")] = grouped.size()
    if formatted:
        out = pd.DataFrame(index=stats.index)
        for m in metrics:
            out[m] = [fmt_mean_std(mu, sd) for mu, sd in zip(stats[(m, "mean")], stats[(m, "std")])]
        out["n"] = stats[("n", "count")].astype(int)
        return out
    return stats


def stage_kind(trials: pd.DataFrame) -> str:
    """What a stage's trials are, read off their metadata (the rules ``stage=None`` uses).

    ``search``: its trials have variant ``search``; ``orders``: order_id takes more than
    one value; ``ablation``: any other stage (one task order, named variants).
    """
    if (trials["variant"] == SEARCH_VARIANT).any():
        return "search"
    if trials["order_id"].nunique(dropna=True) > 1:
        return "orders"
    return "ablation"


def _ablation_stages(df: pd.DataFrame) -> list:
    """Non-search stages run with one task order (order stages go to order_robustness)."""
    return [st for st, g in df.groupby("stage", sort=False) if stage_kind(g) == "ablation"]


def ablation_table(results: Results, stage: str | None = None, formatted: bool = True) -> pd.DataFrame:
    """Per variant: mean ± std over seeds (completed trials) of avg/last/transfer/bwt/forgetting, and n.

    With ``stage`` None, every non-search stage that used a single task order, indexed
    by (stage, variant) when there is more than one. ``formatted=False`` gives numeric
    MultiIndex columns ``(metric, mean|std)`` and ``("n", "count")``.
    """
    df = _trials(results, stage)
    df = _completed(df[df["variant"] != SEARCH_VARIANT])
    if stage is None:
        stages = _ablation_stages(df)
        df = df[df["stage"].isin(stages)]
    by = ["stage", "variant"] if stage is None and df["stage"].nunique() > 1 else ["variant"]
    if df.empty:
        return _empty_stats(by, ABLATION_METRICS, formatted)
    # "full" (the method as configured) first, then variants in the order they ran.
    rank = {v: i for i, v in enumerate(_ordered_unique(df["variant"], first="full"))}
    df = df.assign(_r=df["variant"].map(rank)).sort_values("_r", kind="stable").drop(columns="_r")
    return _mean_std_table(df, by, ABLATION_METRICS, formatted)


def _empty_stats(by: list[str], metrics: list[str], formatted: bool) -> pd.DataFrame:
    index = pd.MultiIndex.from_arrays([[] for _ in by], names=by) if len(by) > 1 else pd.Index([], name=by[0])
    if formatted:
        return pd.DataFrame(columns=[*metrics, "n"], index=index)
    cols = pd.MultiIndex.from_tuples([(m, s) for m in metrics for s in ("mean", "std")] + [("n", "count")])
    return pd.DataFrame(columns=cols, index=index)


def order_robustness(results: Results, stage: str | None = None, formatted: bool = True) -> pd.DataFrame:
    """Per stage run over several task orders: mean ± std over orders and seeds pooled.

    Completed non-search trials only; ``n_orders`` counts the distinct orders. With
    ``stage`` None, every stage whose ``order_id`` takes more than one value.
    """
    df = _completed(_trials(results, stage))
    df = df[df["variant"] != SEARCH_VARIANT]
    if stage is None:
        multi = df.groupby("stage", sort=False)["order_id"].nunique()
        df = df[df["stage"].isin(multi[multi > 1].index)]
    if df.empty:
        out = _empty_stats(["stage"], ABLATION_METRICS, formatted)
        out["n_orders"] = pd.Series(dtype=int)
        return out
    out = _mean_std_table(df, ["stage"], ABLATION_METRICS, formatted)
    n_orders = df.groupby("stage", sort=False)["order_id"].nunique()
    out[("n_orders", "count") if not formatted else "n_orders"] = n_orders
    return out


def order_breakdown(results: Results, stage: str, formatted: bool = True) -> pd.DataFrame:
    """One row per task order of ``stage``: mean ± std over seeds (completed trials)."""
    df = _completed(_trials(results, stage))
    df = df[df["variant"] != SEARCH_VARIANT]
    by = ["order_id", "order"] if df["order"].notna().any() else ["order_id"]
    if df.empty:
        return _empty_stats(by, ABLATION_METRICS, formatted)
    df = df.sort_values("order_id", kind="stable")
    return _mean_std_table(df, by, ABLATION_METRICS, formatted)


def summary_table(results: Results) -> pd.DataFrame:
    """One row per stage (in the order they ran): its :func:`stage_kind`, trial counts by
    status, then best (max) and mean over completed trials of avg, last, transfer and bwt,
    one decimal. This is what ``mmcl run`` prints at the end."""
    df = results.metrics()
    cols = ["stage", "kind", "n_trials", "n_completed", "n_stopped", "n_error"]
    cols += [f"{kind}_{m}" for m in SUMMARY_METRICS for kind in ("best", "mean")]
    rows = []
    for st, g in df.groupby("stage", sort=False):
        done = _completed(g)
        row: dict[str, object] = {
            "stage": st,
            "kind": stage_kind(g),
            "n_trials": len(g),
            "n_completed": int((g["status"] == "completed").sum()),
            "n_stopped": int((g["status"] == "stopped").sum()),
            "n_error": int((g["status"] == "error").sum()),
        }
        for m in SUMMARY_METRICS:
            vals = done[m].astype(float).dropna()
            row[f"best_{m}"] = round(float(vals.max()), 1) if len(vals) else float("nan")
            row[f"mean_{m}"] = round(float(vals.mean()), 1) if len(vals) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)
