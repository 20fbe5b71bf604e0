import pytest
import torch

from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError
from secateurs.methods.fisher import FisherOptions, check_classes, fisher_score
from secateurs.methods.magnitude import magnitude_score
from secateurs.methods.registry import METHODS, get_method
from secateurs.methods.ria import RiaOptions, check_ria_alpha, ria_score
from secateurs.methods.selectivity import (
    SelectivityOptions,
    channel_idf,
    wanda_idf_score,
    wanda_select_score,
    wanda_spiky_score,
)
from secateurs.methods.sparsegpt import sparsegpt_saliency
from secateurs.methods.wanda import wanda_score

FULL = StatsRequest(selectivity=SelectivityOptions(exact=True).thresholds(), classes=3, gram=True)


def full_stats(columns: int, seed: int = 0) -> ActivationStats:
    generator = torch.Generator().manual_seed(seed)
    stats = ActivationStats(columns, request=FULL)
    x = torch.randn(2, 50, columns, generator=generator)
    labels = torch.randint(-1, 3, (2, 50), generator=generator)
    stats.add_batch(x, labels)
    return stats


def test_wanda_score_is_weight_times_activation_norm():
    weight = torch.randn(5, 7)
    stats = ActivationStats(7)
    x = torch.randn(3, 11, 7)
    stats.add_batch(x)
    expected = weight.abs() * torch.sqrt((x**2).sum(dim=(0, 1)) / 3).unsqueeze(0)
    torch.testing.assert_close(wanda_score(weight, stats), expected)


def test_magnitude_score_is_absolute_weight():
    weight = torch.randn(4, 4)
    torch.testing.assert_close(magnitude_score(weight, None), weight.abs())


def test_scores_keep_the_weight_shape_and_are_nonnegative():
    weight = torch.randn(6, 10)
    stats = full_stats(10)
    whole_model = {"wandg": torch.rand(6, 10), "wandg_set_difference": torch.rand(6, 10),
                   "wanda_v2": torch.rand(10)}  # fmt: skip
    for method in METHODS.values():
        inputs = whole_model[method.name] if method.whole_model is not None else stats
        score = method.compute(weight, inputs, method.make_options(), "model.layers.0.mlp.up_proj")
        assert score.shape == weight.shape
        assert bool((score >= 0).all())


def test_registry_defaults_match_the_reference():
    assert get_method("wanda").scope == "row" and get_method("wanda").calibrated
    assert get_method("magnitude").scope == "layer" and not get_method("magnitude").calibrated


OPTS = SelectivityOptions()


@pytest.mark.parametrize(
    ("score", "factors"),
    [
        (lambda w, s: wanda_idf_score(w, s, OPTS), ("idf",)),
        (wanda_spiky_score, ("spikiness",)),
        (lambda w, s: wanda_select_score(w, s, OPTS), ("idf", "spikiness")),
        (fisher_score, ("fisher",)),
    ],
)
def test_selective_scores_scale_wanda_per_input_channel(score, factors):
    weight = torch.randn(4, 9)
    stats = full_stats(9, seed=1)
    expected = wanda_score(weight, stats)
    for factor in factors:
        value = channel_idf(stats, OPTS) if factor == "idf" else getattr(stats, factor)
        expected = expected * value.unsqueeze(0)
    torch.testing.assert_close(score(weight, stats), expected)


@pytest.mark.parametrize(
    ("name", "factors"),
    [
        ("wanda_idf", ("idf",)),
        ("wanda_spiky", ("spikiness",)),
        ("wanda_select", ("idf", "spikiness")),
        ("neuronrank_fisher", ("fisher",)),
    ],
)
def test_registered_selective_methods_pass_their_options(name, factors):
    method = get_method(name)
    weight = torch.randn(4, 9)
    stats = full_stats(9, seed=1)
    options = method.make_options({"idf_form": "smooth"})
    expected = wanda_score(weight, stats)
    for factor in factors:
        value = channel_idf(stats, options) if factor == "idf" else getattr(stats, factor)
        expected = expected * value.unsqueeze(0)
    torch.testing.assert_close(method.compute(weight, stats, options), expected)


def test_methods_name_the_statistics_they_need():
    select = get_method("wanda_select")
    opts = SelectivityOptions(tau_percentile=0.7)
    assert select.request(opts).selectivity == opts.thresholds()
    assert select.request(opts).classes == 0 and not select.request(opts).gram
    assert hasattr(select.make_options(), "idf_form")  # the score reads the IDF
    spiky = get_method("wanda_spiky")
    assert spiky.request(spiky.make_options()).selectivity is not None
    assert not hasattr(spiky.make_options(), "idf_form")  # spikiness alone: no IDF
    fisher = get_method("neuronrank_fisher")
    request = fisher.request(FisherOptions(classes=7))
    assert request.classes == 7 and request.selectivity is None and not request.gram
    assert get_method("wanda").request(None) == StatsRequest()


def test_a_score_without_its_statistics_says_so():
    with pytest.raises(ValueError, match="gathered without selectivity"):
        wanda_idf_score(torch.ones(2, 3), ActivationStats(3), OPTS)
    with pytest.raises(ValueError, match="needs activation statistics"):
        fisher_score(torch.ones(2, 3), None)


@pytest.mark.parametrize("classes", [0, -3])
def test_class_count_must_be_positive(classes):
    with pytest.raises(SecateursError, match="neuronrank_max_classes must be > 0"):
        check_classes(classes)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ria_against_a_direct_computation(alpha):
    weight = torch.randn(5, 7)
    stats = ActivationStats(7)
    x = torch.randn(3, 11, 7)
    stats.add_batch(x)
    norms = torch.sqrt((x**2).sum(dim=(0, 1)) / 3)
    expected = torch.empty(5, 7)
    for i in range(5):
        for j in range(7):
            column = sum(abs(float(weight[k, j])) for k in range(5))
            row = sum(abs(float(weight[i, k])) for k in range(7))
            relative = abs(float(weight[i, j])) / column + abs(float(weight[i, j])) / row
            expected[i, j] = relative * float(norms[j]) ** alpha
    torch.testing.assert_close(ria_score(weight, stats, alpha), expected)


def test_ria_is_registered_with_its_alpha_and_both_scopes():
    ria = get_method("ria")
    assert ria.options is RiaOptions and ria.scope == "row" and ria.calibrated
    assert ria.make_options({"ria_alpha": 0.25}).alpha == 0.25
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(SecateursError, match="ria_alpha"):
            check_ria_alpha(bad)
        with pytest.raises(SecateursError, match="ria_alpha"):
            RiaOptions(alpha=bad)


def test_sparsegpt_is_a_solver_with_a_diagonal_saliency():
    sparsegpt = get_method("sparsegpt")
    assert sparsegpt.solver is not None and sparsegpt.updates_weights
    request = sparsegpt.request(sparsegpt.make_options())
    assert request == StatsRequest(gram=True)
    weight = torch.randn(3, 4)
    stats = ActivationStats(4, request=StatsRequest(gram=True))
    x = torch.randn(2, 9, 4)
    stats.add_batch(x)
    expected = weight.square() * (x.reshape(-1, 4) ** 2).sum(dim=0).unsqueeze(0)
    torch.testing.assert_close(sparsegpt_saliency(weight, stats), expected)
