"""ActSVD: the ranks of a weight that safety data uses and utility data does not.

Wei et al., "Assessing the Brittleness of Safety Alignment via Pruning and Low-Rank
Modifications" (ICML 2024), section 4. For a linear layer ``W`` (out x in) and inputs ``X``
(tokens x in), the rank-``r`` approximation that best keeps the outputs ``X W^T`` is
``V V^T W``, ``V`` the top ``r`` right singular vectors of ``X W^T``. With ``Pi_u`` from
utility data and ``Pi_s`` from safety data, ActSVD removes
``dW = (I - Pi_u) Pi_s W``: what the safety outputs need, outside what the utility outputs
need. Its rank is at most ``min(r_s, total - r_u)``.

``V`` comes from the inputs' Gram ``X^T X`` alone: the right singular vectors of ``X W^T``
are the eigenvectors of ``W X^T X W^T`` (out x out), so no token's activations are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# a direction of (I - Pi_u) V_s counts as removed above this sine of its angle to utility's
REMOVED_SINE = 1e-3


def total_rank(weight: torch.Tensor) -> int:
    return min(weight.shape)


def rank_count(fraction: float, weight: torch.Tensor) -> int:
    """``fraction`` of the layer's total rank, rounded, within [0, total]."""
    return max(0, min(total_rank(weight), round(fraction * total_rank(weight))))


def output_directions(weight: torch.Tensor, gram: torch.Tensor, count: int) -> torch.Tensor:
    """The top ``count`` right singular vectors of ``X W^T`` (out x count, float64), from the
    Gram ``X^T X``; strongest first."""
    w = weight.double()
    _, vectors = torch.linalg.eigh(w @ gram.double().to(w.device) @ w.T)
    return vectors.flip(1)[:, :count]


@dataclass(frozen=True)
class RankEdit:
    """One layer's ActSVD: its total rank, the directions kept for utility and considered for
    safety, and the ranks removed (directions of ``(I - Pi_u) V_s`` not inside utility's)."""

    total: int
    utility: int
    safety: int
    removed: int


def rank_set_difference(
    weight: torch.Tensor,
    utility_gram: torch.Tensor,
    safety_gram: torch.Tensor,
    utility_fraction: float,
    safety_fraction: float,
) -> tuple[torch.Tensor, RankEdit]:
    """``W - (I - Pi_u) Pi_s W`` and what it removed; ``Pi_u`` spans the top
    ``utility_fraction`` of the ranks on utility inputs, ``Pi_s`` the top ``safety_fraction``
    on safety inputs. ``utility_fraction = 0`` removes the top safety ranks alone."""
    ku, ks = rank_count(utility_fraction, weight), rank_count(safety_fraction, weight)
    safety = output_directions(weight, safety_gram, ks)
    utility = output_directions(weight, utility_gram, ku)
    outside = safety - utility @ (utility.T @ safety)
    delta = outside @ (safety.T @ weight.double())
    removed = int((torch.linalg.svdvals(outside) > REMOVED_SINE).sum()) if ks else 0
    edit = RankEdit(total_rank(weight), ku, ks, removed)
    return (weight.double() - delta).to(weight.dtype), edit
