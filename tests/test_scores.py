import pytest
import torch

from secateurs.core.stats import ActivationStats, SelectivityOptions, StatsRequest
from secateurs.errors import SecateursError
from secateurs.methods.registry import (
    METHODS,
    check_classes,
    check_ria_alpha,
    fisher_score,
    get_method,
    magnitude_score,
    ria_score,
    sparsegpt_saliency,
    wanda_idf_score,
    wanda_score,
    wanda_select_score,
    wanda_spiky_score,
)

FULL = StatsRequest(selectivity=SelectivityOptions(exact=True), classes=3, gram=True)


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
    gradients = torch.rand(6, 10)
    for method in METHODS.values():
        score = method.score(weight, gradients if "gradients" in method.needs else stats)
        assert score.shape == weight.shape
        assert bool((score >= 0).all())


def test_registry_defaults_match_the_reference():
    assert get_method("wanda").scope == "row" and get_method("wanda").calibrated
    assert get_method("magnitude").scope == "layer" and not get_method("magnitude").calibrated


@pytest.mark.parametrize(
    ("score", "factors"),
    [
        (wanda_idf_score, ("idf",)),
        (wanda_spiky_score, ("spikiness",)),
        (wanda_select_score, ("idf", "spikiness")),
        (fisher_score, ("fisher",)),
    ],
)
def test_selective_scores_scale_wanda_per_input_channel(score, factors):
    weight = torch.randn(4, 9)
    stats = full_stats(9, seed=1)
    expected = wanda_score(weight, stats)
    for factor in factors:
        expected = expected * getattr(stats, factor).unsqueeze(0)
    torch.testing.assert_close(score(weight, stats), expected)


def test_methods_name_the_statistics_they_need():
    assert get_method("wanda_select").needs == {"selectivity", "idf"}
    assert get_method("neuronrank_fisher").needs == {"classes"}
    assert not get_method("wanda").needs


def test_a_score_without_its_statistics_says_so():
    with pytest.raises(ValueError, match="gathered without selectivity"):
        wanda_idf_score(torch.ones(2, 3), ActivationStats(3))
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
    assert ria.options == {"alpha"} and ria.scope == "row" and ria.calibrated
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(SecateursError, match="ria_alpha"):
            check_ria_alpha(bad)


def test_sparsegpt_is_a_solver_with_a_diagonal_saliency():
    sparsegpt = get_method("sparsegpt")
    assert sparsegpt.solver is not None and sparsegpt.needs == {"gram"}
    weight = torch.randn(3, 4)
    stats = ActivationStats(4, request=StatsRequest(gram=True))
    x = torch.randn(2, 9, 4)
    stats.add_batch(x)
    expected = weight.square() * (x.reshape(-1, 4) ** 2).sum(dim=0).unsqueeze(0)
    torch.testing.assert_close(sparsegpt_saliency(weight, stats), expected)
