"""DSnoT: training-free prune-and-grow cycles that refine any method's mask.

Zhang, Zhao, Lin, Ji, Yang, Hou, Li, Ji, Lin, Wu, Zhang, Ji, "Dynamic Sparse No Training:
Training-Free Fine-tuning for Sparse LLMs" (ICLR 2024). For a row ``i`` of a layer, pruning
shifts the expected output by ``e_i = sum over pruned j of W_ij * E[x_j]``. Each cycle grows
back the pruned weight that moves ``e_i`` most towards zero (largest ``W_ij E[x_j] /
Var[x_j]^p`` of the sign of ``e_i``) and prunes in its place a kept weight whose expected
output has the opposite sign, lowest score first (in N:M, the lowest-scored kept weight of
the grown weight's group, so the pattern holds). A row stops at its first swap that would
not keep the sign of ``e_i`` or not shrink ``|e_i|``, when ``|e_i|`` is below the threshold,
or after the last cycle.

The paper's code accepts a swap that keeps the sign even where ``|e_i|`` grows; here a swap
must also shrink it, so the refined mask is never worse than the initial one on DSnoT's own
objective. Every row keeps its count of pruned weights (and N:M its groups' counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from secateurs.core.patterns import NMSparsity, SparsityPattern
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError

REFINES = ("none", "dsnot")


@dataclass(frozen=True)
class DSnoTOptions:
    """The cycles of DSnoT (its paper's defaults)."""

    cycles: int = 50
    threshold: float = 0.1
    var_power: float = 1.0

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise SecateursError(f"--dsnot_cycles must be at least 1, got {self.cycles}")
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise SecateursError(f"--dsnot_threshold must be 0 or more, got {self.threshold}")
        if not (self.var_power >= 0 and math.isfinite(self.var_power)):
            raise SecateursError(f"--dsnot_var_power must be 0 or more, got {self.var_power}")


def expected_shift(weight: torch.Tensor, pruned: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per row, ``sum over pruned j of W_ij E[x_j]``: DSnoT's objective is its magnitude."""
    return ((weight.double() * mean.double()[None]) * pruned).sum(dim=1)


class _Queue:
    """Per row, candidates in a fixed order, taken front to back; ``inf`` keys are none."""

    def __init__(self, keys: torch.Tensor, descending: bool = False) -> None:
        filled = keys.masked_fill(keys.isnan(), math.inf)
        if descending:
            filled = torch.where(filled.isinf(), -math.inf, filled)
        self.keys, self.order = filled.sort(dim=1, descending=descending, stable=True)
        self.position = torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device)

    def peek(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next candidate and whether it exists."""
        at = self.position.clamp(max=self.order.shape[1] - 1)[:, None]
        exists = (self.position < self.order.shape[1]) & self.keys.gather(1, at)[:, 0].isfinite()
        return self.order.gather(1, at)[:, 0], exists

    def advance(self, rows: torch.Tensor) -> None:
        self.position += rows.long()


def dsnot(
    weight: torch.Tensor,
    score: torch.Tensor,
    pruned: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    options: DSnoTOptions | None = None,
    group: int = 0,
) -> torch.Tensor:
    """The refined mask (True = pruned) of ``weight`` (out x in), from the initial ``pruned``,
    the method's ``score`` (low = pruned first), and each input's mean and variance. ``group``
    is M of an N:M mask (0: unstructured)."""
    options = options or DSnoTOptions()
    w = weight.double()
    metric = w * mean.double().to(w.device)[None]
    pruned = pruned.clone()
    rows = torch.arange(w.shape[0], device=w.device)
    error = expected_shift(weight, pruned, mean)
    sign = error.sign()
    grow_key = metric / variance.double().to(w.device).clamp_min(1e-12)[None] ** options.var_power
    grow_key = grow_key.masked_fill(~pruned, math.nan)
    grow_up, grow_down = _Queue(grow_key, descending=True), _Queue(grow_key)
    kept_score = score.double().masked_fill(pruned, math.inf)
    if not group:
        cut_neg = _Queue(kept_score.masked_fill(metric >= 0, math.inf))
        cut_pos = _Queue(kept_score.masked_fill(metric <= 0, math.inf))
    active = error.abs() > options.threshold
    for _ in range(options.cycles):
        if not bool(active.any()):
            break
        positive = error > 0
        up, up_ok = grow_up.peek()
        down, down_ok = grow_down.peek()
        grow = torch.where(positive, up, down)
        ok = torch.where(positive, up_ok, down_ok) & pruned[rows, grow]
        if group:
            start = grow - grow % group
            columns = start[:, None] + torch.arange(group, device=w.device)[None]
            cut = columns.gather(1, kept_score.gather(1, columns).argmin(dim=1, keepdim=True))[:, 0]
            ok &= kept_score[rows, cut].isfinite()
        else:
            neg, neg_ok = cut_neg.peek()
            pos, pos_ok = cut_pos.peek()
            cut = torch.where(positive, neg, pos)
            ok &= torch.where(positive, neg_ok, pos_ok) & ~pruned[rows, cut]
        after = error + metric[rows, cut] - metric[rows, grow]
        accept = active & ok & (after.sign() == sign) & (after.abs() < error.abs())
        pruned[rows[accept], grow[accept]] = False
        pruned[rows[accept], cut[accept]] = True
        kept_score[rows[accept], cut[accept]] = math.inf
        error = torch.where(accept, after, error)
        grow_up.advance(accept & positive)
        grow_down.advance(accept & ~positive)
        if not group:
            cut_neg.advance(accept & positive)
            cut_pos.advance(accept & ~positive)
        active = accept & (error.abs() > options.threshold)
    return pruned


@dataclass(frozen=True)
class MaskRefiner:
    """DSnoT applied to every layer's mask after the method chose it (see :func:`dsnot`)."""

    options: DSnoTOptions = field(default_factory=DSnoTOptions)

    @property
    def request(self) -> StatsRequest:
        """DSnoT reads each input's mean beside Wanda's norms."""
        return StatsRequest(mean=True)

    def check(self, pattern: SparsityPattern) -> None:
        if pattern.kind not in ("unstructured", "nm"):
            raise SecateursError(
                f"--refine dsnot refines unstructured and N:M masks, not {pattern.describe()}"
            )

    def refine(
        self,
        weight: torch.Tensor,
        score: torch.Tensor,
        mask: torch.Tensor,
        stats: ActivationStats,
        pattern: SparsityPattern,
    ) -> torch.Tensor:
        mean = stats.mean.double()
        mean_square = stats.sq_norm.double() * stats.windows / max(stats.tokens, 1)
        variance = (mean_square - mean.square()).clamp_min(0.0)
        group = pattern.m if isinstance(pattern, NMSparsity) else 0
        return dsnot(weight, score, mask, mean, variance, self.options, group)
