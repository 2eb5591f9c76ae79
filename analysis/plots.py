"""Figures of a results directory, for notebooks, reports and papers.

    import analysis
    from analysis import plots
    res = analysis.load("results/quickstart")
    plots.accuracy_heatmap(res, "a1b2c3").savefig("matrix.png")

Every function takes :class:`analysis.Results` and returns a matplotlib ``Figure`` built
with the object-oriented API (no pyplot, no global state, no display needed: headless on a
cluster node or in CI). matplotlib is imported on first use.

- :func:`accuracy_heatmap`: one trial's accuracy matrix, rows = after task i (row 0, the
  zero-shot evaluation, marked), columns = evaluated task in training order;
- :func:`task_curves`: each task's accuracy as later tasks are trained (forgetting is the
  fall of a line after its own task);
- :func:`ablation_bars`: mean of a metric per variant with the std over seeds as error bars;
- :func:`order_robustness_plot`: a box and the points per task order (seeds pooled);
- :func:`search_history`: each search trial's objective, trials ASHA stopped
  drawn at the task they stopped after (their score is not comparable: nothing forgotten yet);
- :func:`param_importance`: Optuna's fANOVA importance of each searched parameter, from
  the stage's own Optuna journal;
- :func:`avg_vs_last`: Avg against Last per trial (a method that forgets sits far below
  the diagonal).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from analysis import Results

SEARCH_VARIANT = "search"


def _figure(width: float = 6.0, height: float = 4.0) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _trial_rows(res: Results, trial_id: str, stage: str | None) -> pd.DataFrame:
    acc = res.accuracy
    rows = acc[acc["trial_id"] == trial_id]
    if stage is not None:
        rows = rows[rows["stage"] == stage]
    if rows.empty:
        known = ", ".join(map(str, acc["trial_id"].unique()[:10])) or "none"
        raise KeyError(f"no accuracy rows for trial {trial_id!r} in {res.path} (trials: {known})")
    if rows["stage"].nunique() > 1:
        raise KeyError(f"trial {trial_id!r} is in several stages ({', '.join(rows['stage'].unique())}): pass stage=")
    return rows


def trial_matrix(res: Results, trial_id: str, stage: str | None = None) -> pd.DataFrame:
    """The accuracy matrix of one trial: index = step (0 = zero-shot), columns = eval tasks
    in training order."""
    rows = _trial_rows(res, trial_id, stage)
    order = rows.sort_values("eval_position").drop_duplicates("eval_task")["eval_task"].tolist()
    mat = rows.pivot_table(index="step", columns="eval_task", values="value", aggfunc="first")
    return mat.reindex(columns=order).sort_index()


def accuracy_heatmap(res: Results, trial_id: str, stage: str | None = None) -> Figure:
    """One trial's accuracy matrix as a heatmap with the value in each cell."""
    import numpy as np

    mat = trial_matrix(res, trial_id, stage)
    fig = _figure(1.2 + 0.9 * mat.shape[1], 1.0 + 0.55 * mat.shape[0])
    ax = fig.add_subplot()
    im = ax.imshow(mat.to_numpy(dtype=float), cmap="viridis", aspect="auto", vmin=0)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_xticks(range(mat.shape[1]), [str(c) for c in mat.columns], rotation=45, ha="right")
    ax.set_yticks(range(mat.shape[0]), ["zero-shot" if s == 0 else f"after {s}" for s in mat.index])
    ax.set_xlabel("evaluated task (training order)")
    ax.set_ylabel("after training task")
    top = float(np.nanmax(mat.to_numpy(dtype=float))) if mat.size else 0.0
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            v = mat.iat[i, j]
            if v == v:  # not NaN; dark text on viridis' light (high) end
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="black" if v > 0.6 * top else "white")
    if 0 in mat.index:  # the zero-shot row: a frame, so nobody reads it as a trained row
        from matplotlib.patches import Rectangle

        r = list(mat.index).index(0)
        ax.add_patch(Rectangle((-0.5, r - 0.5), mat.shape[1], 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title(f"accuracy matrix of {trial_id}")
    return fig


def task_curves(res: Results, trial_id: str, stage: str | None = None) -> Figure:
    """Accuracy of each task (one line each) after every training task."""
    mat = trial_matrix(res, trial_id, stage)
    fig = _figure()
    ax = fig.add_subplot()
    for j, task in enumerate(mat.columns):
        col = mat[task]
        ax.plot(col.index, col.to_numpy(dtype=float), marker="o", label=str(task))
        if (j + 1) in col.index:  # the step right after its own training
            ax.axvline(j + 1, color="grey", alpha=0.15)
    ax.set_xticks(list(mat.index), ["zero-shot" if s == 0 else str(s) for s in mat.index])
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"per-task accuracy of {trial_id}")
    ax.legend(fontsize=7, ncols=2)
    return fig


def _stage_metrics(res: Results, stage: str | None, kind: str) -> tuple[pd.DataFrame, str]:
    """The trials of ``stage`` (or of the first stage of ``kind``), as analysis/tables reads them."""
    from analysis.tables import _trials, stage_kind

    if stage is None:
        df = res.metrics()
        stages = [s for s, g in df.groupby("stage", sort=False) if stage_kind(g) == kind]
        if not stages:
            raise KeyError(f"no {kind} stage in {res.path}")
        stage = stages[0]
    return _trials(res, stage), stage


def ablation_bars(res: Results, stage: str | None = None, metric: str = "avg") -> Figure:
    """Mean ``metric`` per variant (completed trials), error bars = std over seeds."""
    df, stage = _stage_metrics(res, stage, "ablation")
    df = df[df["status"] == "completed"]
    g = df.groupby("variant", sort=False)[metric]
    means, stds, counts = g.mean(), g.std(), g.size()
    fig = _figure(1.5 + 0.8 * len(means), 4.0)
    ax = fig.add_subplot()
    x = range(len(means))
    ax.bar(x, means.to_numpy(), yerr=stds.fillna(0).to_numpy(), capsize=4, color="tab:blue")
    ax.set_xticks(list(x), [f"{v}\n(n={counts[v]})" for v in means.index])
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"ablation: {stage}")
    return fig


