import torch

from secateurs.stats import ActivationStats


def test_sq_norm_is_mean_over_windows_of_window_sums():
    x = torch.randn(10, 8, 6)
    stats = ActivationStats(6)
    for chunk in x.split(3):  # batches of 3, 3, 3, 1
        stats.add_batch(chunk)
    expected = (x**2).sum(dim=1).mean(dim=0)
    torch.testing.assert_close(stats.sq_norm, expected)
    assert stats.windows == 10 and stats.tokens == 80


def test_sq_norm_does_not_depend_on_batching():
    x = torch.randn(12, 5, 4)
    one, four = ActivationStats(4), ActivationStats(4)
    for window in x:
        one.add_batch(window.unsqueeze(0))
    for chunk in x.split(4):
        four.add_batch(chunk)
    torch.testing.assert_close(one.sq_norm, four.sq_norm)


def test_reference_update_rule_step_by_step():
    stats = ActivationStats(2)
    a = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # one window: sums of squares (10, 4)
    b = torch.tensor([[[2.0, 2.0]], [[0.0, 1.0]]])  # two windows: sums (4, 4) and (0, 1)
    stats.add_batch(a)
    torch.testing.assert_close(stats.sq_norm, torch.tensor([10.0, 4.0]))
    stats.add_batch(b)
    torch.testing.assert_close(stats.sq_norm, torch.tensor([14.0 / 3, 9.0 / 3]))
    torch.testing.assert_close(stats.norm, stats.sq_norm.sqrt())


def test_low_precision_inputs_accumulate_in_fp32():
    stats = ActivationStats(3)
    stats.add_batch(torch.full((1, 4, 3), 300.0, dtype=torch.float16))
    assert stats.sq_norm.dtype == torch.float32
    torch.testing.assert_close(stats.sq_norm, torch.full((3,), 4 * 300.0**2))


def test_mean_is_over_every_token():
    x = torch.randn(6, 7, 5) + 2.0
    stats = ActivationStats(5, track_mean=True)
    for chunk in x.split(4):
        stats.add_batch(chunk)
    torch.testing.assert_close(stats.mean, x.reshape(-1, 5).mean(dim=0))


def test_full_gram_is_exact_and_sampled_gram_is_reproducible():
    x = torch.randn(4, 50, 6)
    full = ActivationStats(6, track_gram=True)
    full.add_batch(x)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(full.gram, flat.T @ flat)
    grams = []
    for _ in range(2):
        sampled = ActivationStats(6, track_gram=True, gram_fraction=0.3)
        for chunk in x.split(2):
            sampled.add_batch(chunk)
        grams.append(sampled.gram)
        assert 0 < sampled.gram_tokens < 200
    assert torch.equal(grams[0], grams[1])
