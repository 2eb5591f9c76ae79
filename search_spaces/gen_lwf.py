"""LwF on the generation track: distillation weight and temperature, lr."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(1e-5, 1e-3), weight_decay=False)
    trial.suggest_float("method.distill_weight", 0.1, 10.0, log=True)
    trial.suggest_categorical("method.temperature", [1.0, 2.0, 4.0])
