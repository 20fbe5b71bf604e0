"""The channel guard: does a layer's score write off input channels the layer depends on?

A score that is zero, or near zero, on every weight reading input channel ``j`` prunes that
channel's weights first. When such channels carry a large share of the layer's input energy
(sum of ``x_j^2`` over the calibration tokens), the pruned model loses what it needs most;
the seed's ``log(1/p)`` IDF does exactly this to always-active outlier channels. Pure
functions: the engine calls :func:`check_channels` on every calibrated layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A column whose largest score is below this share of the layer's median score is written off
# (the median, since some scores, such as the Fisher ratio, have heavy upper tails).
NEAR_ZERO = 1e-3
# Written-off channels carrying at least this share of the input energy raise the alarm.
ENERGY_SHARE = 0.05
# How many of the written-off channels (largest energy first) an alarm names.
SHOWN_CHANNELS = 8


@dataclass(frozen=True)
class ChannelAlarm:
    """Input channels whose scores are (near) zero although they carry much of the energy."""

    channels: tuple[int, ...]
    count: int
    energy_share: float


def written_off(score: torch.Tensor, near_zero: float = NEAR_ZERO) -> torch.Tensor:
    """Boolean (in_features,): columns whose every score is at most ``near_zero`` x the median
    positive score (all columns when no score is positive: the mask is then arbitrary)."""
    magnitude = score.detach().abs().float()
    positive = magnitude[magnitude > 0]
    if positive.numel() == 0:
        return torch.ones(score.shape[1], dtype=torch.bool, device=score.device)
    return magnitude.amax(dim=0) <= near_zero * positive.median()


def surely_alive(score: torch.Tensor, near_zero: float = NEAR_ZERO) -> bool:
    """True when no column can be written off, decided without the median.

    For non-negative values the median is at most twice the mean (at most half of them can
    lie above twice the mean), so a smallest column maximum above ``near_zero`` x twice the
    mean positive magnitude is above ``near_zero`` x the median too. Two reductions instead of
    a copy and a median of the whole matrix: the engine runs this on every layer.
    """
    column_max = torch.maximum(score.amax(dim=0), -score.amin(dim=0)).float()
    positive = int(torch.count_nonzero(score))
    if positive == 0:
        return False
    mean = float(torch.linalg.vector_norm(score.float(), ord=1)) / positive
    return float(column_max.min()) > near_zero * 2 * mean


def check_channels(
    score: torch.Tensor,
    sq_norm: torch.Tensor,
    near_zero: float = NEAR_ZERO,
    energy_share: float = ENERGY_SHARE,
) -> ChannelAlarm | None:
    """An alarm if written-off columns of ``score`` (out, in) hold ``energy_share`` of the
    input energy ``sq_norm`` (in,), else None."""
    if surely_alive(score.detach(), near_zero):
        return None
    dead = written_off(score, near_zero)
    energy = sq_norm.detach().double().to(dead.device)
    total = float(energy.sum())
    if not dead.any() or total <= 0:
        return None
    share = float(energy[dead].sum()) / total
    if share < energy_share:
        return None
    order = torch.argsort(torch.where(dead, energy, -1.0), descending=True, stable=True)
    shown = order[: min(SHOWN_CHANNELS, int(dead.sum()))]
    return ChannelAlarm(tuple(int(c) for c in shown), int(dead.sum()), share)


def alarm_message(alarms: dict[str, ChannelAlarm]) -> str:
    """One line naming the layers whose scores write off high-energy input channels."""
    names = list(alarms)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    worst = max(alarm.energy_share for alarm in alarms.values())
    return (
        f"the scores of {len(names)} layer(s) are zero on whole input channels that carry up to "
        f"{worst:.0%} of the layer's activation energy ({shown}): those weights are pruned "
        "first and the model will likely collapse (the seed's IDF, --idf_form seed, does this "
        "to always-active channels; use the default form). Details per layer in --save_log "
        "and --save_json."
    )


class ChannelCollapseWarning(UserWarning):
    """Scores write off input channels that carry much of a layer's activation energy."""
