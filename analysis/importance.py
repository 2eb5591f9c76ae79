"""Parameter importance of a search that counts the trials ASHA stopped.

Optuna's importance evaluators read COMPLETE trials only. In an ASHA search over task
sequences most trials are PRUNED, and the ones that complete are the survivors: their
parameters span a narrow, good region, so a parameter that decided who survived can look
unimportant among them. Here importance is computed at one **rung** (a task index) over
every trial, complete or pruned, that reached it, with the objective it had there
(``ContinualOptunaSearch`` reports one intermediate value per task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

EVALUATORS = ("fanova", "ped_anova")


@dataclass
class RungImportance:
    importances: dict[str, float]  # parameter -> importance (sums to 1 for fANOVA)
    rung: int  # the task index the values come from
    n_trials: int  # trials that reached the rung
    n_pruned: int  # of which ASHA stopped later (or at the rung)
    evaluator: str


def _scored(study) -> list:
    import optuna

    ok = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.trials if t.state in ok and t.intermediate_values and t.params]


def default_rung(study, min_share: float = 0.5) -> int:
    """The deepest task index that at least ``min_share`` of the scored trials (and at
    least 2) reached. [choice] A later rung's scores include forgetting (early ones
    flatter every trial: nothing is forgotten yet); half the trials keeps enough points
    for the evaluator."""
    trials = _scored(study)
    if len(trials) < 2:
        raise ValueError(f"{len(trials)} scored trial(s): importance needs 2 or more")
    need = max(2, math.ceil(min_share * len(trials)))
    steps = sorted({s for t in trials for s in t.intermediate_values}, reverse=True)
    for s in steps:
        if sum(s in t.intermediate_values for t in trials) >= need:
            return int(s)
    return int(steps[-1])


def rung_importance(study, rung: int | None = None, evaluator: Literal["fanova", "ped_anova"] = "fanova",
                    seed: int = 0) -> RungImportance:  # fmt: skip
    """Importance of each searched parameter at ``rung`` (default: :func:`default_rung`)
    over every COMPLETE or PRUNED trial with an intermediate value there."""
    import optuna

    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator {evaluator!r}: use one of {', '.join(EVALUATORS)}")
    rung = default_rung(study) if rung is None else int(rung)
    reached = [t for t in _scored(study) if rung in t.intermediate_values]
    if len(reached) < 2:
        raise ValueError(f"{len(reached)} trial(s) reached task {rung}: importance needs 2 or more")
    # A study of its own whose trials are the reached ones, each COMPLETE with its value
    # at the rung: Optuna's evaluators then see exactly them.
    view = optuna.create_study(direction=study.direction)
    for t in reached:
        view.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                 value=float(t.intermediate_values[rung])))  # fmt: skip
    ev: Any = (optuna.importance.FanovaImportanceEvaluator(seed=seed) if evaluator == "fanova"
               else optuna.importance.PedAnovaImportanceEvaluator())  # fmt: skip
    try:
        imp = optuna.importance.get_param_importances(view, evaluator=ev)
    except RuntimeError as e:  # fANOVA on objectives that do not vary at all
        raise ValueError(f"the {len(reached)} trials' objectives at task {rung} do not vary: no importance ({e})") from None
    n_pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in reached)
    return RungImportance({k: float(v) for k, v in imp.items()}, rung, len(reached), n_pruned, evaluator)


def load_search_study(results_dir: str | Path, stage: str):
    """The Optuna study of a search stage, from ``<results>/optuna/<stage>.journal``."""
    import optuna

    path = Path(str(results_dir)) / "optuna" / f"{stage}.journal"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Optuna journal for stage {stage!r} (only local results directories have one)")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    names = optuna.get_all_study_names(storage)
    wanted = [n for n in names if n.endswith(f".{stage}")] or names
    return optuna.load_study(study_name=wanted[0], storage=storage)