def order_robustness_plot(res: Results, stage: str | None = None, metric: str = "avg") -> Figure:
    """Per task order: a box over its seeds' ``metric`` and every trial as a point."""
    df, stage = _stage_metrics(res, stage, "orders")
    df = df[df["status"] == "completed"]
    orders = list(dict.fromkeys(df["order_id"]))
    data = [df.loc[df["order_id"] == o, metric].astype(float).to_numpy() for o in orders]
    fig = _figure(1.5 + 0.9 * len(orders), 4.0)
    ax = fig.add_subplot()
    ax.boxplot(data, positions=range(len(orders)), widths=0.5)
    for i, values in enumerate(data):
        ax.scatter([i] * len(values), values, color="tab:orange", zorder=3, s=18)
    ax.set_xticks(range(len(orders)), orders, rotation=30, ha="right")
    ax.set_xlabel("task order")
    ax.set_ylabel(metric)
    ax.set_title(f"order robustness: {stage} (all: {df[metric].mean():.1f} ± {df[metric].std():.1f})")
    return fig


def search_history(res: Results, stage: str | None = None, metric: str = "avg") -> Figure:
    """Each search trial's ``metric`` (one slot per trial, errored ones too); trials ASHA
    stopped are marked apart and labelled with the task they stopped after."""
    df, stage = _stage_metrics(res, stage, "search")
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    x = list(range(len(df)))
    done = (df["status"] == "completed").to_numpy()
    y = df[metric].astype(float).to_numpy()
    ax.scatter([i for i, d in zip(x, done) if d], y[done], label="completed", color="tab:blue", zorder=3)
    stopped = (df["status"] == "stopped").to_numpy()
    ax.scatter([i for i, s in zip(x, stopped) if s], y[stopped], label="stopped (score after its last task)",
               marker="x", color="tab:red", zorder=3)  # fmt: skip
    for i, (_, t) in enumerate(df.iterrows()):
        if t["status"] == "stopped" and t[metric] == t[metric]:
            ax.annotate(f"task {t['n_tasks_trained']}", (i, t[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xticks(x, [str(t)[:8] for t in df["trial_id"]], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"search: {stage}")
    ax.legend(fontsize=7)
    return fig


def param_importance(res: Results, stage: str | None = None, rung: int | None = None) -> Figure:
    """Optuna's importance (fANOVA) of each searched parameter at one task index, over
    every trial that reached it, the ones ASHA stopped included (analysis/importance.py),
    read from the stage's journal (``<results>/optuna/<stage>.journal``; a local results
    directory)."""
    from analysis.importance import load_search_study, rung_importance

    _, stage = _stage_metrics(res, stage, "search")
    study = load_search_study(res.path, stage)
    fig = _figure()
    ax = fig.add_subplot()
    try:
        r = rung_importance(study, rung=rung)
    except ValueError as e:  # too few trials: say so in the picture
        ax.text(0.5, 0.5, str(e), ha="center", va="center")
        ax.set_axis_off()
        return fig
    names = list(r.importances)[::-1]
    ax.barh(names, [r.importances[n] for n in names], color="tab:green")
    ax.set_xlabel(f"importance (fANOVA at task {r.rung}, {r.n_trials} trials, {r.n_pruned} stopped by ASHA)")
    ax.set_title(f"parameter importance: {stage}")
    return fig


def avg_vs_last(res: Results, stage: str | None = None) -> Figure:
    """Avg against Last for every trial that trained every task, one colour per stage."""
    df = res.metrics()
    if stage is not None:
        df = df[df["stage"] == stage]
    df = df[df["status"] == "completed"]
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    for st, g in df.groupby("stage", sort=False):
        ax.scatter(g["avg"].astype(float), g["last"].astype(float), label=str(st), s=22)
    values = [*df["avg"].astype(float), *df["last"].astype(float)] or [0.0, 100.0]
    lo, hi = min(values) - 2.0, max(values) + 2.0  # the trials' range: their spread stays visible
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("Avg")
    ax.set_ylabel("Last")
    ax.set_title("Avg vs Last per trial")
    ax.legend(fontsize=7)
    return fig


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (what the HTML report embeds)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


__all__ = [
    "ablation_bars", "accuracy_heatmap", "avg_vs_last", "order_robustness_plot", "param_importance", "png_bytes",
    "search_history", "task_curves", "trial_matrix",
]  # fmt: skip
