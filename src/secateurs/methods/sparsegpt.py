"""SparseGPT: prune a layer and update its surviving weights with second-order (OBS) steps.

Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023). The layer's Hessian is ``H = 2 X^T X / n`` over its calibration inputs; since the
dampening is relative to ``mean(diag H)`` and every step is invariant to scaling ``H``, the Gram
``X^T X`` the statistics already gather serves as it is. Columns are processed left to right in
blocks of 128: inside a block the mask is chosen from the saliency ``w^2 / [H^-1]_jj^2``, then each
column is pruned and its error spread over the columns not yet processed through the upper
Cholesky factor of ``H^-1``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from secateurs.core.model import all_finite
from secateurs.core.patterns import SCOPES, NMSparsity, SparsityPattern, Unstructured, _lowest
from secateurs.core.spec import setting
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError
from secateurs.methods.registry import Method, register
from secateurs.methods.wanda import require_stats

BLOCK_SIZE = 128
DAMP = 0.01
# Each failed Cholesky factorisation retries with ten times the dampening.
RETRIES = 4


def inverse_factor(hessian: torch.Tensor, damp: float = DAMP, layer: str = "") -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` with ``lambda = damp * mean(diag H)``.

    Computed in float32, as the reference and llm-compressor, in one column-major buffer with
    each LAPACK step in place: the Cholesky factor, the inverse from it (``potri``, the
    reference's ``cholesky_inverse``), the lower factor ``L`` of that, whose transpose is the
    upper factor and, in that buffer, already a row-major tensor. At 11008 columns (LLaMA-2-7B's
    ``down_proj``) this holds 485 MB beside the Gram, where float64 copies in and out of each
    step held four times as much and took twice as long. A singular or indefinite ``H`` is
    retried from ``H`` with ten times the dampening, up to ``RETRIES`` times; then the layer
    is named in a clear error.
    """
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    for attempt in range(RETRIES + 1):
        h = _damped(hessian, damp * 10**attempt)
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) != 0:
            continue
        torch.cholesky_inverse(h, out=h)
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) == 0 and all_finite(h):
            return h.t()
    raise SecateursError(
        f"SparseGPT could not factor the Hessian of {layer or 'a layer'} even with dampening "
        f"{damp * 10**RETRIES:g} x its mean diagonal: its calibration inputs are degenerate "
        "(constant or non-finite). Use more or different calibration data (--nsamples, "
        "--dataset), or a method without a Hessian such as wanda"
    )


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) I`` in float32 (a new column-major tensor), a channel that never
    fired made independent of the others (it has no curvature)."""
    # LAPACK works on column-major matrices: torch copies a row-major one in and out of every
    # call (a second buffer each time); H is symmetric, so its transpose is the same matrix
    h = hessian.t().to(torch.float32, copy=True)
    diagonal = torch.diagonal(h)
    diagonal.masked_fill_(diagonal == 0, 1.0)
    diagonal += damp * diagonal.mean().clamp_min(1e-12)
    return h


def _block_mask(
    saliency: torch.Tensor, start: int, stop: int, ratio: float, scope: str
) -> torch.Tensor:
    """The unstructured mask of columns ``start:stop``: lowest saliency, in the block or per row.

    Each block prunes what keeps the running count at ``int(columns seen * ratio)``.
    """
    rows = saliency.shape[0]
    if scope == "row":
        k = int(stop * ratio) - int(start * ratio)
        return _lowest(saliency, k, dim=1)
    k = int(rows * stop * ratio) - int(rows * start * ratio)
    return _lowest(saliency.reshape(-1), k, dim=0).view_as(saliency)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratio: float = 0.5,
    nm: tuple[int, int] | None = None,
    scope: str = "layer",
    block_size: int = BLOCK_SIZE,
    damp: float = DAMP,
    layer: str = "",
    inverse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned and updated weight (input dtype) and its mask (True = pruned).

    ``nm = (n, m)`` prunes ``n`` of every ``m`` consecutive columns of each row, choosing each
    group when the sweep reaches it; otherwise ``ratio`` of the weights, chosen per column block:
    over the whole block (``scope="layer"``, as published) or within each row (``"row"``).
    Counts per block keep a running total, so the layer (or each row) loses exactly
    ``int(numel * ratio)`` (``int(cols * ratio)``) weights. ``inverse`` is
    :func:`inverse_factor` of ``hessian`` with ``damp`` where the caller has it already.
    """
    if scope not in SCOPES:
        raise SecateursError(f"SparseGPT scope must be one of {SCOPES}, got '{scope}'")
    columns = weight.shape[1]
    if nm is not None and (block_size % nm[1] or columns % nm[1]):
        raise SecateursError(
            f"{nm[0]}:{nm[1]} needs columns and the SparseGPT block ({block_size}) in multiples "
            f"of {nm[1]}, but {layer or 'a layer'} has {columns} columns"
        )
    w = weight.detach().float().clone()
    # As in the reference: an input that never fired gives its weights no say in the
    # calibration output, so they go first (zero saliency) whatever their magnitude.
    w[:, (torch.diagonal(hessian) == 0).to(w.device)] = 0
    if inverse is None:
        inverse = inverse_factor(hessian.to(w.device), damp, layer)
    inverse = inverse.to(w.device)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block = w[:, start:stop].clone()
        hinv = inverse[start:stop, start:stop]
        diag = torch.diagonal(hinv)
        saliency = block.square() / diag.square().unsqueeze(0)
        block_mask = (
            torch.zeros_like(block, dtype=torch.bool)
            if nm is not None
            else _block_mask(saliency, start, stop, ratio, scope)
        )
        errors = torch.zeros_like(block)
        for i in range(stop - start):
            if nm is not None and i % nm[1] == 0:
                group = block[:, i : i + nm[1]].square() / diag[i : i + nm[1]].square()
                block_mask[:, i : i + nm[1]] = _lowest(group, nm[0], dim=1)
            column = block[:, i]
            pruned = torch.where(block_mask[:, i], column, torch.zeros_like(column))
            error = pruned / diag[i]
            block[:, i:] -= error.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
            errors[:, i] = error
        block.masked_fill_(block_mask, 0)
        w[:, start:stop] = block
        mask[:, start:stop] = block_mask
        # in place: no temporary the size of the columns still to come
        w[:, stop:].addmm_(errors, inverse[start:stop, stop:], alpha=-1)
    return w.to(weight.dtype), mask


