"""DGG: Bernoulli alpha (log scale), replay size, LoRA rank and alpha, lr, norm mode."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(1e-4, 1e-2), weight_decay=False)
    trial.suggest_float("method.alpha", 0.01, 1.0, log=True)
    trial.suggest_categorical("method.buffer_size", [0, 25, 50, 100, 200])
    trial.suggest_categorical("method.lora.rank", [4, 8, 16, 32])
    trial.suggest_float("method.lora.alpha", 4.0, 64.0, log=True)
    trial.suggest_categorical("method.norm", ["per_tensor", "global"])
