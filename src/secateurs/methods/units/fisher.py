"""NeuronRank-Fisher for units: Wanda's unit score weighted by each channel's Fisher ratio.

The classes are the most frequent calibration tokens; a channel whose activation separates
them (between-class over within-class variance) weighs more (secateurs' ``neuronrank_fisher``
on whole units).
"""

from __future__ import annotations

import torch

from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.methods.units import UnitMethod, column_sums, register_unit

CLASSES = 128


def fisher_units(
    weight: torch.Tensor, stats: ActivationStats, units: torch.Tensor, remove: int
) -> torch.Tensor:
    """Sum over each unit's columns of ``||W_:,j||_1 * ||X_j|| * fisher_j``."""
    per_column = weight.abs().float().sum(dim=0) * stats.norm.float() * stats.fisher.float()
    return column_sums(per_column, units)


register_unit(
    UnitMethod(
        "fisher",
        "width",
        "Wanda unit score x the channel's Fisher ratio over frequent tokens",
        fisher_units,
        statistics=StatsRequest(classes=CLASSES),
    )
)
