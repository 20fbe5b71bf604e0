"""secateurs: prune large language models by weights and activations.

The public names load on first use, so that ``import secateurs`` (and the command line's
``--help``) stays light. Saved compressed checkpoints load through transformers'
``from_pretrained`` after ``import secateurs``: the format registers itself as soon as
transformers is imported (now, if it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "secateurs.api": (
        "BasePruner",
        "MagnitudePruner",
        "MethodPruner",
        "Pruned",
        "WandaPruner",
        "prune",
    ),
    "secateurs.core.engine": ("PruneReport", "prune_sequential"),
    "secateurs.core.patterns": ("NMSparsity", "SparsityPattern", "Unstructured", "parse_pattern"),
    "secateurs.core.stats": ("ActivationStats",),
    "secateurs.errors": ("SecateursError",),
    "secateurs.evaluate.perplexity": ("check_sparsity", "perplexity"),
    "secateurs.formats.checkpoint": ("convert_folder", "is_compressed", "rewrite_folder"),
    "secateurs.formats.shrink": ("Shrinkage", "shrink_mlps"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
_CHECKPOINTS = "secateurs.formats.checkpoint"

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'secateurs' has no attribute '{name}'")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Imports the checkpoint format (which registers itself) right after transformers."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_then_register(module) -> None:
            run(module)
            importlib.import_module(_CHECKPOINTS)

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    importlib.import_module(_CHECKPOINTS)
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
