"""Ray Tune + Optuna: a stage on a real local Ray cluster, and the PRUNED fix."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from mmcl.cli import main
from mmcl.tune import ContinualOptunaSearch

from .helpers import tiny_study


def _space(trial):
    trial.suggest_float("training.lr", 1e-4, 1e-2, log=True)


@pytest.mark.parametrize("searcher_cls", [ContinualOptunaSearch, "stock"])
def test_stopped_trial_reaches_optuna_as_pruned_not_complete(searcher_cls):
    """Ray's stock OptunaSearch tells COMPLETE with a partial-task score; ours PRUNED."""
    from ray.tune.search.optuna import OptunaSearch

    cls = OptunaSearch if searcher_cls == "stock" else searcher_cls
    storage = optuna.storages.InMemoryStorage()
    s = cls(space=_space, metric="objective", mode="max", storage=storage, study_name="x")
    s.set_search_properties("objective", "max", {})
    s.suggest("t1")
    # A trial stopped by ASHA after task 1 of 3 (its last result, not done).
    partial = {"task": 1, "n_tasks": 3, "objective": 91.0, "training_iteration": 2, "error": ""}
    s.on_trial_result("t1", partial)
    s.on_trial_complete("t1", result=partial)
    s.suggest("t2")
    full = {"task": 3, "n_tasks": 3, "objective": 55.0, "training_iteration": 4, "error": ""}
    s.on_trial_result("t2", full)
    s.on_trial_complete("t2", result=full)
    s.suggest("t3")
    s.on_trial_complete("t3", result={"task": 2, "n_tasks": 3, "objective": 40.0, "error": "loss became nan"})
    trials = optuna.load_study(study_name="x", storage=storage).trials
    if cls is OptunaSearch:
        # The bug this project works around: the partial score counts as a finished run.
        assert trials[0].state == optuna.trial.TrialState.COMPLETE and trials[0].value == 91.0
        return
    assert trials[0].state == optuna.trial.TrialState.PRUNED
    # Optuna keeps a pruned trial's last intermediate value (at its step); TPE ranks
    # pruned trials by how far they got, below every complete one.
    assert trials[0].intermediate_values == {1: 91.0} and trials[0].last_step == 1
    assert trials[1].state == optuna.trial.TrialState.COMPLETE and trials[1].value == 55.0
    assert trials[2].state == optuna.trial.TrialState.FAIL
    assert trials[0].user_attrs["ray_trial_id"] == "t1"


