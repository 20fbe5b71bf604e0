"""FLAP's fluctuation score: how much a unit's input varies, times its weights' energy.

An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models",
AAAI 2024: a channel whose input barely varies over the calibration tokens can be replaced by
its mean, so its score is the sample variance of input ``j`` times ``||W_:,j||^2``; a unit's
score is the sum over its columns. Their mean goes back into the bias (``--compensation mean``
where the layer has one); secateurs' default refit does at least as well on the calibration
objective.
"""

from __future__ import annotations

import torch

from secateurs.core.stats import ActivationStats
from secateurs.methods.units import UnitMethod, column_sums, register_unit, variance


def flap_units(
    weight: torch.Tensor, stats: ActivationStats, units: torch.Tensor, remove: int
) -> torch.Tensor:
    """Sum over each unit's columns of ``var(X_j) * ||W_:,j||^2``."""
    energy = weight.double().square().sum(dim=0)
    return column_sums((variance(stats) * energy).float(), units)


register_unit(
    UnitMethod(
        "flap",
        "width",
        "input fluctuation x ||W_:,j||^2 (FLAP)",
        flap_units,
        "An et al., AAAI 2024",
    )
)
