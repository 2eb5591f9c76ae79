"""Failures: nothing that finished is lost, nothing is written twice.

Each test runs `mmcl` as its own process (a real study driver) against the session's
local Ray head.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from .conftest import mmcl_cmd, wait_for
from .helpers import tiny_study

pytestmark = pytest.mark.slow


def _assert_complete_and_unique(out: Path, n_trials: int, n_tasks: int) -> pd.DataFrame:
    acc = pd.read_parquet(out / "accuracy.parquet")
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == n_trials, trials
    assert (trials.status == "completed").all(), trials[["trial_id", "status", "error"]]
    assert not acc.duplicated(["stage", "trial_id", "step", "eval_task"]).any()
    assert len(acc) == n_trials * (n_tasks + 1) * n_tasks
    counts = acc.groupby(["stage", "trial_id", "step"]).size()
    assert (counts == n_tasks).all()
    return trials


def test_trial_process_dies_mid_run_and_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    study = tiny_study(tmp_path / "s.yaml", [{"name": "abl", "kind": "ablation", "variants": ["full"], "seeds": [0, 1]}])
    out = tmp_path / "out"
    markers = tmp_path / "markers"
    # Each trial's process exits right after writing the parts of step 2 and before
    # reporting them: the retry resumes from the step-1 checkpoint and rewrites step 2.
    env = {**os.environ, "MMCL_FAULT_INJECT": f"die:abl:2:{markers}"}
    r = subprocess.run(mmcl_cmd("run", str(study), "--output", str(out)), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(list(markers.iterdir())) == 2  # both trials really died once
    trials = _assert_complete_and_unique(out, n_trials=2, n_tasks=3)
    assert (trials.resumed_from_task == 1).all()


def test_nan_trial_is_recorded_as_error_and_the_study_goes_on(ray_cluster, tmp_path):
    variants = {"ok": {}, "diverge": {"training.lr": float("inf"), "training.grad_clip": None, "training.optimizer": "sgd"}}
    study = tiny_study(tmp_path / "s.yaml", [{"name": "abl", "kind": "ablation", "variants": variants, "seeds": [0]},
                                            {"name": "after", "kind": "ablation", "seeds": [0]}])
    out = tmp_path / "out"
    r = subprocess.run(mmcl_cmd("run", str(study), "--output", str(out)), capture_output=True, text=True, timeout=600)
    # An errored trial makes the exit status 1 (docs/cli.md), after the study ran to its end.
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_parquet(out / "trials.parquet").set_index("variant")
    bad = trials[trials.stage == "abl"].loc["diverge"]
    assert bad.status == "error" and "loss became" in bad.error and "non-finite terms" in bad.error
    assert trials[trials.stage == "abl"].loc["ok"].status == "completed"
    assert (trials[trials.stage == "after"].status == "completed").all()  # the study went on
    # The failed trial's evaluated rows (row 0 at least) were kept.
    acc = pd.read_parquet(out / "accuracy.parquet")
    assert (acc[acc.trial_id == bad.trial_id].step == 0).any()


def test_a_stage_whose_trials_never_get_resources_ends_naming_ask_and_offer(ray_cluster, tmp_path):
    """Tune would wait forever for a trial asking more than any node has; the stage ends
    after `resources.wait_timeout_s`, resumable, saying what it asked and what it got."""
    import yaml

    study = tiny_study(tmp_path / "s.yaml", [{"name": "abl", "kind": "ablation", "seeds": [0]}])
    data = yaml.safe_load(study.read_text())
    data["resources"] = {"cpu": 3, "gpu": 0, "wait_timeout_s": 8}  # the session's head has 2 CPUs
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    r = subprocess.run(mmcl_cmd("run", str(study), "--output", str(out)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage abl: 1 trial(s) waited 8 s for resources with none running" in r.stderr, r.stderr[-3000:]
    assert "cpu=3, gpu=0" in r.stderr and "CPU=2" in r.stderr and f"mmcl resume {out}" in r.stderr
    assert not (out / "trials.parquet").exists()  # nothing recorded as done


def test_interrupted_driver_then_resume_finishes_without_rerun_or_duplicates(ray_cluster, tmp_path):
    study = tiny_study(
        tmp_path / "s.yaml",
        [{"name": "first", "kind": "ablation", "variants": ["full"], "seeds": [0, 1]},
         {"name": "second", "kind": "search", "search_space": "finetune", "num_samples": 4,
          "scheduler": {"kind": "fifo"}}],
        steps=12,
        max_concurrent=1,
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(mmcl_cmd("run", str(study), "--output", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # Interrupt once the second stage has written some rows but is not finished.
        started = wait_for(lambda: len(list((out / "parts" / "accuracy" / "second").glob("*/step_001.parquet"))) >= 1,
                           timeout=400)
        assert started, "the second stage never started"
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, log[-3000:]
    state = json.loads((out / "study_state.json").read_text())
    assert state["stages"]["first"]["done"] and not state["stages"]["second"].get("done")
    first_parts = {p: p.stat().st_mtime_ns for p in (out / "parts" / "accuracy" / "first").rglob("*.parquet")}

    r = subprocess.run(mmcl_cmd("resume", str(out)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage 1/2" not in r.stdout and "stage 2/2" in r.stdout
    # The finished stage was not rerun: its files are untouched.
    assert {p: p.stat().st_mtime_ns for p in first_parts} == first_parts
    trials = _assert_complete_and_unique(out, n_trials=2 + 4, n_tasks=3)
    # The restored search kept its Optuna history: exactly 4 trials, all told, one per Ray trial.
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna" / "second.journal"))
    )
    ot = optuna.load_study(study_name="tiny.second", storage=storage).trials
    assert len(ot) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in ot)
    assert {t.user_attrs["ray_trial_id"] for t in ot} == set(trials[trials.stage == "second"].trial_id)


@pytest.mark.parametrize("step", [0, 3], ids=["after_row_0", "after_last_task"])
def test_driver_interrupted_right_after_a_checkpoint_then_resume_never_adds_a_row(ray_cluster, tmp_path, step):
    """The worst moments for a resume: a trial has reported and checkpointed row 0 (the
    untrained model), or its last task, and the driver stops before Tune sees the trial
    end. The restored trial continues from that checkpoint: row ``step`` is not evaluated
    again, and a finished run reports its result and trains nothing."""
    study = tiny_study(tmp_path / "s.yaml", [{"name": "abl", "kind": "ablation", "variants": ["full"], "seeds": [0, 1]}])
    out, markers = tmp_path / "out", tmp_path / "markers"
    env = {**os.environ, "MMCL_FAULT_INJECT": f"hang:abl:{step}:{markers}"}
    proc = subprocess.Popen(mmcl_cmd("run", str(study), "--output", str(out)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # Both trials reported `step` (with its checkpoint) and now hang inside the trial.
        assert wait_for(lambda: markers.is_dir() and len(list(markers.iterdir())) == 2, timeout=400), "no trial hung"
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, log[-3000:]  # interrupted

    r = subprocess.run(mmcl_cmd("resume", str(out)), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = _assert_complete_and_unique(out, n_trials=2, n_tasks=3)
    assert (trials.resumed_from_task == step).all(), trials[["trial_id", "resumed_from_task"]]
    # A finished run rewrote its last row with the same values; nothing past it exists.
    acc = pd.read_parquet(out / "accuracy.parquet")
    assert acc.step.max() == 3


def test_interrupted_asha_search_resumes_with_its_rungs_and_reruns_no_stopped_trial(ray_cluster, tmp_path):
    """`mmcl resume` of an ASHA search: the trials ASHA stopped are not run again, the
    scores it recorded at each rung are still there for the trials that follow, and the
    search ends with exactly its number of trials (Ray's restore forgets the rungs:
    tests/test_tune.py shows the difference on the scheduler alone)."""
    study = tiny_study(
        tmp_path / "s.yaml",
        [{"name": "search", "kind": "search", "search_space": "finetune", "num_samples": 6, "sampler_seed": 1,
          "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}}],
        steps=6,
        max_concurrent=1,
    )  # fmt: skip
    out = tmp_path / "out"
    asha = out / "asha" / "search.json"

    def rung_1() -> dict:
        try:
            state = json.loads(asha.read_text())
        except (OSError, ValueError):
            return {}
        return next(rec for m, rec in state["rungs"][0] if m == 1)

    proc = subprocess.Popen(mmcl_cmd("run", str(study), "--output", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert wait_for(lambda: len(rung_1()) >= 3, timeout=400), "ASHA never recorded three trials"
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, log[-3000:]
    before = json.loads(asha.read_text())
    ended = {tid for tid in before["stopped"]}
    parts = out / "parts" / "accuracy" / "search"
    ended_files = {p: p.stat().st_mtime_ns for tid in ended for p in (parts / tid).glob("*.parquet")}
    assert ended_files, before

    r = subprocess.run(mmcl_cmd("resume", str(out)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 6 and set(trials.status) <= {"completed", "stopped"}, trials[["trial_id", "status"]]
    # Nothing ASHA had ended before the interruption ran again.
    assert {p: p.stat().st_mtime_ns for p in ended_files} == ended_files
    # Every score recorded before the interruption is still in the rungs afterwards.
    after = json.loads(asha.read_text())
    for (m, rec), (m2, rec2) in zip(before["rungs"][0], after["rungs"][0]):
        assert m == m2 and rec.items() <= rec2.items(), (m, rec, rec2)
    assert set(ended) <= set(after["stopped"])
    # Each trial is recorded at rung 1 once (the resumed ones too) and Optuna has 6 trials.
    assert set(rung_1()) == set(trials.trial_id)
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna" / "search.journal"))
    )
    ot = optuna.load_study(study_name="tiny.search", storage=storage).trials
    assert len(ot) == 6 and all(t.state.is_finished() for t in ot)