def test_journal_trials_a_restored_searcher_never_heard_of_are_failed(tmp_path):
    """The driver saved the searcher (as Tune does, every ~10 s), asked Optuna for one
    more trial and died. Restored, that trial would stay RUNNING in the journal forever;
    it is told FAIL and marked, and the trials the searcher knew are untouched."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    def searcher():
        storage = JournalStorage(JournalFileBackend(str(tmp_path / "s.journal")))
        s = ContinualOptunaSearch(space=_space, metric="objective", mode="max", storage=storage, study_name="x")
        s.set_search_properties("objective", "max", {})
        return s

    first = searcher()
    first.suggest("t1")
    first.on_trial_complete("t1", result={"task": 3, "n_tasks": 3, "objective": 50.0, "error": ""})
    first.suggest("t2")  # running when Tune saves
    first.save(str(tmp_path / "searcher.pkl"))
    first.suggest("t3")  # asked after the save: the driver dies here
    second = searcher()
    second.restore(str(tmp_path / "searcher.pkl"))
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in optuna.load_study(study_name="x", storage=second._ot_study._storage).trials}
    assert by_ray_id["t3"].state == optuna.trial.TrialState.FAIL and by_ray_id["t3"].user_attrs["lost_with_driver"]
    assert by_ray_id["t2"].state == optuna.trial.TrialState.RUNNING  # Tune resumes it
    assert by_ray_id["t1"].state == optuna.trial.TrialState.COMPLETE
    second.on_trial_complete("t2", result={"task": 3, "n_tasks": 3, "objective": 60.0, "error": ""})
    assert optuna.load_study(study_name="x", storage=second._ot_study._storage).best_value == 60.0


@pytest.mark.parametrize("scheduler", ["ours", "stock"])
def test_restored_asha_keeps_its_rungs_and_its_stop_decisions(tmp_path, scheduler):
    """Tuner.restore unpickles the scheduler as it was when the stage started (tuner.pkl):
    Ray's own ASHA then has empty rungs, so a trial it would have stopped runs on. Ours
    reads back what it recorded, and stops again a trial it had stopped that the restored
    experiment still lists as running."""
    import pickle

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    from mmcl.tune import ContinualASHA

    kw = dict(time_attr="task", metric="objective", mode="max", max_t=3, grace_period=1, reduction_factor=2)
    sched = ContinualASHA(out_dir=str(tmp_path), stage="s", **kw) if scheduler == "ours" else AsyncHyperBandScheduler(**kw)
    at_start = pickle.dumps(sched)  # what Tune writes to tuner.pkl before the first trial
    trials = {tid: Trial("t", trial_id=tid, stub=True) for tid in ("a", "b", "c", "d", "e")}

    def result(tid, task, value):
        return sched.on_trial_result(None, trials[tid], {"task": task, "objective": value})

    for tid in "abcd":
        sched.on_trial_add(None, trials[tid])
    decisions = [result(t, 1, v) for t, v in zip("abcd", (90.0, 80.0, 70.0, 60.0))]
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.STOP, TrialScheduler.STOP]
    # The driver dies here; `mmcl resume` restores the scheduler from tuner.pkl and re-adds
    # the experiment's trials, b as if its stop had not reached the experiment state.
    sched = pickle.loads(at_start)
    for tid in "abcde":
        sched.on_trial_add(None, trials[tid])
    # e scores 72 after task 1: below the rung's median (75) of a..d.
    if scheduler == "stock":
        assert result("e", 1, 72.0) == TrialScheduler.CONTINUE  # the bug: the rung is empty
        assert result("b", 2, 80.0) == TrialScheduler.CONTINUE
        return
    assert result("e", 1, 72.0) == TrialScheduler.STOP
    assert result("b", 2, 80.0) == TrialScheduler.STOP
    rung_1 = [rec for m, rec in sched._brackets[0]._rungs if m == 1][0]
    assert rung_1 == {"a": 90.0, "b": 80.0, "c": 70.0, "d": 60.0, "e": 72.0}
    # A new stage (not a restore) of the same name starts from empty rungs.
    fresh = ContinualASHA(out_dir=str(tmp_path), stage="s", **kw)
    fresh.on_trial_add(None, trials["e"])
    assert fresh.on_trial_result(None, trials["e"], {"task": 1, "objective": 10.0}) == TrialScheduler.CONTINUE


def test_restored_asha_refuses_the_state_of_other_settings(tmp_path):
    import pickle

    from ray.tune.experiment import Trial

    from mmcl.tune import ContinualASHA

    kw = dict(time_attr="task", metric="objective", mode="max", grace_period=1, reduction_factor=2)
    ContinualASHA(out_dir=str(tmp_path), stage="s", max_t=6, **kw)
    other = pickle.loads(pickle.dumps(ContinualASHA(out_dir=str(tmp_path / "x"), stage="s", max_t=3, **kw)))
    other._out_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match=r"asha/s.json: ASHA state of another scheduler"):
        other.on_trial_add(None, Trial("t", trial_id="a", stub=True))


def test_search_stage_with_asha_on_ray(ray_cluster, tmp_path):
    """Sequential trials with a fixed sampler seed: deterministic, and ASHA stops some."""
    study = tiny_study(
        tmp_path / "s.yaml",
        [{"name": "search", "kind": "search", "search_space": "finetune", "num_samples": 5,
          "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}, "sampler_seed": 3}],
        num_tasks=3,
        max_concurrent=1,
    )
    out = tmp_path / "out"
    assert main(["run", str(study), "--output", str(out)]) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    acc = pd.read_parquet(out / "accuracy.parquet")
    assert len(trials) == 5
    assert set(trials.status) <= {"completed", "stopped"}
    assert (trials.status == "stopped").any(), trials[["trial_id", "status", "n_tasks_trained"]]
    assert (trials.status == "completed").any()
    # Each trial's environment fingerprint (CPU here: no GPU, CUDA or driver).
    import platform

    import torch

    assert (trials["env/hostname"] == platform.node()).all() and (trials["env/node_id"].str.len() > 0).all()
    assert (trials["env/torch_version"] == torch.__version__).all() and (trials["env/device"] == "cpu").all()
    assert (trials["env/gpu_count"] == "0").all() and (trials["env/gpu_name"] == "").all()
    assert (trials["env/amp_dtype"] == "off").all() and (trials["env/effective_batch_size"] == "8").all()
    # The trials' interpreter is this environment's (the driver's), not a copy of it.
    assert trials["env/python"].map(lambda p: str(Path(p).parent)).eq(str(Path(sys.executable).parent)).all()
    # One accuracy row per (trial, step, eval task), steps 0..tasks trained.
    assert not acc.duplicated(["trial_id", "step", "eval_task"]).any()
    for _, t in trials.iterrows():
        rows = acc[acc.trial_id == t.trial_id]
        assert sorted(rows.step.unique()) == list(range(t.n_tasks_trained + 1))
        assert len(rows) == (t.n_tasks_trained + 1) * 3
    # Optuna's own record (the journal file optuna-dashboard opens) agrees.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna" / "search.journal"))
    )
    ot = {t.user_attrs["ray_trial_id"]: t for t in optuna.load_study(study_name="tiny.search", storage=storage).trials}
    for _, t in trials.iterrows():
        o = ot[t.trial_id]
        if t.status == "stopped":
            assert o.state == optuna.trial.TrialState.PRUNED
            assert max(o.intermediate_values) == t.n_tasks_trained
        else:
            assert o.state == optuna.trial.TrialState.COMPLETE
            assert math.isclose(o.value, t.avg, rel_tol=1e-9)
        assert math.isclose(o.params["training.lr"], t["config/training.lr"])
    # The best config was recorded for later stages.
    import json

    state = json.loads((out / "study_state.json").read_text())
    best = trials[trials.status == "completed"].sort_values("avg").iloc[-1]
    assert state["stages"]["search"]["best_trial"] == best.trial_id


@pytest.mark.slow
def test_uv_run_driver_keeps_its_workers_in_its_own_environment(ray_cluster, tmp_path):
    """`uv run mmcl run ...` from the project (the README's command): Ray's uv integration
    would relaunch each trial with `uv run` in an uploaded copy of the working directory,
    in a second virtual environment; mmcl turns it off, so the trials run the driver's
    interpreter (env/python) and nothing of the working directory is uploaded."""
    import os
    import shutil
    import subprocess

    from .conftest import REPO

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (.ci/run installs it)")
    study = tiny_study(tmp_path / "s.yaml", [{"name": "abl", "kind": "ablation", "variants": ["full"], "seeds": [0]}],
                       num_tasks=2)  # fmt: skip
    # This process imported mmcl.tune, which set the switch off in its own environment:
    # the driver must turn it off by itself.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    out = tmp_path / "out"
    r = subprocess.run([uv, "run", "mmcl", "run", str(study), "--output", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_parquet(out / "trials.parquet")
    venv_bin = str(Path(sys.executable).parent)
    assert trials["env/python"].map(lambda p: str(Path(p).parent)).eq(venv_bin).all(), trials["env/python"].tolist()
    assert "working_dir" not in r.stderr and "_ray_pkg_" not in r.stdout + r.stderr, r.stderr[-2000:]
