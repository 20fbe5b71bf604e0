"""secateurs: prune large language models by weights and activations."""

from secateurs.api import (
    BasePruner,
    MagnitudePruner,
    MethodPruner,
    Pruned,
    WandaPruner,
    prune,
)
from secateurs.core.engine import PruneReport, prune_sequential
from secateurs.core.patterns import NMSparsity, SparsityPattern, Unstructured, parse_pattern
from secateurs.core.stats import ActivationStats
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import check_sparsity, perplexity
from secateurs.formats.checkpoint import convert_folder, is_compressed, rewrite_folder
from secateurs.formats.shrink import Shrinkage, shrink_mlps

__version__ = "0.1.0"

__all__ = [
    "ActivationStats",
    "BasePruner",
    "MagnitudePruner",
    "MethodPruner",
    "NMSparsity",
    "PruneReport",
    "Pruned",
    "SecateursError",
    "Shrinkage",
    "SparsityPattern",
    "Unstructured",
    "WandaPruner",
    "check_sparsity",
    "convert_folder",
    "is_compressed",
    "parse_pattern",
    "perplexity",
    "prune",
    "prune_sequential",
    "rewrite_folder",
    "shrink_mlps",
]
