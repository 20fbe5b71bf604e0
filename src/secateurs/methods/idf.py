"""Forms of the per-channel IDF weight, pure functions of the selectivity statistics.

Every form reads the same two active rates gathered in one calibration pass (see
:class:`secateurs.core.stats.SelectivityStats`): ``active`` is the share of tokens whose ``|x_j|``
exceeds one global threshold ``tau`` (the seed's definition), ``relative`` the share of tokens
whose ``|x_j|`` exceeds the channel's own mean ``|x_j|``.

The seed's ``log(1 / p_j)`` is 0 for a channel active on every token. With one global
threshold those are the always-large outlier channels, the ones a model needs most, so every
weight reading them scores 0 and is pruned first (perplexity in the millions on SmolLM2). The
other forms cannot reach 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from secateurs.errors import SecateursError

if TYPE_CHECKING:
    from secateurs.core.stats import SelectivityOptions


def _log_inverse(rate: torch.Tensor, opts: SelectivityOptions) -> torch.Tensor:
    """``log(1 / rate)`` clipped to ``[0, idf_clip]``, the seed's formula."""
    return torch.log(1.0 / (rate + opts.eps)).clamp(0.0, opts.idf_clip)


def seed_idf(active: torch.Tensor, relative: torch.Tensor, opts: SelectivityOptions):
    """``log(1 / p_j)``: 0 on always-active channels, which prunes them first."""
    return _log_inverse(active, opts)


def smooth_idf(active: torch.Tensor, relative: torch.Tensor, opts: SelectivityOptions):
    """``1 + log(1 / p_j)``, the smoothed IDF of text retrieval: never below 1."""
    return 1.0 + _log_inverse(active, opts)


def tempered_idf(active: torch.Tensor, relative: torch.Tensor, opts: SelectivityOptions):
    """``(1 + log(1 / p_j)) ** idf_power``: the smoothed IDF with its range compressed."""
    return smooth_idf(active, relative, opts).pow(opts.idf_power)


def normalized_idf(active: torch.Tensor, relative: torch.Tensor, opts: SelectivityOptions):
    """``max(IDF_j / mean_k IDF_k, idf_floor)``: the seed's IDF around 1, floored."""
    idf = _log_inverse(active, opts)
    return (idf / idf.mean().clamp_min(opts.eps)).clamp_min(opts.idf_floor)


def relative_idf(active: torch.Tensor, relative: torch.Tensor, opts: SelectivityOptions):
    """``1 + log(1 / r_j)``, ``r_j`` the share of tokens above the channel's own mean ``|x_j|``.

    A per-channel threshold measures how sparsely a channel fires, whatever its scale, so a
    large always-on channel is not mistaken for an unselective one.
    """
    return 1.0 + _log_inverse(relative, opts)


IdfFn = Callable[[torch.Tensor, torch.Tensor, "SelectivityOptions"], torch.Tensor]

IDF_FORMS: dict[str, IdfFn] = {
    "seed": seed_idf,
    "smooth": smooth_idf,
    "tempered": tempered_idf,
    "normalized": normalized_idf,
    "relative": relative_idf,
}
DEFAULT_IDF_FORM = "relative"


def check_idf_form(name: str) -> str:
    if name not in IDF_FORMS:
        raise SecateursError(
            f"unknown --idf_form '{name}'; choose one of: {', '.join(IDF_FORMS)} "
            f"(default {DEFAULT_IDF_FORM}; seed is the literal log(1/p), which zeroes "
            "always-active channels)"
        )
    return name


def idf_values(
    active: torch.Tensor, relative: torch.Tensor, opts: SelectivityOptions
) -> torch.Tensor:
    """The IDF of every channel in the form ``opts.idf_form``, as float32."""
    return IDF_FORMS[check_idf_form(opts.idf_form)](active, relative, opts).float()
