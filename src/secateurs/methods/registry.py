"""Pure score functions: a weight matrix and its input statistics in, a score tensor out.

Low scores are pruned first. Every function takes the weight as (out_features, in_features)
and returns a tensor of the same shape; none of them touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from secateurs.core.patterns import SparsityPattern
from secateurs.core.stats import ActivationStats
from secateurs.errors import SecateursError
from secateurs.methods import sparsegpt

ScoreFn = Callable[..., torch.Tensor]
# (weight, statistics, pattern, ratio, layer name) -> (new weight, prune mask)
Solver = Callable[
    [torch.Tensor, ActivationStats, SparsityPattern, float, str], tuple[torch.Tensor, torch.Tensor]
]


def magnitude_score(weight: torch.Tensor, stats: ActivationStats | None = None) -> torch.Tensor:
    """``|W_ij|``: the baseline that ignores activations."""
    return weight.abs().float()


def _weighted(weight: torch.Tensor, *channel_factors: torch.Tensor) -> torch.Tensor:
    """``|W_ij|`` times per-input-channel factors."""
    score = weight.abs().float()
    for factor in channel_factors:
        score = score * factor.to(weight.device).unsqueeze(0)
    return score


def _require(stats: ActivationStats | None, method: str) -> ActivationStats:
    if stats is None:
        raise ValueError(f"the {method} score needs activation statistics")
    return stats


def wanda_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """``|W_ij| * sqrt(s_j)``, Wanda's weight-times-activation-norm score."""
    return _weighted(weight, _require(stats, "wanda").norm)


def wanda_idf_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """Wanda times ``IDF_j`` (form from the statistics' options): rarer channels weigh more."""
    stats = _require(stats, "wanda_idf")
    return _weighted(weight, stats.norm, stats.idf)


def wanda_spiky_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """Wanda times spikiness ``R_j``: channels with peaked activations weigh more."""
    stats = _require(stats, "wanda_spiky")
    return _weighted(weight, stats.norm, stats.spikiness)


def wanda_select_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """Wanda times ``IDF_j * R_j``."""
    stats = _require(stats, "wanda_select")
    return _weighted(weight, stats.norm, stats.idf, stats.spikiness)


def fisher_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """Wanda times the channel's Fisher ratio across token classes."""
    stats = _require(stats, "neuronrank_fisher")
    return _weighted(weight, stats.norm, stats.fisher)


