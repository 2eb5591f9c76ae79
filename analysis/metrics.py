"""Continual-learning metrics from an accuracy matrix.

Notation: ``R[i][j]`` is the accuracy (percent) on task ``j`` after training the ``i``-th
task, tasks (columns) in the trial's training order, 1-based; ``R[0]`` is the evaluation
before any training (zero-shot). ``T`` is the number of tasks trained (rows ``1..T``) and
``N`` the number of columns (every benchmark task; ``N >= T`` when a run stopped early).

- **avg** = mean_j mean_{1<=i<=T} R[i][j] over all N columns.
  ZSCL (Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
  Vision-Language Models", ICCV 2023) and DIKI (Tang et al., ECCV 2024), MTIL "Avg".
- **last** = mean_j R[T][j] over all N columns. ZSCL / DIKI, MTIL "Last".
- **transfer** = mean over columns j = 2..N of mean_{1<=i<min(j, T+1)} R[i][j]: accuracy on
  tasks not trained yet (only columns with at least one such row). ZSCL / DIKI, MTIL
  "Transfer".
- **faa** = mean_{j<=T} R[T][j], final average accuracy on the tasks trained so far;
  **faa_weighted** weights each task by its full test-set size (``n_samples``; NaN when
  the sizes are unknown): DGG's FAA. The engine reports the full size also when
  ``evaluation.max_samples`` scores fewer samples (their count is ``n_eval``), so the
  weights are the benchmark's, not the cap's. **acc_seen** is an alias of faa.
- **bwt** = mean_{j<T} (R[T][j] - R[j][j]) (backward transfer, negative = forgetting) and
  **fwt** = mean_{2<=j<=T} (R[j-1][j] - R[0][j]) (forward transfer, with the zero-shot row
  as the reference accuracy): GEM (Lopez-Paz & Ranzato, "Gradient Episodic Memory for
  Continual Learning", NeurIPS 2017).
- **forgetting** = mean_{j<T} (max_{j<=i<T} R[i][j] - R[T][j]): Chaudhry et al.,
  "Riemannian Walk for Incremental Learning", ECCV 2018.

bwt and forgetting need T >= 2; fwt needs T >= 2 and the zero-shot row. A metric that is
undefined is NaN, never an exception: the engine calls :func:`matrix_metrics` after every
task, including right after the zero-shot evaluation (T = 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

METRIC_NAMES: tuple[str, ...] = (
    "avg", "last", "transfer", "bwt", "fwt", "faa", "faa_weighted", "forgetting", "acc_seen",
)  # fmt: skip


def _mean(values: Sequence[float] | np.ndarray) -> float:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return float("nan")
    # NaN cells propagate instead of warning: a NaN metric is the honest answer.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(arr.mean())


def matrix_metrics(
    R: np.ndarray, zero_shot: bool = True, n_samples: np.ndarray | Sequence[int] | None = None
) -> dict[str, float]:
    """All metrics of one accuracy matrix.

    ``R`` has rows for steps ``0..T`` (``zero_shot=True``) or ``1..T`` (``zero_shot=False``)
    and one column per task in training order; ``n_samples`` gives each column's full
    test-set size (not the number scored under ``evaluation.max_samples``).
    Returns the :data:`METRIC_NAMES` plus ``n_tasks_trained`` (= T).
    """
    arr = np.asarray(R, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :] if arr.size else arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D, got shape {arr.shape}")
    n_cols = arr.shape[1]
    # M always has the zero-shot row at index 0 (NaN when absent), so row i = after task i.
    M = arr if zero_shot else np.vstack([np.full((1, n_cols), np.nan), arr])
    T = max(M.shape[0] - 1, 0)
    out: dict[str, float] = {k: float("nan") for k in METRIC_NAMES}
    out["n_tasks_trained"] = T
    if T == 0 or n_cols == 0:
        out["n_tasks_trained"] = T if n_cols else 0
        return out
    if T > n_cols:
        raise ValueError(f"{T} tasks trained but only {n_cols} columns: every trained task needs a column")
    trained = M[1 : T + 1]
    out["avg"] = _mean([_mean(trained[:, c]) for c in range(n_cols)])
    out["last"] = _mean(M[T])
    # 0-based column c is 1-based task c+1; the rows before it was trained are 1..min(c, T).
    out["transfer"] = _mean([_mean(M[1 : min(c, T) + 1, c]) for c in range(1, n_cols)])
    out["faa"] = _mean(M[T, :T])
    out["acc_seen"] = out["faa"]
    if n_samples is not None:
        w = np.asarray(n_samples, dtype=float)[:T]
        if w.shape == (T,) and np.nansum(w) > 0:
            out["faa_weighted"] = float(np.sum(w * M[T, :T]) / np.sum(w))
    if T >= 2:
        out["bwt"] = _mean([M[T, c] - M[c + 1, c] for c in range(T - 1)])
        out["forgetting"] = _mean([np.max(M[c + 1 : T, c]) - M[T, c] for c in range(T - 1)])
        if zero_shot:
            out["fwt"] = _mean([M[c, c] - M[0, c] for c in range(1, T)])
    return out


def task_order(g: pd.DataFrame, label: str) -> list[str]:
    """Columns of one trial's matrix, in training order."""
    if "eval_position" in g.columns and g["eval_position"].notna().all():
        pos = g.groupby("eval_task")["eval_position"].agg(["min", "max"])
        bad = pos.index[pos["min"] != pos["max"]].tolist()
        if bad:
            raise ValueError(f"trial {label}: tasks {bad} have more than one eval_position")
        if pos["min"].duplicated().any():
            raise ValueError(f"trial {label}: two tasks share an eval_position")
        return pos.sort_values("min").index.astype(str).tolist()
    # Without positions, a task's column is the step that trained it; the rest follow by name.
    trained = g[(g["step"] >= 1) & g["trained_task"].notna() & (g["trained_task"].astype(str) != "")]
    per_step = trained.groupby("step")["trained_task"].unique()
    order: list[str] = []
    for step, names in per_step.sort_index().items():
        if len(names) != 1:
            raise ValueError(f"trial {label}: step {step} names more than one trained_task: {list(names)}")
        if names[0] not in order:
            order.append(str(names[0]))
    rest = sorted(set(g["eval_task"].astype(str)) - set(order))
    return order + rest


