"""Selectivity variants of Wanda: IDF (rarely active channels weigh more), spikiness (peaked
channels weigh more), and both.

Every IDF form reads two active rates gathered in one calibration pass (see
:class:`secateurs.core.stats.SelectivityStats`): ``active`` is the share of tokens whose
``|x_j|`` exceeds one global threshold ``tau`` (the seed's definition), ``relative`` the share
of tokens whose ``|x_j|`` exceeds the channel's own mean ``|x_j|``.

The seed's ``log(1 / p_j)`` is 0 for a channel active on every token. With one global
threshold those are the always-large outlier channels, the ones a model needs most, so every
weight reading them scores 0 and is pruned first (perplexity in the millions on SmolLM2). The
other forms cannot reach 0; ``relative`` is the default and ``seed`` the literal option.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from secateurs.core.spec import setting
from secateurs.core.stats import ActivationStats, SelectivityThresholds, StatsRequest
from secateurs.errors import SecateursError
from secateurs.methods.registry import Method, register
from secateurs.methods.wanda import require_stats, weighted

DEFAULT_IDF_FORM = "relative"


@dataclass(frozen=True)
class SpikinessOptions:
    """Thresholds of the selectivity statistics (as the seed); see
    :class:`secateurs.core.stats.SelectivityThresholds`."""

    tau_percentile: float = setting(0.6, "Selectivity: |x| percentile that counts as active.")
    top_quantile: float = setting(0.9, "Spikiness: mean of |x| above this quantile over the mean.")
    spiky_clip: float = setting(10.0, "Spikiness is clipped to [1, this].")
    eps: float = 1e-10
    exact: bool = setting(
        False,
        "Exact quantiles (keeps every activation: small runs only); default streams a histogram.",
        flag="exact_selectivity",
    )

    def __post_init__(self) -> None:
        self.thresholds()

    def thresholds(self) -> SelectivityThresholds:
        """What the statistics need of these options."""
        return SelectivityThresholds(
            self.tau_percentile, self.top_quantile, self.spiky_clip, self.eps, self.exact
        )


@dataclass(frozen=True)
class SelectivityOptions(SpikinessOptions):
    """The selectivity thresholds and the IDF formula.

    ``idf_form`` picks the IDF formula (:data:`IDF_FORMS`); ``idf_power`` tempers the
    ``tempered`` form, ``idf_floor`` floors the ``normalized`` one.
    """

    idf_clip: float = setting(10.0, "IDF is clipped to [0, this].")
    idf_form: str = setting(
        DEFAULT_IDF_FORM,
        f"IDF formula for wanda_idf and wanda_select (default {DEFAULT_IDF_FORM}): "
        "smooth = 1 + log(1/p); tempered = smooth ** idf_power; normalized = IDF / mean IDF, "
        "floored at idf_floor; relative = 1 + log(1/r), r the share of tokens above the "
        "channel's own mean |x|; seed = log(1/p) as written, which zeroes the always-active "
        "outlier channels and collapses the model.",
    )
    idf_power: float = setting(0.5, "Exponent of --idf_form tempered, > 0.")
    idf_floor: float = setting(0.5, "Floor of --idf_form normalized, > 0.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.idf_clip > 0:  # written so that NaN is refused too
            raise SecateursError(f"idf_clip must be > 0, got {self.idf_clip}")
        check_idf_form(self.idf_form)
        if self.idf_power <= 0:
            raise SecateursError(f"idf_power must be > 0, got {self.idf_power}")
        if self.idf_floor <= 0:
            raise SecateursError(
                f"idf_floor must be > 0 (0 would allow zeroed channels), got {self.idf_floor}"
            )


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


def channel_idf(stats: ActivationStats, options: SelectivityOptions) -> torch.Tensor:
    """The IDF of every input channel of a layer, from its statistics' active rates."""
    return idf_values(*stats.selectivity_rates, options)


def wanda_idf_score(
    weight: torch.Tensor, stats: ActivationStats | None, options: SelectivityOptions
) -> torch.Tensor:
    """Wanda times ``IDF_j`` (in ``options.idf_form``): rarer channels weigh more."""
    stats = require_stats(stats, "wanda_idf")
    return weighted(weight, stats.norm, channel_idf(stats, options))


def wanda_spiky_score(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """Wanda times spikiness ``R_j``: channels with peaked activations weigh more."""
    stats = require_stats(stats, "wanda_spiky")
    return weighted(weight, stats.norm, stats.spikiness)


def wanda_select_score(
    weight: torch.Tensor, stats: ActivationStats | None, options: SelectivityOptions
) -> torch.Tensor:
    """Wanda times ``IDF_j * R_j``."""
    stats = require_stats(stats, "wanda_select")
    return weighted(weight, stats.norm, channel_idf(stats, options), stats.spikiness)


def _request(options: SpikinessOptions) -> StatsRequest:
    return StatsRequest(selectivity=options.thresholds())


# Streamed selectivity fixes its thresholds on the first batch it sees, so a data-parallel run,
# whose processes see different first batches, would not give the same masks.
_SERIAL = "selectivity statistics fix thresholds on the first batch"

for _name, _score, _summary, _options in (
    ("wanda_idf", wanda_idf_score, "Wanda * IDF", SelectivityOptions),
    ("wanda_spiky", wanda_spiky_score, "Wanda * spikiness", SpikinessOptions),
    ("wanda_select", wanda_select_score, "Wanda * IDF * spikiness", SelectivityOptions),
):
    register(
        Method(
            _name,
            _summary,
            _score,
            options=_options,
            statistics=_request,
            serial_only=_SERIAL,
        )
    )
