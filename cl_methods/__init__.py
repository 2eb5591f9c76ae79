"""Continual-learning methods, one per module, found through a registry.

``@register`` marks a :class:`~cl_methods.base.Method` subclass; :func:`get_method_class`
imports the package's modules on first use (not at import time) so a method is available
by the name a study YAML gives, without a central list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cl_methods.base import Method

_REGISTRY: dict[str, type["Method"]] = {}
_LOADED = False


def register(cls: type["Method"]) -> type["Method"]:
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty 'name'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is registered twice")
    if "full" not in cls.ablations:
        raise TypeError(f"{cls.__qualname__}.ablations must contain 'full'")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules(__path__):
        # Private modules hold shared helpers, not methods.
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True


def registered_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type["Method"]:
    _load_all()
    return _REGISTRY[name]


def build_method(name: str, config: dict) -> "Method":
    cls = get_method_class(name)
    return cls(cls.Config.model_validate(config))
