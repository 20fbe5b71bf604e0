"""Magnitude pruning: the baseline that ignores activations (one threshold per layer)."""

from __future__ import annotations

import torch

from secateurs.core.stats import ActivationStats
from secateurs.methods.registry import Method, register


def magnitude_score(weight: torch.Tensor, stats: ActivationStats | None = None) -> torch.Tensor:
    """``|W_ij|``; Han et al. (NeurIPS 2015), as the Wanda paper's baseline."""
    return weight.abs().float()


register(
    Method(
        "magnitude",
        "|W|, one threshold per layer",
        magnitude_score,
        scope="layer",
        calibrated=False,
    )
)
