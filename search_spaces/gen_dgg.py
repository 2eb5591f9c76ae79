"""DGG on the generation track: Bernoulli alpha (log scale), replay per task, LoRA rank, lr."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(1e-5, 1e-3), weight_decay=False)
    trial.suggest_float("method.alpha", 0.02, 0.5, log=True)
    trial.suggest_categorical("method.buffer_size", [100, 250, 500, 1000])
    trial.suggest_categorical("method.lora.rank", [32, 64, 128])
