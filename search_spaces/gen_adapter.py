"""Sequential adapter / LoRA fine-tuning on the generation track: lr only (the baseline)."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(1e-5, 1e-3), weight_decay=False)
