"""NeuronRank-Fisher: Wanda times each input channel's Fisher ratio across token classes.

The classes are the most frequent calibration tokens; a channel whose activation separates them
(between-class over within-class variance) weighs more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secateurs.core.spec import setting
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError
from secateurs.methods.registry import Method, register
from secateurs.methods.wanda import require_stats, weighted


@dataclass(frozen=True)
class FisherOptions:
    """How many token classes the Fisher ratio compares."""

    classes: int = setting(
        128,
        "neuronrank_fisher: the K most frequent calibration tokens are the classes (K > 0).",
        flag="neuronrank_max_classes",
    )

    def __post_init__(self) -> None:
        check_classes(self.classes)


def check_classes(classes: int) -> int:
    """The Fisher class count, which must be positive."""
    if classes <= 0:
        raise SecateursError(
            f"--neuronrank_max_classes must be > 0, got {classes}; the Fisher ratio needs token "
            "classes (128 takes the 128 most frequent calibration tokens)"
        )
    return classes


def fisher_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """Wanda times the channel's Fisher ratio across token classes."""
    stats = require_stats(stats, "neuronrank_fisher")
    return weighted(weight, stats.norm, stats.fisher)


register(
    Method(
        "neuronrank_fisher",
        "Wanda * Fisher ratio over the most frequent tokens",
        fisher_score,
        options=FisherOptions,
        statistics=lambda options: StatsRequest(classes=options.classes),
    )
)
