"""Recovery machinery: apply a strategy to each pruned layer inside the engine, and report it.

A :class:`RecoveryStrategy` (the strategies live in :mod:`secateurs.methods.recovery`) is pure:
dense weight, prune mask, scores and input statistics in, new weight out, with every pruned
weight exactly zero. :class:`WeightRedistributor` applies one before the block's outputs are
propagated, and reports the layer's relative output error on the calibration activations
before and after.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """``||delta X||_F^2`` from the Gram matrix ``X^T X``, without the activations."""
    delta = delta.to(gram.dtype)
    return float(((delta @ gram) * delta).sum(dtype=torch.float64).clamp_min(0))


def relative_output_error(dense: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """``||W_new X - W_dense X|| / ||W_dense X||`` on the calibration activations."""
    reference = output_error(dense, gram)
    if reference == 0:
        return 0.0
    return math.sqrt(output_error(new.float() - dense.float(), gram) / reference)


class RecoveryStrategy(ABC):
    """Computes new weights for the survivors of a pruned layer."""

    name: str = "recovery"
    request: StatsRequest = StatsRequest()

    @abstractmethod
    def recover(
        self,
        dense: torch.Tensor,
        mask: torch.Tensor,
        score: torch.Tensor,
        stats: ActivationStats,
    ) -> torch.Tensor:
        """The recovered weight (out, in); True in ``mask`` means pruned and must stay zero."""


@dataclass
class LayerRecovery:
    """What recovery did to one layer."""

    pruned: int
    total: int
    relative_error_before: float
    relative_error_after: float


class WeightRedistributor:
    """Applies a recovery strategy to each pruned layer and keeps its error report.

    The before/after error report needs ``X^T X``. A strategy that solves with it gets the
    exact matrix; for the others the report estimates it from a seeded random
    ``report_fraction`` of the calibration tokens (a sixteenth by default: about a thousand
    tokens in the benchmark, enough for a report), because the full product costs about as
    much as a forward pass through the block.
    """

    def __init__(self, strategy: RecoveryStrategy, report_fraction: float = 0.0625) -> None:
        if not 0.0 < report_fraction <= 1.0:
            raise SecateursError(
                f"report_fraction must be in (0, 1], got {report_fraction}; "
                "1.0 reports exact errors, 0.0625 estimates them from a sixteenth of the tokens"
            )
        self.strategy = strategy
        self.report_fraction = report_fraction

    @property
    def request(self) -> StatsRequest:
        """The statistics the strategy and the error report need."""
        report = StatsRequest(gram=True, gram_fraction=self.report_fraction)
        return self.strategy.request.merge(report)

    def apply(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor,
        score: torch.Tensor,
        stats: ActivationStats,
    ) -> LayerRecovery:
        """Prune ``weight`` in place with recovery; report errors against the dense weight."""
        dense = weight.clone()
        pruned = dense.masked_fill(mask, 0)
        new = self.strategy.recover(dense, mask, score, stats)
        if not torch.isfinite(new).all():
            raise FloatingPointError(f"{self.strategy.name} produced non-finite weights")
        weight.copy_(new)
        gram = stats.gram
        return LayerRecovery(
            pruned=int(mask.sum()),
            total=mask.numel(),
            relative_error_before=relative_output_error(dense, pruned, gram),
            relative_error_after=relative_output_error(dense, new, gram),
        )


# (weight, prune mask, X^T X of its inputs, X^T T with the target) -> new weight, mask kept zero
MaskedSolve = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
STREAMS = ("pruned", "dense")


@dataclass(frozen=True)
class BlockReconstruction:
    """After a block is pruned, refit the output layer of each sub-block (attention's
    ``o_proj``, then the MLP's ``down_proj``) on its surviving weights, on the inputs the pruned
    layers before it really give: ``o_proj`` to the unpruned ``o_proj``'s output, ``down_proj``
    so that the block's output is the unpruned block's (see
    :func:`secateurs.core.targets.paired_target`).

    ``stream`` "pruned": the unpruned block runs on the pruned model's stream, as layer
    recovery does. "dense": it runs on the dense model's own stream, so the refit also aims to
    make up for the earlier blocks' drift; its outputs are that stream's next step, so it
    costs a second buffer of activations, not another pass.

    With ``epochs`` > 0 the refit is followed by training: every surviving weight of the
    block's linear layers, by Adam at ``lr`` on the mean squared error between the block's
    output and the unpruned block's, over the calibration windows ``epochs`` times (the
    local reconstruction of Roux et al., arXiv 2510.14444); the pruned weights stay zero.
    """

    solve: MaskedSolve
    stream: str = "dense"
    epochs: int = 0
    lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise SecateursError(
                f"unknown reconstruction stream '{self.stream}'; use {' or '.join(STREAMS)}"
            )
        if self.epochs < 0:
            raise SecateursError(
                f"--reconstruct_epochs must be 0 or more, got {self.epochs}; 0 refits only"
            )
        if not self.lr > 0:
            raise SecateursError(f"--reconstruct_lr must be > 0, got {self.lr}; try 1e-4")


@dataclass
class LayerReconstruction:
    """One refit output layer: its relative error against the target before and after."""

    layer: str
    aim: str
    relative_error_before: float
    relative_error_after: float
