"""Structured methods as pure functions: width scores and depth choices."""

import itertools
import math

import pytest
import torch

from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.core.units import choose_units
from secateurs.errors import SecateursError
from secateurs.methods.units import UNIT_METHODS, unit_method, variance
from secateurs.methods.units.depth import angular_blocks, shortgpt_blocks
from secateurs.methods.units.flap import flap_units
from secateurs.methods.units.norms import magnitude_units, wanda_units
from secateurs.methods.units.ziplm import ziplm_units


def _stats(x: torch.Tensor, classes: int = 0, labels=None) -> ActivationStats:
    stats = ActivationStats(
        x.shape[-1], request=StatsRequest(mean=True, gram=True, classes=classes)
    )
    stats.add_batch(x.unsqueeze(0), labels)
    return stats


def _refit_error(weight, x, keep) -> float:
    """Output error after the optimal least-squares refit on the kept columns."""
    target = x @ weight.t()
    if not keep:
        return float(target.square().sum())
    kept = x[:, keep]
    solution = torch.linalg.lstsq(kept, target).solution
    return float((kept @ solution - target).square().sum())


WIDTH = [m for m in UNIT_METHODS.values() if m.kind == "width"]


@pytest.mark.parametrize("method", WIDTH, ids=lambda m: m.name)
def test_width_methods_give_one_finite_score_per_unit_and_are_deterministic(method):
    torch.manual_seed(0)
    x = torch.randn(200, 8, dtype=torch.float64).float()
    weight = torch.randn(5, 8)
    labels = torch.randint(0, 4, (1, 200))
    stats = _stats(x, classes=4 if method.statistics else 0, labels=labels)
    units = torch.arange(8).view(4, 2)
    first = method.fn(weight, stats, units, 2)
    assert first.shape == (4,)
    assert torch.isfinite(first).all()
    assert torch.equal(first, method.fn(weight, stats, units, 2))


def test_norm_scores_sum_their_columns():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 1.0, -1.0, 0.5]])
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 2.0, 0.0, 1.0]])
    stats = _stats(x)
    units = torch.tensor([[0, 1], [2, 3]])
    assert magnitude_units(weight, stats, units, 1).tolist() == [4.0, 5.0]
    norms = x.square().sum(dim=0).sqrt()
    column = weight.abs().sum(dim=0) * norms
    assert torch.allclose(wanda_units(weight, stats, units, 1), column.view(2, 2).sum(dim=1))


def test_flap_scores_a_constant_input_zero():
    x = torch.randn(100, 3)
    x[:, 1] = 4.0  # never fluctuates: its mean can stand in for it
    stats = _stats(x)
    scores = flap_units(torch.ones(2, 3), stats, torch.arange(3).unsqueeze(1), 1)
    assert scores[1] == pytest.approx(0.0, abs=1e-5)
    assert torch.allclose(
        variance(stats)[[0, 2]].float(), x[:, [0, 2]].var(dim=0, unbiased=False), rtol=1e-4
    )


def test_ziplm_first_removal_is_the_one_the_rest_best_make_up_for():
    torch.manual_seed(2)
    base = torch.randn(300, 4)
    # column 4 nearly copies column 0: removing either costs almost nothing after a refit
    x = torch.cat([base, base[:, :1] + 0.01 * torch.randn(300, 1), torch.randn(300, 1)], dim=1)
    weight = torch.randn(3, 6) * torch.tensor([1.0, 1, 1, 1, 3, 0.2])
    stats = _stats(x)
    units = torch.arange(6).unsqueeze(1)
    scores = ziplm_units(weight, stats, units, 1)
    first = int(torch.argmin(scores))
    costs = [_refit_error(weight, x, [c for c in range(6) if c != u]) for u in range(6)]
    # the damped OBS error ranks like the exact refit error
    assert first == min(range(6), key=costs.__getitem__)


def test_ziplm_greedy_order_on_multi_column_units():
    torch.manual_seed(3)
    x = torch.randn(400, 6)
    weight = torch.randn(4, 6)
    units = torch.arange(6).view(3, 2)
    scores = ziplm_units(weight, _stats(x), units, 2)
    removed = set(choose_units(scores, 2).tolist())
    assert len(removed) == 2
    # greedy never does worse than the worst pair, and usually finds the best one
    costs = {
        pair: _refit_error(
            weight, x, [c for u in range(3) if u not in pair for c in units[u].tolist()]
        )
        for pair in itertools.combinations(range(3), 2)
    }
    assert costs[tuple(sorted(removed))] <= max(costs.values())


def test_choose_units_takes_the_same_count_from_every_group():
    scores = torch.tensor([5.0, 1.0, 0.5, 3.0, 9.0, 8.0])
    assert choose_units(scores, 2, groups=2).tolist() == [2, 3]
    assert choose_units(scores, 2).tolist() == [1, 2]
    assert choose_units(torch.zeros(4), 2).tolist() == [0, 1]  # ties: lower index first


def _band(cosines: list[float], reach: int) -> dict[tuple[int, int], float]:
    """A band where the angle between h_i and h_j adds up along the path."""
    angles = [math.acos(c) for c in cosines]
    return {
        (i, j): math.cos(sum(angles[i:j]))
        for i in range(len(cosines))
        for j in range(i + 1, min(len(cosines), i + reach) + 1)
    }


def test_shortgpt_drops_the_blocks_that_change_their_input_least():
    band = _band([0.5, 0.99, 0.7, 0.98, 0.6], 1)
    assert shortgpt_blocks(band, 5, 2) == [1, 3]


def test_angular_drops_the_closest_consecutive_run():
    band = _band([0.5, 0.97, 0.96, 0.3, 0.99], 2)
    assert angular_blocks(band, 5, 2) == [1, 2]


def test_unknown_methods_are_refused_with_the_choices():
    with pytest.raises(SecateursError, match="ziplm"):
        unit_method("ziplmm", "width")
    with pytest.raises(SecateursError, match=r"--depth_score.*angular"):
        unit_method("ziplm", "depth")
