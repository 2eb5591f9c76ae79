"""Knobs every method shares: the optimiser's learning rate and, optionally, its length."""

from __future__ import annotations

from typing import Any


def training_knobs(trial: Any, lr: tuple[float, float] = (1e-5, 3e-3), weight_decay: bool = True) -> None:
    trial.suggest_float("training.lr", *lr, log=True)
    if weight_decay:
        trial.suggest_float("training.weight_decay", 1e-6, 1e-1, log=True)
