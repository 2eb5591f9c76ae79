"""Analysis of a study's results directory (reads its Parquet tables only).

    import analysis
    res = analysis.load("results/quickstart")
    res.accuracy, res.trials, res.curves    # pandas DataFrames (empty, with columns, if absent)
    res.metrics()                           # metrics recomputed from accuracy + trial metadata

pandas is imported on first use, not at import time, so ``import analysis`` stays cheap
for the engine (which only needs :mod:`analysis.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from analysis.metrics import cl_metrics

__all__ = ["Results", "load", "cl_metrics", "ACCURACY_COLUMNS", "TRIALS_COLUMNS", "CURVES_COLUMNS"]

# Kept here rather than imported from mmcl.results: analysis must work in a notebook
# without the training stack installed.
ACCURACY_COLUMNS: list[str] = [
    "study", "stage", "trial_id", "variant", "order_id", "seed", "step", "trained_task",
    "eval_task", "eval_position", "metric_name", "value", "n_samples", "n_eval",
]  # fmt: skip
METRIC_COLUMNS: list[str] = [
    "avg", "last", "transfer", "bwt", "fwt", "faa", "faa_weighted", "forgetting", "acc_seen",
]  # fmt: skip
TRIALS_COLUMNS: list[str] = [
    "study", "stage", "trial_id", "method", "variant", "order_id", "order", "seed", "status", "error",
    "config_json", *METRIC_COLUMNS, "n_tasks_trained", "n_tasks", "trainable_params", "peak_memory_mb",
    "wall_time_s", "git_sha",
]  # fmt: skip
CURVES_COLUMNS: list[str] = [
    "study", "stage", "trial_id", "task", "task_name", "step", "loss", "lr", "samples_per_s",
]  # fmt: skip
RUNNING = "running"
# Columns that describe a trial and can be read off its accuracy rows when trials.parquet
# does not list it yet (a study still running).
_ACCURACY_META: list[str] = ["study", "variant", "order_id", "seed"]


def __getattr__(name: str) -> Any:
    if name == "cl_metrics":
        from analysis.metrics import cl_metrics

        return cl_metrics
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


@dataclass
class Results:
    """The three tables of one results directory."""

    path: Path | str  # a local directory, or the URI of a bucket prefix
    accuracy: pd.DataFrame
    trials: pd.DataFrame
    curves: pd.DataFrame
    _metrics: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def study(self) -> str:
        for df in (self.trials, self.accuracy):
            if "study" in df.columns and df["study"].notna().any():
                return str(df["study"].dropna().iloc[0])
        return str(self.path).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    def metrics(self) -> pd.DataFrame:
        """One row per trial: its metadata (trials.parquet) and its metrics.

        Metrics are recomputed from accuracy.parquet with :func:`cl_metrics`; the values
        stored in trials.parquet fill in only trials without accuracy rows. Trials seen
        only in accuracy.parquet (not yet in trials.parquet) are included with status
        ``"running"``.
        """
        if self._metrics is not None:
            return self._metrics.copy()
        import pandas as pd

        from analysis.metrics import cl_metrics

        keys = ["stage", "trial_id"]
        computed = cl_metrics(self.accuracy)
        recomputed = [*METRIC_COLUMNS, "n_tasks_trained", "n_tasks"]
        trials = self.trials.copy()
        out = trials.merge(computed, on=keys, how="outer", suffixes=("_stored", ""))
        for col in recomputed:
            stored = f"{col}_stored"
            if stored in out.columns:
                out[col] = out[col].astype(float).combine_first(out[stored].astype(float))
                out = out.drop(columns=stored)
        for col in ("n_tasks_trained", "n_tasks"):
            # Nullable ints: a trial without accuracy rows or stored counts has none.
            out[col] = out[col].astype(float).round().astype("Int64")
        if len(self.accuracy):
            meta = self.accuracy.drop_duplicates(subset=keys)[[*keys, *_ACCURACY_META]]
            out = out.merge(meta, on=keys, how="left", suffixes=("", "_acc"))
            for col in _ACCURACY_META:
                out[col] = out[col].combine_first(out.pop(f"{col}_acc"))
        # The engine writes a trial's row when it ends: one with accuracy rows only is still running.
        out["status"] = out["status"].astype(object).where(out["status"].notna(), RUNNING)
        # Outer merges turn integer seeds into floats/objects; keep them integers for display.
        seed = pd.to_numeric(out["seed"], errors="coerce")
        if seed.notna().sum() == out["seed"].notna().sum() and (seed.dropna() % 1 == 0).all():
            out["seed"] = seed.astype("Int64")
        ordered = [c for c in TRIALS_COLUMNS if c in out.columns]
        ordered += [c for c in out.columns if c not in ordered]
        out = out[ordered]
        if "stage" in out.columns:
            # Stages in the order the study ran them (first appearance), trials by id.
            stage_rank = {s: i for i, s in enumerate(pd.unique(pd.concat([trials["stage"], self.accuracy["stage"]])))}
            out = out.assign(_rank=out["stage"].map(stage_rank)).sort_values(["_rank", "trial_id"], kind="stable")
            out = out.drop(columns="_rank")
        self._metrics = out.reset_index(drop=True)
        return self._metrics.copy()


def _read(store: Any, key: str, columns: list[str]) -> pd.DataFrame:
    import pandas as pd

    if not store.is_file(key):
        return pd.DataFrame(columns=columns)
    df = store.read_parquet(key)
    for col in columns:
        if col not in df.columns:
            df[col] = pd.Series(index=df.index, dtype=object)
    return df


def load(path: Any) -> Results:
    """Read ``accuracy``, ``trials`` and ``curves`` Parquet tables of a results directory:
    a local path or a bucket URI (``s3://bucket/study``, credentials from the environment)."""
    from mmcl.storage import open_storage

    store = open_storage(path)
    if not store.exists():
        raise FileNotFoundError(
            f"{store.where()}: not a results directory; pass the --output of `mmcl run` "
            f"(the folder or URI holding accuracy.parquet, trials.parquet, curves.parquet)"
        )
    return Results(
        path=store.local_path or store.uri,
        accuracy=_read(store, "accuracy.parquet", ACCURACY_COLUMNS),
        trials=_read(store, "trials.parquet", TRIALS_COLUMNS),
        curves=_read(store, "curves.parquet", CURVES_COLUMNS),
    )
