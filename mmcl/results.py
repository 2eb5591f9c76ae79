"""Parquet results: written so that retries and resumes never lose or duplicate a row.

Layout of a study's output directory (a local path or an object-store prefix, see
mmcl.storage)::

    study.yaml               the resolved study (after --smoke, paths made absolute)
    study_state.json         which stages finished, their best configs
    versions.json            package versions and git sha of the code that ran
    accuracy.parquet         consolidated tables (rebuilt from parts/ at every stage end)
    trials.parquet
    curves.parquet
    optuna/<stage>.journal   Optuna storage of each search stage (optuna-dashboard opens it)
    asha/<stage>.json        ASHA's rungs and stop decisions of each search stage (mmcl.tune.ContinualASHA)
    ray/<stage>/             Ray Tune experiment (trial checkpoints, searcher state)
    parts/accuracy/<stage>/<trial_id>/step_003.parquet   one file per (trial, step)
    parts/curves/<stage>/<trial_id>/task_002.parquet     one file per (trial, task)
    parts/trials/<stage>.parquet                         one file per finished stage

A trial writes its part files itself, as soon as a row exists, under a name fixed by
(stage, trial, step): a retried or resumed trial that recomputes a step overwrites the
same file instead of adding a second one, and a crash between two steps loses nothing
already written. Every file appears whole or not at all (a rename on a disk, one upload
on an object store: mmcl.storage), so a reader never sees half a file. Consolidation
reads every part and keeps the last copy of each key, so even an external copy of a part cannot create duplicates.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from mmcl.storage import Storage, open_storage

ACCURACY_COLUMNS = [
    "study", "stage", "trial_id", "variant", "order_id", "seed", "step", "trained_task",
    "eval_task", "eval_position", "metric_name", "value", "n_samples", "n_eval",
]  # fmt: skip
# n_samples: the task's full test-set size (faa_weighted's weight); n_eval: the samples
# scored, fewer when evaluation.max_samples caps them.
ACCURACY_KEY = ["stage", "trial_id", "step", "eval_task"]
CURVES_KEY = ["stage", "trial_id", "task", "step"]
TRIALS_KEY = ["stage", "trial_id"]
METRIC_COLUMNS = ["avg", "last", "transfer", "bwt", "fwt", "faa", "faa_weighted", "forgetting", "acc_seen"]
TRIALS_COLUMNS = [
    "study", "stage", "trial_id", "method", "variant", "order_id", "order", "seed", "status", "error",
    "config_json", *METRIC_COLUMNS, "n_tasks_trained", "n_tasks", "trainable_params", "peak_memory_mb",
    "wall_time_s", "git_sha",
]  # fmt: skip

# Method.stats() travel in tune.report and land in trials.parquet as extra columns
# ``method/<name>`` (the values after the trial's last reported task).
METHOD_STAT_PREFIX = "method/"


# The trial's environment (engine.environment_fingerprint, plus the Ray node id) lands in
# trials.parquet as string columns ``env/<name>``.
ENV_PREFIX = "env/"


def method_stat_columns(stats: dict[str, float]) -> dict[str, float]:
    """``Method.stats()`` as report keys / trials-table columns: ``method/<name>``."""
    return {f"{METHOD_STAT_PREFIX}{k}": float(v) for k, v in stats.items()}


class TrialWriter:
    """Writes one trial's rows as part files (used inside the trial's process)."""

    def __init__(self, out: str | Storage, study: str, stage: str, trial_id: str, meta: dict[str, Any]):
        self.out = open_storage(out)
        self.study, self.stage, self.trial_id = study, stage, trial_id
        self.meta = meta  # variant, order_id, seed

    def write_step(self, end) -> None:
        """Accuracy rows of one step (a ``TaskEnd``) and the curves of its task."""
        rows = [
            {
                "study": self.study,
                "stage": self.stage,
                "trial_id": self.trial_id,
                "variant": self.meta["variant"],
                "order_id": self.meta["order_id"],
                "seed": int(self.meta["seed"]),
                "step": end.step,
                "trained_task": end.trained_task or "",
                "eval_task": name,
                "eval_position": pos,
                "metric_name": end.metric_names[name],
                "value": float(end.row[name]),
                "n_samples": int(end.n_samples[name]),
                "n_eval": int(end.n_eval.get(name, end.n_samples[name])),
            }
            for pos, name in enumerate(end.task_names)
        ]
        self.out.write_parquet(
            pd.DataFrame(rows, columns=ACCURACY_COLUMNS),
            f"parts/accuracy/{self.stage}/{self.trial_id}/step_{end.step:03d}.parquet",
        )
        if end.curves:
            df = pd.DataFrame(end.curves)
            df.insert(0, "trial_id", self.trial_id)
            df.insert(0, "stage", self.stage)
            df.insert(0, "study", self.study)
            self.out.write_parquet(df, f"parts/curves/{self.stage}/{self.trial_id}/task_{end.step:03d}.parquet")


def write_trials(out: str | Path | Storage, stage: str, rows: list[dict[str, Any]]) -> None:
    """The trials table of one stage (written by the driver when the stage ends)."""
    df = pd.DataFrame(rows)
    for c in TRIALS_COLUMNS:
        if c not in df.columns:
            df[c] = None
    extra = sorted(c for c in df.columns if c not in TRIALS_COLUMNS)
    open_storage(out).write_parquet(df[TRIALS_COLUMNS + extra], f"parts/trials/{stage}.parquet")


def _read_parts(out: Storage, keys: list[str]) -> pd.DataFrame:
    frames = [out.read_parquet(k) for k in sorted(keys)]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _part_keys(out: Storage, prefix: str, depth: int, name: str) -> list[str]:
    """Keys ``<prefix>/<depth dirs>/<name>*.parquet`` (a listing, not a glob: object
    stores have no directories to walk)."""
    keys = []
    for k in out.list_files(prefix, suffix=".parquet"):
        rest = k[len(prefix) + 1 :].split("/")
        if len(rest) == depth + 1 and rest[-1].startswith(name):
            keys.append(k)
    return keys


def consolidate(out: str | Path | Storage) -> dict[str, Any]:
    """Rebuild accuracy / curves / trials.parquet from the parts.

    Returns the row count of each table and ``lost_trials``: the ids of trials that
    wrote rows in a finished stage but are not in its trials table. Such a trial was
    started by a driver that died before Tune saved its experiment state (Tune saves it
    every ~10 s); the restored stage never knew it and ran a new trial in its place. Its
    partial rows stay in ``parts/`` (nothing is deleted) but not in the tables, where
    they would be rows of a trial that does not exist. A stage that has not finished
    (no trials table yet) keeps all its rows, to be inspected."""
    out = open_storage(out)
    trials = _read_parts(out, _part_keys(out, "parts/trials", 0, ""))
    known = set(zip(trials.stage, trials.trial_id)) if len(trials) else set()
    finished = set(trials.stage) if len(trials) else set()
    counts: dict[str, Any] = {}
    lost: set[str] = set()
    for table, prefix, name, key, cols in (
        ("accuracy", "parts/accuracy", "step_", ACCURACY_KEY, ACCURACY_COLUMNS),
        ("curves", "parts/curves", "task_", CURVES_KEY, None),
    ):
        keys = []
        for k in _part_keys(out, prefix, 2, name):
            stage, trial_id = k[len(prefix) + 1 :].split("/")[:2]
            if stage in finished and (stage, trial_id) not in known:
                lost.add(f"{stage}/{trial_id}")
            else:
                keys.append(k)
        df = _read_parts(out, keys)
        counts[table] = _write_table(out, table, df, key, cols)
    counts["trials"] = _write_table(out, "trials", trials, TRIALS_KEY, None)
    counts["lost_trials"] = sorted(lost)
    return counts


def _write_table(out: Storage, table: str, df: pd.DataFrame, key: list[str], cols: list[str] | None) -> int:
    if len(df):
        df = df.drop_duplicates(subset=key, keep="last")
        df = df.sort_values(key, kind="stable").reset_index(drop=True)
    elif cols:
        df = pd.DataFrame(columns=cols)
    out.write_parquet(df, f"{table}.parquet")
    return len(df)


def git_sha(cwd: str | Path | None = None) -> str:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return r.stdout.strip() if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mmcl-studies", "torch", "ray", "optuna", "open_clip_torch", "transformers", "peft", "pandas", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["git_sha"] = git_sha()
    return out


def write_json(obj: Any, out: str | Path | Storage, key: str) -> None:
    open_storage(out).write_text(key, json.dumps(obj, indent=2, sort_keys=True, default=str))
