"""Recovery: after a layer is pruned, give the lost signal back to the surviving weights.

Strategies are pure: dense weight, prune mask, scores and input statistics in, new weight out,
with every pruned weight exactly zero. :class:`WeightRedistributor` applies one inside the
engine, before the block's outputs are propagated, and reports the layer's relative output
error on the calibration activations before and after.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

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


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row (0 = lowest), ties in index order."""
    order = torch.argsort(values, dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


@dataclass
class InverseWandaStrategy(RecoveryStrategy):
    """Redistribute each row's lost mean output onto its least important survivors.

    Per row ``i`` with ``a_j`` the mean of input channel ``j`` over the calibration tokens:
    the lost signal is ``e_i = sum_{j pruned} W_ij a_j``; the candidates are the
    ``update_fraction`` of survivors with the lowest scores; ``c_ij = 1 / (score_ij + eps)``
    normalised to sum 1 over the candidates; ``W_ij += c_ij e_i / a_j``, then each update is
    capped at ``max_relative_update * |W_ij|``. Before the cap this restores every row's mean
    output exactly (``sum_j dW_ij a_j = e_i``). Channels whose ``|a_j|`` is below
    ``mean_guard`` times the mean ``|a|`` are never candidates, so no update divides by ~0.
    """

    update_fraction: float = 0.3
    max_relative_update: float = 2.0
    eps: float = 1e-8
    mean_guard: float = 1e-3
    name: str = field(default="inverse_wanda", init=False)
    request: StatsRequest = field(default=StatsRequest(mean=True), init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.update_fraction <= 1.0:
            raise SecateursError(
                f"update_fraction must be in (0, 1], got {self.update_fraction}; "
                "0.3 updates the 30% least important survivors of each row"
            )
        if not self.max_relative_update > 0.0:
            raise SecateursError(
                f"max_relative_update must be > 0, got {self.max_relative_update}; "
                "2.0 caps each update at twice the weight's magnitude"
            )

    def recover(self, dense, mask, score, stats):
        weight = dense.float()
        means = stats.mean.to(weight.device)
        lost = (weight * mask) @ means
        usable_columns = means.abs() > self.mean_guard * means.abs().mean().clamp_min(1e-30)
        usable = ~mask & usable_columns.unsqueeze(0)
        count = (usable.sum(dim=1).float() * self.update_fraction).floor().clamp_min(1)
        ranks = _ranks(score.float().masked_fill(~usable, float("inf")))
        candidates = usable & (ranks < count.unsqueeze(1))
        inverse = torch.where(candidates, 1.0 / (score.float() + self.eps), 0.0)
        coeff = inverse / inverse.sum(dim=1, keepdim=True).clamp_min(1e-30)
        safe_means = torch.where(usable_columns, means, torch.ones_like(means))
        delta = coeff * lost.unsqueeze(1) / safe_means.unsqueeze(0)
        cap = self.max_relative_update * weight.abs()
        delta = torch.maximum(torch.minimum(delta, cap), -cap)
        return (weight + delta).masked_fill(mask, 0).to(dense.dtype)


@dataclass
class LeastSquaresStrategy(RecoveryStrategy):
    """Update the survivors to minimise ``||(W_dense - W_new) X||^2 + lam ||W_new - W||^2``.

    The mask is fixed; each row's survivors solve the ridge-damped normal equations
    ``(G_SS + lam I) d = G_SP w_P`` with ``G = X^T X`` and ``lam = damp * mean(diag G)``. All
    rows are solved at once by Jacobi-preconditioned conjugate gradients, so every iteration
    is one ``(out x in) @ (in x in)`` matrix product; it stops when every row's residual is
    below ``tol`` relative to its right-hand side, or after ``max_iter`` iterations. This is the
    compensation family of SparseGPT and FLAP, solved exactly rather than column by column.
    """

    damp: float = 0.01
    max_iter: int = 100
    tol: float = 1e-3
    name: str = field(default="least_squares", init=False)
    request: StatsRequest = field(default=StatsRequest(gram=True), init=False)

    def __post_init__(self) -> None:
        if not self.damp > 0.0:
            raise SecateursError(f"damp must be > 0, got {self.damp}; 0.01 is the usual value")
        if self.max_iter < 1:
            raise SecateursError(f"max_iter must be at least 1, got {self.max_iter}")

    def recover(self, dense, mask, score, stats):
        gram = stats.gram.to(dense.device).float()
        weight = dense.float()
        keep = (~mask).float()
        lam = self.damp * torch.diagonal(gram).mean().clamp_min(1e-12)

        def system(v: torch.Tensor) -> torch.Tensor:
            return keep * (v @ gram + lam * v)

        rhs = keep * ((weight * mask) @ gram)
        precondition = 1.0 / (keep * (torch.diagonal(gram) + lam) + (1.0 - keep))
        update = torch.zeros_like(weight)
        residual = rhs.clone()
        direction = residual * precondition
        rz = (residual * direction).sum(dim=1)
        scale = rhs.norm(dim=1).clamp_min(1e-30)
        for _ in range(self.max_iter):
            if bool((residual.norm(dim=1) <= self.tol * scale).all()):
                break
            product = system(direction)
            step = rz / (direction * product).sum(dim=1).clamp_min(1e-30)
            update += step.unsqueeze(1) * direction
            residual -= step.unsqueeze(1) * product
            z = residual * precondition
            rz_next = (residual * z).sum(dim=1)
            direction = z + (rz_next / rz.clamp_min(1e-30)).unsqueeze(1) * direction
            rz = rz_next
        return (weight + update).masked_fill(mask, 0).to(dense.dtype)


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


STRATEGIES = {"inverse_wanda": InverseWandaStrategy, "least_squares": LeastSquaresStrategy}
