"""LwF: distillation weight and temperature, plus the shared optimiser knobs."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial)
    trial.suggest_float("method.distill_weight", 0.1, 10.0, log=True)
    trial.suggest_float("method.temperature", 1.0, 4.0)
    trial.suggest_categorical("method.heads", ["previous", "seen"])
