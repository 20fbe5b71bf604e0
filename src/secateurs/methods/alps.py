"""ALPS: the mask and the weights of a layer chosen jointly by ADMM, then refit on the mask.

Meng, Behdin, Wang and Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models" (NeurIPS 2024). Each layer solves

    min_W  ||X W^T - X W0^T||^2   subject to W having the pattern's zeros,

by splitting ``W`` into a dense copy ``B`` and a sparse copy ``D`` tied by ``B = D``: the
``B`` step is a ridge solve through one eigendecomposition of the Gram, the ``D`` step
projects ``B + V / rho`` onto the pattern (largest magnitudes kept), and the multiplier ``V``
gathers the disagreement. The penalty ``rho`` grows with how much the support still moves, so
the support settles; then the kept weights are refit to the dense outputs by conjugate
gradients on the support. Following the authors' code, the Gram is damped by 1% of its mean
diagonal and scaled to a unit diagonal first (which also preconditions the conjugate
gradients), and unstructured masks are chosen over the whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from secateurs.core.patterns import SparsityPattern, _lowest, nm_mask
from secateurs.core.spec import setting
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError
from secateurs.methods.recovery import rows_conjugate_gradients
from secateurs.methods.registry import Method, register
from secateurs.methods.sparsegpt import by_pattern, sparsegpt_saliency

DAMP = 0.01
RHO = 0.1
RHO_MAX = 1e6
CHECK_EVERY = 3  # iterations between looks at the support (and changes of rho)
SETTLE_AFTER = 30  # from this iteration on, a support that moves less than SETTLED stops
SETTLED = 3e-4


@dataclass(frozen=True)
class ALPSOptions:
    """ALPS's iteration budget and its final refit (the authors' defaults)."""

    iterations: int = setting(
        300, "alps: most ADMM iterations per layer (most layers settle far sooner).",
        flag="alps_iterations",
    )  # fmt: skip
    cg_iterations: int = setting(
        10, "alps: conjugate-gradient steps of the final refit on the mask.",
        flag="alps_cg_iterations",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise SecateursError(f"--alps_iterations must be at least 1, got {self.iterations}")
        if self.cg_iterations < 0:
            raise SecateursError(
                f"--alps_cg_iterations must be at least 0, got {self.cg_iterations}"
            )


def _projector(shape: torch.Size, ratio: float, nm: tuple[int, int] | None, scope: str):
    """The prune mask (True = zero) of the pattern's best approximation of a matrix."""
    rows, cols = shape
    if nm is not None:
        return lambda x: nm_mask(x.abs(), *nm)
    if scope == "row":
        k = int(cols * ratio)
        return lambda x: _lowest(x.abs(), k, dim=1)
    k = int(rows * cols * ratio)
    return lambda x: _lowest(x.abs().reshape(-1), k, dim=0).view(rows, cols)


def _normalised(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The damped Gram scaled to a unit diagonal, and the scale (the diagonal's square root)."""
    h = gram.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean().clamp_min(1e-12)))
    scale = h.diagonal().sqrt()
    return h / scale.unsqueeze(0) / scale.unsqueeze(1), scale


# Layers fed the same input (q/k/v, gate/up) share one Gram tensor: its decomposition is
# kept while the tensor lives and is unchanged (in-place edits bump its version).
_DECOMPOSED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _decomposed(
    gram: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normalised Gram, its scale, and its eigenvalues and eigenvectors, all float32.

    The eigendecomposition, which serves every penalty's ridge inverse, is taken in float64;
    the iterations run in float32, as in the authors' code.
    """
    kept = _DECOMPOSED.get(gram)
    if kept is not None and kept[0] == gram._version:
        return kept[1]
    h, scale = _normalised(gram, DAMP)
    eigenvalues, vectors = torch.linalg.eigh(h)
    result = (h.float(), scale.float(), eigenvalues.float(), vectors.float())
    _DECOMPOSED[gram] = (gram._version, result)
    return result


def refit_on_support(
    h: torch.Tensor, target: torch.Tensor, start: torch.Tensor, keep: torch.Tensor, steps: int
) -> torch.Tensor:
    """``steps`` conjugate-gradient steps on ``B h = target`` for every row, entries outside
    ``keep`` held at 0: the independent systems ``h_SS b_S = target_S``, from ``start``."""
    mask = keep.to(h.dtype)
    precondition = 1.0 / (mask * h.diagonal() + (1.0 - mask))
    return rows_conjugate_gradients(
        lambda v: mask * (v @ h), mask * target, precondition, steps, 0.0, start * mask
    )


def alps_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    ratio: float = 0.5,
    nm: tuple[int, int] | None = None,
    scope: str = "layer",
    options: ALPSOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned, refit weight (input dtype) and its mask (True = pruned).

    ``nm = (n, m)`` prunes ``n`` of every ``m`` consecutive columns of each row; otherwise
    ``int(numel * ratio)`` weights of the layer (``scope="layer"``, as published) or
    ``int(cols * ratio)`` of each row (``"row"``).
    """
    options = options or ALPSOptions()
    h, scale, eigenvalues, vectors = _decomposed(gram.to(weight.device))
    b0 = weight.detach().float() * scale.unsqueeze(0)
    target = b0 @ h
    project = _projector(weight.shape, ratio, nm, scope)
    first = project(b0)
    pruned_count = max(int(first.sum()), 1)

    def ridge_inverse(rho: float) -> torch.Tensor:
        return (vectors / (eigenvalues + rho).unsqueeze(0)) @ vectors.t()

    rho = RHO
    inverse = ridge_inverse(rho)
    d_start = b0.masked_fill(first, 0)
    support, d = first, d_start
    dual = torch.zeros_like(b0)
    b = b0
    rho_raised = False
    for iteration in range(options.iterations):
        b = (target - dual + rho * d) @ inverse
        shifted = b + dual / rho
        mask = project(shifted)
        d = shifted.masked_fill(mask, 0)
        dual = dual + rho * (b - d)
        if (iteration + 1) % CHECK_EVERY:
            continue
        change = int((mask != support).sum())
        support = mask
        share = change / pruned_count
        if share > 0.1:
            rho, rho_raised = rho * 1.3, True
        elif share > 0.005:
            rho, rho_raised = rho * 1.2, True
        elif change > 0 and rho_raised:
            rho *= 1.1
        elif change > 0:
            # the support moves while rho has only shrunk: start over with a smaller rho
            rho /= 5
            b, d, dual = b0, d_start, torch.zeros_like(b0)
        elif rho_raised:
            break
        else:
            rho /= 5
        rho = min(rho, RHO_MAX)
        inverse = ridge_inverse(rho)
        if iteration >= SETTLE_AFTER and share < SETTLED:
            break
    mask = project(b)
    b = refit_on_support(h, target, b.masked_fill(mask, 0), ~mask, options.cg_iterations)
    new = (b / scale.unsqueeze(0)).masked_fill(mask, 0)
    return new.to(weight.dtype), mask


def solve(
    weight: torch.Tensor,
    stats: ActivationStats,
    pattern: SparsityPattern,
    ratio: float,
    layer: str,
    options: ALPSOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's entry: ALPS on one layer with its statistics' Gram."""
    return by_pattern(
        "alps", pattern, ratio, partial(alps_prune, weight, stats.gram, options=options)
    )


register(
    Method(
        "alps",
        "ADMM over mask and weights jointly with a growing penalty, then a refit on the mask",
        sparsegpt_saliency,
        scope="layer",
        options=ALPSOptions,
        statistics=lambda options: StatsRequest(gram=True),
        solver=solve,
        patterns=frozenset({"unstructured", "nm"}),
    )
)
