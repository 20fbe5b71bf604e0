import torch

from secateurs.scores import METHODS, get_method, magnitude_score, wanda_score
from secateurs.stats import ActivationStats


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
    stats = ActivationStats(10)
    stats.add_batch(torch.randn(2, 5, 10))
    for method in METHODS.values():
        score = method.score(weight, stats)
        assert score.shape == weight.shape
        assert bool((score >= 0).all())


def test_registry_defaults_match_the_reference():
    assert get_method("wanda").scope == "row" and get_method("wanda").calibrated
    assert get_method("magnitude").scope == "layer" and not get_method("magnitude").calibrated
