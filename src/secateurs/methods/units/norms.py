"""Norm scores for units: magnitude, and Wanda's weight-times-activation summed per unit.

Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024) scores a weight ``|W_ij| * ||X_j||``; a unit's score is that summed over its
consumer columns, as structured Wanda variants and LLM-Pruner's baselines do.
"""

from __future__ import annotations

import torch

from secateurs.core.stats import ActivationStats
from secateurs.methods.units import UnitMethod, column_sums, register_unit


def magnitude_units(
    weight: torch.Tensor, stats: ActivationStats, units: torch.Tensor, remove: int
) -> torch.Tensor:
    """Sum of ``|W|`` over each unit's consumer columns; no activations read."""
    return column_sums(weight.abs().float().sum(dim=0), units)


def wanda_units(
    weight: torch.Tensor, stats: ActivationStats, units: torch.Tensor, remove: int
) -> torch.Tensor:
    """Sum over each unit's columns of ``||W_:,j||_1 * ||X_j||``."""
    return column_sums(weight.abs().float().sum(dim=0) * stats.norm.float(), units)


register_unit(
    UnitMethod("magnitude", "width", "sum of |W| over the unit's columns", magnitude_units)
)
register_unit(
    UnitMethod(
        "wanda",
        "width",
        "Wanda |W| * ||X|| summed over the unit's columns",
        wanda_units,
        "Sun et al., ICLR 2024",
    )
)
