"""RIA: relative importance times activation.

Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language
Models" (ICLR 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from secateurs.core.spec import setting
from secateurs.core.stats import ActivationStats
from secateurs.errors import SecateursError
from secateurs.methods.registry import Method, register
from secateurs.methods.wanda import require_stats


@dataclass(frozen=True)
class RiaOptions:
    """RIA's activation exponent."""

    alpha: float = setting(
        0.5, "ria: exponent of the activation norm (0.5 as in the paper).", flag="ria_alpha"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_ria_alpha(self.alpha))


def check_ria_alpha(alpha: float) -> float:
    """RIA's activation exponent, which must be finite and non-negative."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise SecateursError(
            f"--ria_alpha must be a finite number >= 0, got {alpha}; 0.5 is the paper's value "
            "(0 ignores activations)"
        )
    return float(alpha)


def ria_score(
    weight: torch.Tensor, stats: ActivationStats | None, alpha: float = 0.5
) -> torch.Tensor:
    """``|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|``, times ``sqrt(s_j) ** alpha``.

    Each weight is weighed against its input column and its output row, so a channel or a row
    whose weights are all large does not take every survivor.
    """
    magnitude = weight.abs().float()
    column_sums = magnitude.sum(dim=0, keepdim=True).clamp_min(1e-30)
    row_sums = magnitude.sum(dim=1, keepdim=True).clamp_min(1e-30)
    relative = magnitude / column_sums + magnitude / row_sums
    activation = require_stats(stats, "ria").norm.to(weight.device).pow(alpha)
    return relative * activation.unsqueeze(0)


def _score(
    weight: torch.Tensor, stats: ActivationStats | None, options: RiaOptions
) -> torch.Tensor:
    return ria_score(weight, stats, options.alpha)


register(
    Method(
        "ria",
        "relative importance (row and column) * ||X||^alpha",
        _score,
        options=RiaOptions,
    )
)
