"""Pure score functions: a weight matrix and its input statistics in, a score tensor out.

Low scores are pruned first. Every function takes the weight as (out_features, in_features)
and returns a tensor of the same shape; none of them touches a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from secateurs.errors import SecateursError
from secateurs.stats import ActivationStats

ScoreFn = Callable[[torch.Tensor, "ActivationStats | None"], torch.Tensor]


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
    """Wanda times ``IDF_j``: channels active on fewer tokens weigh more."""
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

    ``gradient`` is the per-sample-absolute gradient sum of :mod:`secateurs.gradients`.
    """
    if gradient is None:
        raise ValueError("the wandg score needs the summed gradient magnitudes")
    return weight.abs().float() * gradient.to(weight.device)


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    ``scope`` is how unstructured pruning compares scores by default: ``row`` (each output row
    on its own, as reference Wanda) or ``layer`` (one threshold per matrix, as reference
    magnitude). ``calibrated`` says whether the method needs activations at all; ``needs``
    names statistics beyond the norms: ``selectivity`` (IDF, spikiness), ``classes``
    (per-token-class moments for the Fisher ratio), ``gradients`` (a whole-model gradient
    pass; the score function then takes the gradient magnitudes instead of statistics).
    """

    name: str
    score: ScoreFn
    scope: str
    calibrated: bool
    summary: str
    needs: frozenset[str] = frozenset()


METHODS: dict[str, Method] = {
    "magnitude": Method(
        "magnitude", magnitude_score, "layer", False, "|W|, one threshold per layer"
    ),
    "wanda": Method("wanda", wanda_score, "row", True, "|W| * ||X||, per output row"),
    "wanda_idf": Method(
        "wanda_idf", wanda_idf_score, "row", True, "Wanda * IDF", frozenset({"selectivity"})
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
        frozenset({"selectivity"}),
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