def _trial_metrics(g: pd.DataFrame, label: str) -> dict[str, float]:
    dup = g.duplicated(subset=["step", "eval_task"], keep=False)
    if dup.any():
        pairs = sorted(set(zip(g.loc[dup, "step"].astype(int), g.loc[dup, "eval_task"].astype(str))))
        raise ValueError(f"trial {label}: duplicated (step, eval_task) rows {pairs[:5]}")
    order = task_order(g, label)
    steps = sorted(int(s) for s in g["step"].unique())
    zero_shot = 0 in steps
    T = max(steps) if steps else 0
    row_steps = list(range(0 if zero_shot else 1, T + 1))
    mat = g.pivot(index="step", columns="eval_task", values="value")
    mat.columns = mat.columns.astype(str)
    mat = mat.reindex(index=row_steps, columns=order)
    present = set(zip(g["step"].astype(int), g["eval_task"].astype(str)))
    missing = [(s, t) for s in row_steps for t in order if (s, t) not in present]
    if missing:
        raise ValueError(f"trial {label}: accuracy matrix has missing cells (step, eval_task) {missing[:5]}")
    n_samples = None
    if "n_samples" in g.columns and g["n_samples"].notna().all():
        n_samples = g.groupby("eval_task")["n_samples"].max().rename(index=str).reindex(order).to_numpy(dtype=float)
    out = matrix_metrics(mat.to_numpy(dtype=float), zero_shot=zero_shot, n_samples=n_samples)
    out["n_tasks"] = len(order)
    return out


def cl_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial (``trial_id``, and ``stage`` when the input has it) with every metric.

    ``df`` is long-form accuracy with at least ``trial_id, step, trained_task, eval_task,
    value``; ``step`` 0 (zero-shot), ``eval_position`` and ``n_samples`` are optional and
    rows may come in any order. Raises ValueError naming the trial when a (step, eval_task)
    pair is duplicated or a cell of its matrix is missing.
    """
    import pandas as pd

    required = {"trial_id", "step", "trained_task", "eval_task", "value"}
    missing_cols = required - set(df.columns)
    if missing_cols:
        raise ValueError(f"accuracy rows lack columns {sorted(missing_cols)}")
    keys = ["stage", "trial_id"] if "stage" in df.columns else ["trial_id"]
    out_cols = [*keys, *METRIC_NAMES, "n_tasks_trained", "n_tasks"]
    if df.empty:
        return pd.DataFrame(columns=out_cols)
    records = []
    for key, g in df.groupby(keys, sort=True, dropna=False):
        key_t = key if isinstance(key, tuple) else (key,)
        label = "/".join(str(k) for k in key_t)
        records.append({**dict(zip(keys, key_t)), **_trial_metrics(g, label)})
    res = pd.DataFrame.from_records(records, columns=out_cols)
    res["n_tasks_trained"] = res["n_tasks_trained"].astype(int)
    res["n_tasks"] = res["n_tasks"].astype(int)
    return res
