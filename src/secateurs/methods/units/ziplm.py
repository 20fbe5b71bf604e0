"""ZipLM's second-order choice: remove, one unit at a time, the unit whose loss the others can
best make up for.

Kurtic, Frantar and Alistarh, "ZipLM: Inference-Aware Structured Pruning of Language Models",
NeurIPS 2023. With ``H = X^T X`` (damped; tokens weighted as the refit weighs them where a norm
follows the consumer) and the consumer's weight ``W``, removing the columns
``M`` of a unit and refitting the rest optimally costs ``tr(W_M (H^-1_MM)^-1 W_M^T)`` on the
calibration inputs (the Optimal Brain Surgeon error); the cheapest unit goes, ``W`` and
``H^-1`` are updated as if it had never been there, and the search repeats. The engine's
least-squares refit on the final kept set then gives the same weights that the updates reach.
"""

from __future__ import annotations

import torch

from secateurs.core.stats import ActivationStats
from secateurs.methods.units import UnitMethod, register_unit

DAMP = 0.01


def _unit_errors(
    weight: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """OBS error of removing each unit (rows of ``columns``) on its own."""
    if columns.shape[1] == 1:
        flat = columns.squeeze(1)
        return weight[:, flat].square().sum(dim=0) / inverse[flat, flat]
    blocks = inverse[columns[:, :, None], columns[:, None, :]]  # (units, c, c)
    parts = weight[:, columns].permute(1, 2, 0)  # (units, c, out)
    solved = torch.linalg.solve(blocks, parts)
    return (parts * solved).sum(dim=(1, 2))


def _single_columns(work: torch.Tensor, inverse: torch.Tensor, remove: int) -> torch.Tensor:
    """The greedy order for one-column units (neurons), with rank-one updates in place."""
    scores = torch.empty(work.shape[1], dtype=torch.float64)
    dead = torch.zeros(work.shape[1], dtype=torch.bool, device=work.device)
    for step in range(remove):
        errors = work.square().sum(dim=0) / inverse.diagonal()
        errors[dead] = torch.inf
        pick = int(torch.argmin(errors))
        row = inverse[pick].clone() / inverse[pick, pick]
        work.addr_(work[:, pick].clone(), row, alpha=-1.0)
        inverse.addr_(inverse[:, pick].clone(), row, alpha=-1.0)
        scores[pick] = step
        dead[pick] = True
    return _rank_rest(scores, dead.cpu(), work.square().sum(dim=0) / inverse.diagonal(), remove)


def _rank_rest(
    scores: torch.Tensor, dead: torch.Tensor, errors: torch.Tensor, remove: int
) -> torch.Tensor:
    """Units still alive score ``remove`` plus their OBS error scaled into [0, 1)."""
    rest = (~dead).nonzero().squeeze(1)
    if rest.numel():
        left = errors.cpu()[rest].clamp_min(0)
        scores[rest] = remove + left / (left.max() * 2 + 1e-30)
    return scores


def ziplm_units(
    weight: torch.Tensor, stats: ActivationStats, units: torch.Tensor, remove: int
) -> torch.Tensor:
    """Removal order by greedy OBS: the ``k``-th removed unit scores ``k``; the rest score
    ``remove`` plus their final OBS error scaled into [0, 1), in that order."""
    gram = stats.gram.double()
    ridge = DAMP * float(gram.diagonal().mean().clamp_min(1e-12))
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    work = weight.double().clone()
    if units.shape[1] == 1 and torch.equal(units.squeeze(1).cpu(), torch.arange(units.shape[0])):
        return _single_columns(work, inverse, remove)
    scores = torch.empty(units.shape[0], dtype=torch.float64)
    alive = torch.ones(units.shape[0], dtype=torch.bool)
    for step in range(remove):
        candidates = alive.nonzero().squeeze(1)
        errors = _unit_errors(work, inverse, units[candidates].to(work.device))
        pick = int(candidates[int(torch.argmin(errors))])
        cols = units[pick].to(work.device)
        block_inverse = torch.linalg.inv(inverse[cols][:, cols])
        work -= work[:, cols] @ block_inverse @ inverse[cols, :]
        inverse -= inverse[:, cols] @ block_inverse @ inverse[cols, :]
        scores[pick] = step
        alive[pick] = False
    errors = torch.zeros(units.shape[0], dtype=torch.float64)
    if alive.any():
        errors[alive] = _unit_errors(work, inverse, units[alive].to(work.device)).cpu()
    return _rank_rest(scores, ~alive, errors, remove)


register_unit(
    UnitMethod(
        "ziplm",
        "width",
        "greedy OBS: the unit the rest can best make up for (ZipLM)",
        ziplm_units,
        "Kurtic et al., NeurIPS 2023",
    )
)
