"""Sequential fine-tuning: only the optimiser knobs and which tower trains."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial)
    trial.suggest_categorical("method.params", ["image", "all"])
