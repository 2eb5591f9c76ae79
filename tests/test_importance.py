"""analysis/importance.py: importance at a rung, over complete *and* pruned trials."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from analysis.importance import default_rung, rung_importance


def _asha_like_study(seed: int = 0) -> optuna.Study:
    """A search in which ``x`` decided which trials ASHA kept: after task 1 the score is
    ``100 x``; only trials with x >= 0.85 go on (their scores then depend on ``y`` alone).
    Among the survivors x barely varies and has no effect: only the pruned trials carry
    its signal."""
    rng = np.random.default_rng(seed)
    dists = {"x": optuna.distributions.FloatDistribution(0.0, 1.0), "y": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study = optuna.create_study(direction="maximize")
    xs = [*rng.uniform(0.0, 0.8, 24), *rng.uniform(0.85, 1.0, 8)]
    for x in xs:
        y = float(rng.uniform())
        first = 100 * x + rng.normal(0, 0.5)
        if x < 0.85:  # stopped after task 1
            study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y}, distributions=dists,
                                                      intermediate_values={1: first}, state=optuna.trial.TrialState.PRUNED))  # fmt: skip
        else:
            final = 50 + 40 * y + rng.normal(0, 0.5)
            study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y}, distributions=dists,
                                                      intermediate_values={1: first, 2: (first + final) / 2, 3: final},
                                                      value=final))  # fmt: skip
    return study


def test_only_pruned_trials_carry_a_parameters_signal():
    study = _asha_like_study()
    # Optuna's own importance reads the 8 completed trials only: y looks like everything.
    complete_only = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    assert complete_only["y"] > 0.8 > complete_only["x"]
    # At task 1, every trial counts (24 of them stopped there): x is what mattered.
    r = rung_importance(study, rung=1)
    assert (r.rung, r.n_trials, r.n_pruned) == (1, 32, 24)
    assert r.importances["x"] > 0.8 > r.importances["y"]
    ped = rung_importance(study, rung=1, evaluator="ped_anova")
    assert ped.importances["x"] > ped.importances["y"]
    # At the last task only the survivors are left: the completed trials' view again.
    last = rung_importance(study, rung=3)
    assert last.n_trials == 8 and last.n_pruned == 0 and last.importances["y"] > last.importances["x"]


def test_default_rung_is_the_deepest_one_half_the_trials_reached():
    study = _asha_like_study()
    assert default_rung(study) == 1  # 8 of 32 reached task 2
    assert default_rung(study, min_share=0.25) == 3


def test_too_few_trials_and_bad_evaluators_say_so():
    study = _asha_like_study()
    with pytest.raises(ValueError, match="0 trial"):
        rung_importance(study, rung=7)
    with pytest.raises(ValueError, match="use one of fanova, ped_anova"):
        rung_importance(study, rung=1, evaluator="shap")
    with pytest.raises(ValueError, match="0 scored"):
        default_rung(optuna.create_study())
    flat = optuna.create_study()
    d = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for x in (0.1, 0.5, 0.9):
        flat.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=d, intermediate_values={1: 5.0}, value=5.0))
    with pytest.raises(ValueError, match="do not vary"):
        rung_importance(flat)


def test_the_report_gives_importance_at_the_rung_with_stopped_trials(tmp_path):
    from analysis.report import build_report

    from .test_analysis import build

    out = build(("search",)).write(tmp_path / "demo")
    (out / "optuna").mkdir()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna" / "search.journal")))
    journal = optuna.create_study(study_name="demo.search", storage=storage, direction="maximize")
    journal.add_trials(_asha_like_study().trials)
    text = build_report(out)
    section = text.split("### Parameter importance: search", 1)[1].split("\n#", 1)[0]
    assert "at task 1, over the 32 trials that reached it (24 stopped by ASHA)" in section
    rows = [line for line in section.splitlines() if line.startswith("| x") or line.startswith("| y")]
    assert rows[0].startswith("| x")  # the most important first
    # Without a journal (e.g. a bucket), no section and no error.
    assert "Parameter importance" not in build_report(build(("search",)).write(tmp_path / "bare"))
