"""Sequential LoRA fine-tuning: LoRA size and the optimiser knobs."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(1e-4, 1e-2), weight_decay=False)
    trial.suggest_categorical("method.lora.rank", [4, 8, 16, 32])
    trial.suggest_float("method.lora.alpha", 4.0, 64.0, log=True)
