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


def wanda_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """``|W_ij| * sqrt(s_j)``, Wanda's weight-times-activation-norm score."""
    if stats is None:
        raise ValueError("the wanda score needs activation statistics")
    return weight.abs().float() * stats.norm.to(weight.device).unsqueeze(0)


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    ``scope`` is how unstructured pruning compares scores by default: ``row`` (each output row
    on its own, as reference Wanda) or ``layer`` (one threshold per matrix, as reference
    magnitude). ``calibrated`` says whether the method needs activations at all.
    """

    name: str
    score: ScoreFn
    scope: str
    calibrated: bool
    summary: str


METHODS: dict[str, Method] = {
    "magnitude": Method(
        "magnitude", magnitude_score, "layer", False, "|W|, one threshold per layer"
    ),
    "wanda": Method("wanda", wanda_score, "row", True, "|W| * ||X||, per output row"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SecateursError(
            f"unknown pruning method '{name}'; choose one of: {', '.join(METHODS)}"
        ) from None
