"""Wanda: weights times input activation norms, pruned per output row.

Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language Models"
(ICLR 2024).
"""

from __future__ import annotations

import torch

from secateurs.core.stats import ActivationStats
from secateurs.methods.registry import Method, register


def weighted(weight: torch.Tensor, *channel_factors: torch.Tensor) -> torch.Tensor:
    """``|W_ij|`` times per-input-channel factors: the shape of every Wanda-family score."""
    score = weight.abs().float()  # a new tensor (abs), so the factors multiply in place
    for factor in channel_factors:
        score.mul_(factor.to(weight.device).unsqueeze(0))
    return score


def require_stats(stats: ActivationStats | None, method: str) -> ActivationStats:
    """The statistics a calibrated score reads, or a clear error without them."""
    if stats is None:
        raise ValueError(f"the {method} score needs activation statistics")
    return stats


def wanda_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """``|W_ij| * sqrt(s_j)``, Wanda's weight-times-activation-norm score."""
    return weighted(weight, require_stats(stats, "wanda").norm)


register(Method("wanda", "|W| * ||X||, per output row", wanda_score))
