"""Optuna search spaces, one module per method, referenced from a study YAML by name.

A module defines ``space(trial) -> dict | None``: a define-by-run function that calls
``trial.suggest_*`` with dotted parameter names (``training.lr``, ``method.<knob>``; the
``method.`` prefix means the method's config) and may return constant overrides.
Conditional knobs are plain ``if`` statements, which is why define-by-run beats a static
dict here. Parameter names are checked against the run block when a study is loaded
(``mmcl.study.check_stages`` samples the space once), so a typo fails before any trial.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

SpaceFn = Callable[[Any], "dict[str, Any] | None"]


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_space(name: str) -> SpaceFn:
    if name not in available():
        raise KeyError(f"unknown search space {name!r}; available: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}").space
