"""CMA: experts, top-k, bottleneck, loss weights, freezing threshold, learning rate."""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(1e-4, 3e-3), weight_decay=False)
    experts = trial.suggest_categorical("method.experts", [4, 6, 8])
    # top_k depends on the number of experts: define-by-run keeps it valid (k <= E / 2).
    trial.suggest_int("method.top_k", 1, experts // 2)
    trial.suggest_categorical("method.bottleneck", [16, 32, 64])
    trial.suggest_float("method.distill_weight", 0.1, 4.0, log=True)
    trial.suggest_float("method.align_weight", 0.01, 1.0, log=True)
    trial.suggest_float("method.preserve_weight", 0.1, 10.0, log=True)
    trial.suggest_float("method.freeze_threshold", 0.1, 0.5)
