import math
import warnings

import pytest
import torch
from conftest import make_model, make_windows

from secateurs.api import WandaPruner
from secateurs.core.engine import prune_sequential
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.core.patterns import NMSparsity, Unstructured, nm_mask, row_mask
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError
from secateurs.methods.recovery import (
    InverseWandaStrategy,
    LeastSquaresStrategy,
    WeightRedistributor,
    output_error,
    relative_output_error,
)
from secateurs.methods.wanda import wanda_score


def problem(rows=24, cols=32, tokens=400, seed=0, offset=0.7):
    """A layer with correlated, non-zero-mean inputs, its stats, scores and a row mask."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=generator) / math.sqrt(cols)
    x = torch.randn(4, tokens // 4, cols, generator=generator) @ (torch.eye(cols) + mix) + offset
    weight = torch.randn(rows, cols, generator=generator)
    stats = ActivationStats(cols, request=StatsRequest(mean=True, gram=True))
    stats.add_batch(x)
    score = wanda_score(weight, stats)
    return weight, x.reshape(-1, cols), stats, score, row_mask(score, 0.5)


STRATEGIES = [InverseWandaStrategy(), LeastSquaresStrategy()]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_seed_verification_points(strategy):
    # inputs whose mean carries most of the signal: where the first-moment rule is meant to help
    weight, x, stats, score, mask = problem(offset=3.0)
    new = strategy.recover(weight, mask, score, stats)
    assert bool((new[mask] == 0).all()), "pruned weights must stay exactly zero"
    assert bool((new[~mask] != weight[~mask]).any()), "some survivors must change"
    assert bool(torch.isfinite(new).all())
    pruned = weight.masked_fill(mask, 0)
    before = torch.linalg.norm((pruned - weight) @ x.T)
    after = torch.linalg.norm((new - weight) @ x.T)
    assert after < before


def test_inverse_wanda_cap_holds():
    weight, _, stats, score, mask = problem(seed=1)
    for cap in (0.1, 1.0, 2.0, 5.0):
        new = InverseWandaStrategy(0.5, cap).recover(weight, mask, score, stats)
        delta = (new - weight)[~mask].abs()
        assert bool((delta <= cap * weight[~mask].abs() * (1 + 1e-6) + 1e-7).all())


def test_inverse_wanda_without_cap_restores_each_rows_mean_output():
    weight, _, stats, score, mask = problem(seed=2)
    for fraction in (0.1, 0.3, 1.0):
        new = InverseWandaStrategy(fraction, 1e12).recover(weight, mask, score, stats)
        torch.testing.assert_close(new @ stats.mean, weight @ stats.mean, rtol=1e-4, atol=1e-4)


def test_inverse_wanda_updates_only_the_lowest_scored_fraction_of_survivors():
    weight, _, stats, score, mask = problem(seed=3)
    new = InverseWandaStrategy(0.25, 1e12).recover(weight, mask, score, stats)
    changed = (new != weight) & ~mask
    survivors = (~mask).sum(dim=1)
    assert torch.equal(changed.sum(dim=1), (survivors.float() * 0.25).floor().long())
    for row in range(weight.shape[0]):
        kept = ~mask[row]
        assert score[row][changed[row]].max() <= score[row][kept & ~changed[row]].min()


def test_inverse_wanda_skips_channels_with_near_zero_mean():
    weight, _, stats, score, mask = problem(seed=4, offset=0.0)
    stats._sum[:5] = 0.0  # channels 0-4 average to exactly zero
    new = InverseWandaStrategy(1.0, 1e12).recover(weight, mask, score, stats)
    assert bool(torch.isfinite(new).all())
    assert torch.equal(new[:, :5], weight[:, :5].masked_fill(mask[:, :5], 0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"update_fraction": 0.0},
        {"update_fraction": 1.5},
        {"update_fraction": -0.2},
        {"max_relative_update": 0.0},
        {"max_relative_update": -1.0},
    ],
)
def test_bad_inverse_wanda_parameters_are_refused(kwargs):
    with pytest.raises(SecateursError, match="must be"):
        InverseWandaStrategy(**kwargs)


def test_least_squares_reaches_the_exact_per_row_optimum():
    weight, _, stats, score, mask = problem(rows=8, cols=24, seed=5)
    new = LeastSquaresStrategy(damp=1e-6, tol=1e-6).recover(weight, mask, score, stats)
    exact = weight.double().masked_fill(mask, 0)
    gram = stats.gram.double()
    for row in range(weight.shape[0]):
        keep = ~mask[row]
        # minimise ||(w_dense - w_new) X||: survivors absorb the pruned weights' projection
        rhs = gram[keep][:, mask[row]] @ weight[row, mask[row]].double()
        exact[row, keep] += torch.linalg.solve(gram[keep][:, keep], rhs)
    optimum = output_error(exact - weight.double(), gram)
    obs = output_error(new.double() - weight.double(), gram)
    pruned_only = output_error(weight.double().masked_fill(mask, 0) - weight.double(), gram)
    assert optimum <= obs * (1 + 1e-6)
    assert obs <= optimum * (1 + 1e-3)
    assert obs < 0.7 * pruned_only


def test_least_squares_keeps_n_m_structure():
    weight, _, stats, score, _ = problem(seed=6)
    mask = nm_mask(score, 2, 4)
    new = LeastSquaresStrategy().recover(weight, mask, score, stats)
    assert bool((new[mask] == 0).all())


def test_relative_error_matches_the_activations():
    weight, x, stats, _, mask = problem(seed=7)
    pruned = weight.masked_fill(mask, 0)
    direct = torch.linalg.norm((pruned - weight) @ x.T) / torch.linalg.norm(weight @ x.T)
    assert relative_output_error(weight, pruned, stats.gram) == pytest.approx(float(direct), 1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
@pytest.mark.parametrize(
    "pattern",
    [Unstructured("row"), Unstructured("layer"), NMSparsity(2, 4)],
    ids=lambda p: p.describe(),
)
def test_engine_applies_recovery_to_every_layer(arch, strategy, pattern):
    model = make_model(arch)
    report = prune_sequential(
        model,
        make_windows(),
        lambda layer, s: wanda_score(weight_matrix(layer), s),
        pattern,
        0.5,
        redistributor=WeightRedistributor(strategy),
        progress=False,
    )
    assert all(r.recovery is not None for r in report.layers)
    mean = report.mean_relative_error()
    if isinstance(strategy, LeastSquaresStrategy):
        # the first-moment rule gives no such promise on zero-mean random activations
        assert mean["after"] < mean["before"]
    for _, layer in iter_prunable(model):
        weight = weight_matrix(layer)
        assert bool(torch.isfinite(weight).all())
        assert math.isclose(float((weight == 0).float().mean()), 0.5, abs_tol=0.02)


def test_seed_python_example_runs_as_written():
    model, calibration_dataloader = make_model("llama"), make_windows()
    strategy = InverseWandaStrategy(update_fraction=0.3, max_relative_update=2.0)
    redistributor = WeightRedistributor(strategy)
    pruner = WandaPruner(model=model, tokenizer=None, device="cpu", redistributor=redistributor)
    report = pruner.prune(
        dataloader=calibration_dataloader, sparsity_ratio=0.5, sparsity_type="unstructured"
    )
    assert len(report.layers) == 21 and report.seconds["recover"] > 0


def test_recovery_is_deterministic():
    masks = []
    for _ in range(2):
        model = make_model("opt", seed=4)
        WandaPruner(
            model, redistributor=WeightRedistributor(LeastSquaresStrategy()), progress=False
        ).prune(make_windows(seed=2), 0.5, "2:4")
        masks.append([weight_matrix(layer).clone() for _, layer in iter_prunable(model)])
    assert all(torch.equal(a, b) for a, b in zip(*masks, strict=True))


def test_least_squares_warns_when_tokens_are_fewer_than_inputs():
    # the widest layer (down_proj) reads 128 inputs
    for count, warns in ((4, True), (9, False)):  # 4 x 16 = 64 tokens, 9 x 16 = 144
        model = make_model("llama")
        pruner = WandaPruner(
            model, redistributor=WeightRedistributor(LeastSquaresStrategy()), progress=False
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner.prune(make_windows(count, 16), 0.5)
        found = [w for w in caught if "least-squares recovery fits 128 inputs" in str(w.message)]
        assert bool(found) == warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        WandaPruner(
            make_model("llama"),
            redistributor=WeightRedistributor(InverseWandaStrategy()),
            progress=False,
        ).prune(make_windows(4, 16), 0.5)
    assert not [w for w in caught if "least-squares" in str(w.message)]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_report_fraction_is_refused(fraction):
    with pytest.raises(SecateursError, match="report_fraction"):
        WeightRedistributor(InverseWandaStrategy(), report_fraction=fraction)


def test_report_gram_is_exact_only_where_the_strategy_needs_it():
    exact = WeightRedistributor(LeastSquaresStrategy(), report_fraction=0.25).request
    sampled = WeightRedistributor(InverseWandaStrategy(), report_fraction=0.25).request
    assert exact.gram and exact.gram_fraction == 1.0
    assert sampled.gram and sampled.gram_fraction == 0.25 and sampled.mean


def test_sampled_report_estimates_the_exact_error():
    weight, x, exact, _, mask = problem(tokens=4000, seed=5)
    sampled = ActivationStats(x.shape[1], request=StatsRequest(gram=True, gram_fraction=0.25))
    sampled.add_batch(x.reshape(8, -1, x.shape[1]))
    assert 800 < sampled.gram_tokens < 1200
    pruned = weight.masked_fill(mask, 0)
    estimate = relative_output_error(weight, pruned, sampled.gram)
    assert estimate == pytest.approx(relative_output_error(weight, pruned, exact.gram), rel=0.05)
