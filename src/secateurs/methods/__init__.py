"""Pruning methods, one file per family; each registers itself in :mod:`.registry`."""

import importlib
import pkgutil

from secateurs.methods.registry import METHODS, Method, get_method, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "get_method", "register"]