@dataclass(frozen=True)
class SparseGPTOptions:
    """SparseGPT's column block size and relative dampening (the reference's defaults)."""

    block_size: int = setting(
        BLOCK_SIZE,
        "sparsegpt: columns per block of OBS updates (128 as the reference).",
        flag="sparsegpt_blocksize",
    )
    damp: float = setting(
        DAMP,
        "sparsegpt: dampening of the Hessian, a share of its mean diagonal (0.01 as the "
        "reference; raised tenfold automatically where a layer's Hessian is singular).",
        flag="sparsegpt_damp",
    )

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SecateursError(f"--sparsegpt_blocksize must be at least 1, got {self.block_size}")
        if not self.damp > 0:  # NaN refused too
            raise SecateursError(
                f"--sparsegpt_damp must be > 0, got {self.damp}; 0.01 is the reference's value"
            )


def solve(
    weight: torch.Tensor,
    stats: ActivationStats,
    pattern: SparsityPattern,
    ratio: float,
    layer: str,
    options: SparseGPTOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's entry: SparseGPT on one layer with its statistics' Gram as the Hessian."""
    options = options or SparseGPTOptions()
    inverse = _LAST_FACTOR.get(stats.gram, options.damp, layer)
    common = {"block_size": options.block_size, "damp": options.damp, "layer": layer}
    return by_pattern(
        "sparsegpt",
        pattern,
        ratio,
        partial(sparsegpt_prune, weight, stats.gram, inverse=inverse, **common),
    )


class _LastFactor:
    """The inverse factor of the last Gram asked for, reused while the same Gram is asked
    for again: layers fed the same input (q/k/v, gate/up) share their statistics, so one
    factorisation serves them all. Only one is held, and only while its Gram lives."""

    def __init__(self) -> None:
        self._key: tuple[weakref.ref, int, float] | None = None
        self._factor: torch.Tensor | None = None

    def get(self, gram: torch.Tensor, damp: float, layer: str) -> torch.Tensor:
        key = self._key
        if key is not None and key[0]() is gram and key[1:] == (gram._version, damp):
            return self._factor
        self._forget()  # the old factor goes before the new one is made
        self._factor = inverse_factor(gram, damp, layer)
        self._key = (weakref.ref(gram, self._forget), gram._version, damp)
        return self._factor

    def _forget(self, gone: weakref.ref | None = None) -> None:
        """Drop the held factor (called with the dead reference when its Gram is freed)."""
        if gone is None or (self._key is not None and self._key[0] is gone):
            self._key = self._factor = None


_LAST_FACTOR = _LastFactor()


def by_pattern(
    method: str,
    pattern: SparsityPattern,
    ratio: float,
    prune: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call a layer solver with the pattern's N:M groups, or its unstructured ratio and scope;
    refuse any other pattern in ``method``'s name."""
    if isinstance(pattern, NMSparsity):
        return prune(nm=(pattern.n, pattern.m))
    if type(pattern) is not Unstructured:
        raise SecateursError(
            f"{method} prunes unstructured or N:M sparsity, not {pattern.describe()}"
        )
    return prune(ratio=ratio, scope=pattern.scope)


def sparsegpt_saliency(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """SparseGPT's saliency with a diagonal Hessian, ``W_ij^2 * (X^T X)_jj``.

    The solver picks the real masks from the inverse Hessian as it sweeps the columns; this
    score is what a caller asking for a score alone (``compute_pruning_metric``) gets.
    """
    gram = require_stats(stats, "sparsegpt").gram
    return weight.float().square() * torch.diagonal(gram).to(weight.device).unsqueeze(0)


register(
    Method(
        "sparsegpt",
        "second-order (OBS) masks and updates of the survivors, columns in blocks of 128",
        sparsegpt_saliency,
        scope="layer",
        options=SparseGPTOptions,
        statistics=lambda options: StatsRequest(gram=True),
        solver=solve,
        patterns=frozenset({"unstructured", "nm"}),
    )
)
