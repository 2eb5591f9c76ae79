"""Experience replay: buffer size and policy, replay weight, optimiser knobs."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial)
    trial.suggest_categorical("method.buffer_size", [50, 100, 200, 500])
    trial.suggest_categorical("method.strategy", ["reservoir", "per_task"])
    trial.suggest_float("method.replay_weight", 0.25, 2.0, log=True)