def wandg_score(weight: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
    """``|W_ij| * sum_s |dL_s/dW_ij|``, the SNIP-style score of Wei et al. (2024).

    ``gradient`` is the per-sample-absolute gradient sum of :mod:`secateurs.methods.gradients`.
    """
    if gradient is None:
        raise ValueError("the wandg score needs the summed gradient magnitudes")
    return weight.abs().float() * gradient.to(weight.device)


def ria_score(
    weight: torch.Tensor, stats: ActivationStats | None, alpha: float = 0.5
) -> torch.Tensor:
    """RIA (Zhang et al., ICLR 2024): relative importance times activation, ``|W_ij| / sum_k
    |W_kj| + |W_ij| / sum_k |W_ik|``, times ``sqrt(s_j) ** alpha``.

    Each weight is weighed against its input column and its output row, so a channel or a row
    whose weights are all large does not take every survivor.
    """
    magnitude = weight.abs().float()
    column_sums = magnitude.sum(dim=0, keepdim=True).clamp_min(1e-30)
    row_sums = magnitude.sum(dim=1, keepdim=True).clamp_min(1e-30)
    relative = magnitude / column_sums + magnitude / row_sums
    activation = _require(stats, "ria").norm.to(weight.device).pow(alpha)
    return relative * activation.unsqueeze(0)


def check_ria_alpha(alpha: float) -> float:
    """RIA's activation exponent, which must be finite and non-negative."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise SecateursError(
            f"--ria_alpha must be a finite number >= 0, got {alpha}; 0.5 is the paper's value "
            "(0 ignores activations)"
        )
    return float(alpha)


def sparsegpt_saliency(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """SparseGPT's saliency with a diagonal Hessian, ``W_ij^2 * (X^T X)_jj``.

    The solver picks the real masks from the inverse Hessian as it sweeps the columns; this
    score is what a caller asking for a score alone (``compute_pruning_metric``) gets.
    """
    gram = _require(stats, "sparsegpt").gram
    return weight.float().square() * torch.diagonal(gram).to(weight.device).unsqueeze(0)


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    ``scope`` is how unstructured pruning compares scores by default: ``row`` (each output row
    on its own, as reference Wanda) or ``layer`` (one threshold per matrix, as reference
    magnitude). ``calibrated`` says whether the method needs activations at all; ``needs``
    names statistics beyond the norms: ``selectivity`` (IDF, spikiness), ``idf`` (the score
    reads the IDF, so its form matters), ``classes`` (per-token-class moments for the
    Fisher ratio), ``gram`` (``X^T X``), ``gradients`` (a whole-model gradient pass; the
    score function then takes the gradient magnitudes instead of statistics). ``options``
    names the keyword arguments the score takes (``alpha`` for RIA). A method with a
    ``solver`` chooses each layer's mask and updates its survivors itself (SparseGPT).
    """

    name: str
    score: ScoreFn
    scope: str
    calibrated: bool
    summary: str
    needs: frozenset[str] = frozenset()
    options: frozenset[str] = frozenset()
    solver: Solver | None = None


METHODS: dict[str, Method] = {
    "magnitude": Method(
        "magnitude", magnitude_score, "layer", False, "|W|, one threshold per layer"
    ),
    "wanda": Method("wanda", wanda_score, "row", True, "|W| * ||X||, per output row"),
    "wanda_idf": Method(
        "wanda_idf",
        wanda_idf_score,
        "row",
        True,
        "Wanda * IDF",
        frozenset({"selectivity", "idf"}),
    ),
    "wanda_spiky": Method(
        "wanda_spiky",
        wanda_spiky_score,
        "row",
        True,
        "Wanda * spikiness",
        frozenset({"selectivity"}),
    ),
    "wanda_select": Method(
        "wanda_select",
        wanda_select_score,
        "row",
        True,
        "Wanda * IDF * spikiness",
        frozenset({"selectivity", "idf"}),
    ),
    "neuronrank_fisher": Method(
        "neuronrank_fisher",
        fisher_score,
        "row",
        True,
        "Wanda * Fisher ratio over the most frequent tokens",
        frozenset({"classes"}),
    ),
    "wandg": Method(
        "wandg",
        wandg_score,
        "row",
        False,
        "|W| * sum of |dL/dW| over samples (needs the LM loss; use --prune_data)",
        frozenset({"gradients"}),
    ),
    "wandg_set_difference": Method(
        "wandg_set_difference",
        wandg_score,
        "layer",
        False,
        "prune top-q wandg on --prune_data (safety) minus top-p on --utility_data, per matrix",
        frozenset({"gradients", "set_difference"}),
    ),
    "ria": Method(
        "ria",
        ria_score,
        "row",
        True,
        "relative importance (row and column) * ||X||^alpha",
        options=frozenset({"alpha"}),
    ),
    "sparsegpt": Method(
        "sparsegpt",
        sparsegpt_saliency,
        "layer",
        True,
        "second-order (OBS) masks and updates of the survivors, columns in blocks of 128",
        frozenset({"gram"}),
        solver=sparsegpt.solve,
    ),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SecateursError(
            f"unknown pruning method '{name}'; choose one of: {', '.join(METHODS)}"
        ) from None


def check_classes(classes: int) -> int:
    """The Fisher class count, which must be positive."""
    if classes <= 0:
        raise SecateursError(
            f"--neuronrank_max_classes must be > 0, got {classes}; the Fisher ratio needs token "
            "classes (128 takes the 128 most frequent calibration tokens)"
        )
    return classes
