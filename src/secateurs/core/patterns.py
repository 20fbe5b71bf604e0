"""Pure mask functions: a score matrix in, a boolean prune mask out (True = weight removed).

Ties are broken by a stable sort, so the same scores always give the same mask.
"""

from __future__ import annotations

import re
import warnings
from abc import ABC, abstractmethod

import torch

from secateurs.errors import SecateursError

SCOPES = ("row", "layer")
DEFAULT_RATIO = 0.5  # --sparsity_ratio's default
_SORT_BELOW = 16


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise SecateursError(
            f"--sparsity_ratio must be in [0, 1), got {ratio}; 0.5 removes half of the weights"
        )
    return float(ratio)


def _lowest(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest entries along ``dim``, ties taken in index order.

    This is exactly what a stable sort would select (NaN sorts last). Along long dimensions
    a k-th value search is several times faster than sorting; short N:M groups sort faster.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = _kth_value(score, k, dim) if score.shape[dim] > _SORT_BELOW else None
    # a NaN k-th value compares false with everything: only a sort selects k entries then
    if kth is None or bool(kth.isnan().any()):
        mask = torch.zeros_like(score, dtype=torch.bool)
        order = torch.argsort(score, dim=dim, stable=True)
        return mask.scatter_(dim, order.narrow(dim, 0, k), True)
    # usually no other entry ties the k-th value: then "at most the k-th" is exactly k entries;
    # only the rows where it is not (ties) need the index-order rule
    at_most = score <= kth
    exact = _count(at_most, dim) == k
    if bool(exact.all()):
        return at_most
    if score.dim() != 2 or dim % 2 != 1:
        return _with_ties(score, kth, k, dim)
    rows = (~exact).squeeze(1).nonzero().squeeze(1)
    at_most[rows] = _with_ties(score[rows], kth[rows], k, dim)
    return at_most


_SAME_WIDTH_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_masked(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Set ``weight`` to +0.0 where ``mask`` is True, in place, every other bit unchanged.

    Multiplying the bit pattern, viewed as integers of the same width, by the kept mask gives
    exactly ``masked_fill_(mask, 0)`` (+0.0, never -0.0) at several times less cost on a CPU:
    applying masks otherwise stands out beside the forward passes of a Wanda prune.
    """
    ints = _SAME_WIDTH_INTS.get(weight.element_size())
    if ints is None or not weight.is_floating_point() or not weight.is_contiguous():
        weight.masked_fill_(mask, 0)
        return
    weight.view(ints).mul_(mask.logical_not())


def _count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """How many entries along ``dim`` are True (kept as a dimension of one).

    Counted in the narrowest integer type that holds the length: summing booleans into the
    default int64 takes several times longer, and at 7B sizes it stood out among the mask costs.
    """
    size = mask.shape[dim]
    dtype = torch.int16 if size < 2**15 else torch.int32 if size < 2**31 else torch.int64
    return mask.sum(dim=dim, keepdim=True, dtype=dtype)


def _kth_value(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The ``k``-th smallest entry along ``dim`` (kept as a dimension of one), NaN if a NaN
    could be it.

    An unsorted top-k and one reduction over it take less time than ``kthvalue`` on a CPU;
    the shorter side of the split is searched (the k lowest, or the rest from the top).
    """
    size = score.shape[dim]
    if k <= size - k + 1:
        low = score.topk(k, dim=dim, largest=False, sorted=False).values
        return low.amax(dim=dim, keepdim=True)
    high = score.topk(size - k + 1, dim=dim, largest=True, sorted=False).values
    return high.amin(dim=dim, keepdim=True)


def _with_ties(score: torch.Tensor, kth: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The ``k`` lowest along ``dim`` given the k-th values, ties taken in index order."""
    below = score < kth
    tied = score == kth
    still_needed = k - _count(below, dim)
    if bool((_count(tied, dim) == still_needed).all()):
        return below | tied  # every tie is taken: no int64 running count over the matrix
    return below | (tied & (tied.cumsum(dim=dim) <= still_needed))


def row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the ``int(cols * ratio)`` lowest scores of every row."""
    return _lowest(score, int(score.shape[1] * ratio), dim=1)


def layer_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the ``int(numel * ratio)`` lowest scores of the whole matrix."""
    flat = _lowest(score.reshape(-1), int(score.numel() * ratio), dim=0)
    return flat.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive columns of a row, prune the ``n`` lowest scores."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{cols} columns do not split into groups of {m}")
    groups = score.reshape(rows, cols // m, m)
    return _lowest(groups, n, dim=2).view(rows, cols)


def variant_mask(
    score: torch.Tensor,
    ratio: float,
    alpha: float = 0.4,
    bracket: tuple[float, float] = (0.0, 0.8),
    tolerance: float = 1e-3,
) -> torch.Tensor:
    """The Wanda variant: each row prunes its lowest scores whose cumulative sum stays within
    ``alpha`` of the row's total, with one ``alpha`` for the matrix found by bisection.

    Bisection starts at ``alpha`` inside ``bracket`` and stops once the matrix sparsity is
    within ``tolerance`` of ``ratio`` or the bracket is narrower than ``tolerance``. Rows keep
    their own counts, so a row whose mass sits in a few weights loses more of the rest.
    """
    ordered, order = torch.sort(score.float(), dim=1, stable=True)
    cumulative = ordered.cumsum(dim=1)
    totals = cumulative[:, -1:]
    positions = torch.arange(score.shape[1], device=score.device)
    low, high = bracket

    def prune_at(a: float) -> tuple[torch.Tensor, float]:
        counts = (cumulative <= a * totals).sum(dim=1, keepdim=True)
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask.scatter_(1, order, positions.unsqueeze(0) < counts)
        return mask, float(counts.sum()) / score.numel()

    mask, sparsity = prune_at(alpha)
    while abs(sparsity - ratio) > tolerance and high - low >= tolerance:
        if sparsity > ratio:
            high, alpha = alpha, (alpha + low) / 2
        else:
            low, alpha = alpha, (alpha + high) / 2
        mask, sparsity = prune_at(alpha)
    return mask


def top_fraction(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ``int(numel * fraction)`` highest scores of the flattened matrix."""
    flat = _lowest(-score.float().reshape(-1), int(score.numel() * fraction), dim=0)
    return flat.view_as(score)


def set_difference_mask(
    safety: torch.Tensor, utility: torch.Tensor, p: float, q: float
) -> torch.Tensor:
    """Weights in the top-``q`` safety set but not in the top-``p`` utility set (Wei et al.).

    Both sets are taken over the whole flattened matrix, so rows lose different counts.
    ``p`` names the utility fraction and ``q`` the safety fraction, as the reference code
    and the paper's (p, q) tables do.
    """
    if safety.shape != utility.shape:
        raise ValueError(f"score shapes differ: {tuple(safety.shape)} vs {tuple(utility.shape)}")
    return top_fraction(safety, q) & ~top_fraction(utility, p)


class SparsityPattern(ABC):
    """Turns a score matrix into a prune mask. Subclass it to add a pattern.

    A ``structured`` pattern prunes whole MLP neurons: the engine asks it for the mask of
    each MLP's consumer layer, and prunes the producers' matching rows along with it.
    """

    structured = False
    kind = "custom"  # what methods declare they support: unstructured, nm, variant, neuron

    @abstractmethod
    def create_mask(self, metric: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
        """Boolean mask, True where the weight is pruned."""

    def check_columns(self, columns: int, layer: str) -> None:  # noqa: B027 (optional hook)
        """Raise before any work if a layer with this many input columns cannot take it."""

    @abstractmethod
    def describe(self) -> str: ...


class Unstructured(SparsityPattern):
    """Any weight may go; scores compete within a row or within the whole layer."""

    kind = "unstructured"

    def __init__(self, scope: str = "row") -> None:
        if scope not in SCOPES:
            raise SecateursError(f"unstructured scope must be one of {SCOPES}, got '{scope}'")
        self.scope = scope

    def create_mask(self, metric: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
        fn = row_mask if self.scope == "row" else layer_mask
        return fn(metric, sparsity_ratio)

    def describe(self) -> str:
        return f"unstructured (per {self.scope})"


class Variant(SparsityPattern):
    """Unstructured, with the Wanda variant's adaptive per-row counts (``--use_variant``)."""

    kind = "variant"

    def create_mask(self, metric: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
        return variant_mask(metric, sparsity_ratio)

    def describe(self) -> str:
        return "unstructured (Wanda variant)"


class NeuronSparsity(SparsityPattern):
    """Whole MLP neurons go, ranked by the sum of their consumer column's scores.

    Removing a neuron drops a row of every producer (up, gate) and a column of the
    consumer (down): the MLP becomes narrower, which speeds up any runtime.
    """

    kind = "neuron"

    structured = True

    def create_mask(self, metric: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
        neurons = _lowest(metric.float().sum(dim=0), int(metric.shape[1] * sparsity_ratio), 0)
        return neurons.unsqueeze(0).expand_as(metric).clone()

    def describe(self) -> str:
        return "neuron (structured MLP)"


class NMSparsity(SparsityPattern):
    """N of every M consecutive input columns pruned in each row (2:4 runs fast on GPUs)."""

    kind = "nm"

    def __init__(self, n: int, m: int) -> None:
        if m <= 0 or n <= 0 or n >= m:
            raise SecateursError(
                f"an N:M pattern needs 0 < N < M, got {n}:{m}; for example 2:4 or 4:8"
            )
        self.n, self.m = n, m

    @property
    def ratio(self) -> float:
        return self.n / self.m

    def create_mask(self, metric: torch.Tensor, sparsity_ratio: float = 0.5) -> torch.Tensor:
        return nm_mask(metric, self.n, self.m)

    def check_columns(self, columns: int, layer: str) -> None:
        if columns % self.m:
            raise SecateursError(
                f"{self.describe()} needs input columns in multiples of {self.m}, but {layer} has "
                f"{columns}; choose an M that divides it or use unstructured"
            )

    def describe(self) -> str:
        return f"{self.n}:{self.m}"


class SetDifference(SparsityPattern):
    """Prune the top-``q`` safety weights that are not top-``p`` utility weights.

    Its metric is the two scores stacked, ``(2, out, in)``: safety first, then utility. The
    ratio is ignored (the set sizes decide the sparsity) and so is ``--neg_prune``.
    """

    kind = "set_difference"

    def __init__(self, p: float, q: float) -> None:
        for flag, value in (("--p", p), ("--q", q)):
            if not 0.0 <= value <= 1.0:
                raise SecateursError(f"{flag} must be in [0, 1], got {value}; try 0.01 to 0.1")
        self.p, self.q = float(p), float(q)

    def create_mask(self, metric: torch.Tensor, sparsity_ratio: float = 0.0) -> torch.Tensor:
        return set_difference_mask(metric[0], metric[1], self.p, self.q)

    def describe(self) -> str:
        return f"set difference (top {self.q} safety minus top {self.p} utility, per matrix)"


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(
    sparsity_type: str, scope: str = "row", use_variant: bool = False
) -> SparsityPattern:
    """``unstructured``, ``N:M`` or ``neuron``; a clear error for anything else."""
    if use_variant and sparsity_type != "unstructured":
        raise SecateursError(
            f"--use_variant adapts unstructured per-row counts; it cannot shape "
            f"--sparsity_type {sparsity_type}. Drop --use_variant or use unstructured"
        )
    if sparsity_type == "unstructured":
        return Variant() if use_variant else Unstructured(scope)
    if sparsity_type == "neuron":
        return NeuronSparsity()
    match = _NM.match(sparsity_type)
    if not match:
        raise SecateursError(
            f"unknown --sparsity_type '{sparsity_type}': use 'unstructured', 'neuron' "
            "or N:M such as 2:4, 4:8"
        )
    return NMSparsity(int(match.group(1)), int(match.group(2)))


def effective_ratio(pattern: SparsityPattern, ratio: float) -> float:
    """The ratio a pattern really prunes; N:M forces N/M (with a warning if it differs from a
    ratio the user chose: the default 0.5 was not chosen, so 2:5 just prunes 0.4)."""
    if isinstance(pattern, NMSparsity) and abs(ratio - pattern.ratio) > 1e-9:
        if ratio == DEFAULT_RATIO:
            return pattern.ratio
        warnings.warn(
            f"--sparsity_ratio {ratio} does not match {pattern.describe()}; using {pattern.ratio}",
            stacklevel=2,
        )
        return pattern.ratio
    return check_ratio(ratio)
