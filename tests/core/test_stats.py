import pytest
import torch

from secateurs.core.stats import (
    ActivationStats,
    MagnitudeHistogram,
    SelectivityThresholds,
    StatsRequest,
    token_classes,
)
from secateurs.errors import SecateursError
from secateurs.methods.selectivity import SelectivityOptions, channel_idf


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
    stats = ActivationStats(5, request=StatsRequest(mean=True))
    for chunk in x.split(4):
        stats.add_batch(chunk)
    torch.testing.assert_close(stats.mean, x.reshape(-1, 5).mean(dim=0))


def test_full_gram_is_exact_and_sampled_gram_is_reproducible():
    x = torch.randn(4, 50, 6)
    full = ActivationStats(6, request=StatsRequest(gram=True))
    full.add_batch(x)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(full.gram, flat.T @ flat)
    grams = []
    for _ in range(2):
        sampled = ActivationStats(6, request=StatsRequest(gram=True, gram_fraction=0.3))
        for chunk in x.split(2):
            sampled.add_batch(chunk)
        grams.append(sampled.gram)
        assert 0 < sampled.gram_tokens < 200
    assert torch.equal(grams[0], grams[1])


def test_gram_folded_in_bands_equals_the_whole_product(monkeypatch):
    """A Gram too wide for one temporary is folded a band of columns at a time, to the same
    sums as whole products; kept terms (a data-parallel run) carry the whole product."""
    from secateurs.core import stats as module

    x = torch.randn(3, 40, 37)
    whole = torch.zeros(37, 37)
    for batch in x.split(1):
        flat = batch.reshape(-1, 37)
        whole += flat.T @ flat
    monkeypatch.setattr(module, "GRAM_BAND_BYTES", 4 * 40 * 5)  # five columns a band
    banded = ActivationStats(37, request=StatsRequest(gram=True))
    kept = ActivationStats(37, request=StatsRequest(gram=True), keep_terms=True)
    for batch in x.split(1):
        banded.add_batch(batch)
        kept.add_batch(batch)
    # a band's product may take another BLAS path than the whole one at this tiny width
    torch.testing.assert_close(banded.gram, whole, rtol=1e-6, atol=1e-5)
    assert torch.equal(kept.gram, whole)
    assert banded.gram_tokens == kept.gram_tokens == 120
    assert all(terms.gram is not None for terms in kept.terms)


def test_exact_selectivity_matches_a_direct_computation():
    x = torch.tensor(
        [[0.0, 1.0, -4.0], [0.5, -1.0, 0.0], [0.1, 2.0, 0.0], [-0.2, 1.0, 0.0], [0.3, -3.0, 8.0]]
    )  # 5 tokens, 3 channels
    seed = SelectivityOptions(exact=True, idf_form="seed")
    stats = ActivationStats(3, request=StatsRequest(selectivity=seed.thresholds()))
    stats.add_batch(x[:2].unsqueeze(0))
    stats.add_batch(x[2:].unsqueeze(0))
    magnitudes = x.abs()
    tau = magnitudes.reshape(-1).sort().values[8]  # 60th percentile of 15 values: the 9th
    assert stats._selectivity.tau == pytest.approx(float(tau))
    active = (magnitudes > tau).float().mean(dim=0)
    expected_idf = torch.log(1 / (active + 1e-10)).clamp(0, 10)
    torch.testing.assert_close(channel_idf(stats, seed), expected_idf)
    torch.testing.assert_close(stats.active_rate, active)
    relative = (magnitudes > magnitudes.mean(dim=0)).float().mean(dim=0)
    torch.testing.assert_close(stats.relative_rate, relative)
    top = magnitudes.max(dim=0).values  # the top 10% of 5 tokens is one token
    expected_spiky = (top / (magnitudes.mean(dim=0) + 1e-10)).clamp(1, 10)
    torch.testing.assert_close(stats.spikiness, expected_spiky)


def test_selectivity_options_change_the_statistics():
    x = torch.randn(1, 400, 4) * torch.tensor([0.1, 1.0, 3.0, 10.0])
    loose_options = SelectivityOptions(idf_clip=0.5, idf_form="seed")
    loose = ActivationStats(4, request=StatsRequest(selectivity=loose_options.thresholds()))
    loose.add_batch(x)
    loose_idf = channel_idf(loose, loose_options)
    assert float(loose_idf.max()) <= 0.5
    strict_options = SelectivityOptions(tau_percentile=0.95, idf_form="seed")
    strict = ActivationStats(4, request=StatsRequest(selectivity=strict_options.thresholds()))
    strict.add_batch(x)
    assert bool((channel_idf(strict, strict_options) >= loose_idf).all())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tau_percentile": 1.0}, "tau_percentile"),
        ({"top_quantile": 0.0}, "top_quantile"),
        ({"idf_clip": 0.0}, "idf_clip"),
        ({"spiky_clip": 0.5}, "spiky_clip"),
        ({"eps": 0.0}, "eps"),
        ({"idf_form": "bm25"}, "unknown --idf_form 'bm25'"),
        ({"idf_power": 0.0}, "idf_power"),
        ({"idf_floor": 0.0}, "idf_floor"),
    ],
)
def test_bad_selectivity_options_are_refused(options, message):
    with pytest.raises(SecateursError, match=message):
        SelectivityOptions(**options)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ({"tau_percentile": 1.0}, "tau_percentile"),
        ({"top_quantile": 0.0}, "top_quantile"),
        ({"spiky_clip": 0.5}, "spiky_clip"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_selectivity_thresholds_are_refused(thresholds, message):
    with pytest.raises(SecateursError, match=message):
        SelectivityThresholds(**thresholds)


DISTRIBUTIONS = {
    "gaussian": lambda g, n, c: torch.randn(n, c, generator=g) * torch.logspace(-2, 1, c),
    "heavy tailed": lambda g, n, c: (
        torch.randn(n, c, generator=g) / torch.rand(n, c, generator=g).clamp_min(1e-3)
    ),
    "relu sparse": lambda g, n, c: torch.relu(
        torch.randn(n, c, generator=g) - torch.linspace(0, 2, c)
    ),
    "log-normal": lambda g, n, c: torch.exp(2 * torch.randn(n, c, generator=g)),
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_streaming_selectivity_is_within_the_stated_bound_of_exact(name):
    # The bound stated in the docs: active rate within 0.002, IDF within 0.05 where the
    # rate is not tiny, spikiness within 0.2% (16k tokens, 1/32-octave bins).
    generator = torch.Generator().manual_seed(3)
    channels = 48
    seed = SelectivityOptions(idf_form="seed")
    exact = ActivationStats(
        channels, request=StatsRequest(selectivity=SelectivityThresholds(exact=True))
    )
    streamed = ActivationStats(channels, request=StatsRequest(selectivity=seed.thresholds()))
    for _ in range(8):
        x = DISTRIBUTIONS[name](generator, 2048, channels).reshape(4, 512, channels)
        exact.add_batch(x)
        streamed.add_batch(x)
    rate_exact, rate_streamed = exact.active_rate, streamed.active_rate
    assert float((rate_exact - rate_streamed).abs().max()) < 0.002
    common = rate_exact > 0.01
    idf_gap = channel_idf(exact, seed) - channel_idf(streamed, seed)
    assert float(idf_gap[common].abs().max()) < 0.05
    relative = (exact.spikiness - streamed.spikiness).abs() / exact.spikiness
    assert float(relative.max()) < 0.002
    # the share above the channel's own mean comes from the 1/8 token sample: ~2k tokens
    assert float((exact.relative_rate - streamed.relative_rate).abs().max()) < 0.05


def test_streaming_memory_does_not_grow_with_tokens():
    stats = ActivationStats(16, request=StatsRequest(selectivity=SelectivityThresholds()))
    held = stats._selectivity._histogram.counts
    shape = held.shape
    for _ in range(5):
        stats.add_batch(torch.randn(4, 256, 16))
    assert stats._selectivity._histogram.counts.shape == shape
    assert stats._selectivity._values == []
    binned = stats._selectivity._binned
    assert 0 < binned < 5 * 4 * 256 and int(held.sum()) == binned * 16


def test_histogram_bins_are_at_most_a_32nd_octave_wide():
    histogram = MagnitudeHistogram(1)
    edges = histogram.edges()[1:-1]
    width = (edges[:, 1] - edges[:, 0]) / edges[:, 0]
    assert float(width.max()) <= 1 / 32 + 1e-12
    values = torch.tensor([[0.0], [1e-9], [1.0], [1.5], [70000.0], [float("inf")]])
    histogram.add(values)
    hits = histogram.counts[0].nonzero().squeeze(1).tolist()
    assert hits[0] == 0 and hits[-1] == histogram.bins - 1
    one = int(hits[1])
    assert float(histogram.edges()[one, 0]) == 1.0


def test_fisher_ratio_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 3, (2, 300), generator=generator)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [-5.0, 0.1]])  # channel 0 separates
    x = torch.randn(2, 300, 2, generator=generator) + centres[labels.clamp_min(0)]
    stats = ActivationStats(2, request=StatsRequest(classes=3))
    stats.add_batch(x[:1], labels[:1])
    stats.add_batch(x[1:], labels[1:])
    flat, flat_labels = x.reshape(-1, 2).double(), labels.reshape(-1)
    kept, kept_labels = flat[flat_labels >= 0], flat_labels[flat_labels >= 0]
    overall = kept.mean(dim=0)
    between = sum(
        (kept_labels == c).sum() * (kept[kept_labels == c].mean(dim=0) - overall) ** 2
        for c in range(3)
    )
    within = sum(
        ((kept[kept_labels == c] - kept[kept_labels == c].mean(dim=0)) ** 2).sum(dim=0)
        for c in range(3)
    )
    torch.testing.assert_close(stats.fisher, (between / within).float())
    assert float(stats.fisher[0]) > 10 * float(stats.fisher[1])


def test_class_statistics_need_labels():
    stats = ActivationStats(2, request=StatsRequest(classes=2))
    with pytest.raises(ValueError, match="token labels"):
        stats.add_batch(torch.randn(1, 4, 2))


def test_token_classes_rank_by_frequency_with_ties_to_the_lower_id():
    windows = torch.tensor([[5, 5, 5, 2, 2, 9, 9, 7], [1, 1, 1, 1, 0, 3, 3, 3]])
    labels = token_classes(windows, 3)
    # frequencies: 1 -> 4, then 3 and 5 -> 3 each (3 first), then 2 and 9 -> 2 (left out)
    expected = torch.tensor([[2, 2, 2, -1, -1, -1, -1, -1], [0, 0, 0, 0, -1, 1, 1, 1]])
    assert torch.equal(labels, expected)
    assert torch.equal(token_classes(windows, 100).max(), torch.tensor(6))
    with pytest.raises(SecateursError, match="> 0"):
        token_classes(windows, 0)


def test_token_classes_rank_only_the_counted_tokens():
    # padding (0) and a template token (9) are the most frequent ids but never counted
    windows = torch.tensor([[9, 9, 5, 5, 7, 0, 0, 0], [9, 9, 7, 3, 7, 0, 0, 0]])
    counted = torch.zeros_like(windows, dtype=torch.bool)
    counted[:, 2:5] = True
    labels = token_classes(windows, 2, counted)
    assert labels[counted].tolist() == [1, 1, 0, 0, -1, 0]  # 7 then 5; 3 gets no class
    assert set(labels[~counted].tolist()) == {-1}


def test_requests_merge_to_everything_asked_for():
    merged = StatsRequest(mean=True, gram=True, gram_fraction=0.25).merge(
        StatsRequest(selectivity=SelectivityThresholds(), classes=4)
    )
    assert merged.mean and merged.gram and merged.gram_fraction == 0.25
    assert merged.selectivity == SelectivityThresholds() and merged.classes == 4
    assert (
        StatsRequest(gram=True, gram_fraction=0.25).merge(StatsRequest(gram=True)).gram_fraction
        == 1.0
    )


def test_histogram_cdf_and_quantiles_match_direct_counts_at_bin_edges():
    from secateurs.core.stats import _cdf, _quantiles

    generator = torch.Generator().manual_seed(5)
    values = torch.exp(torch.randn(4096, 3, generator=generator))
    histogram = MagnitudeHistogram(3)
    histogram.add(values)
    counts, edges = histogram.counts.double(), histogram.edges()
    for edge in (0.5, 1.0, 2.0):  # powers of two are bin edges
        assert torch.equal(_cdf(counts, edges, edge), (values < edge).double().sum(dim=0))
    per_row = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    expected = torch.stack([(values[:, j] < per_row[j]).double().sum() for j in range(3)])
    assert torch.equal(_cdf(counts, edges, per_row), expected)
    quantile = _quantiles(counts, edges, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    exact = torch.stack([values[:, j].quantile(q) for j, q in enumerate((0.1, 0.5, 0.9))])
    assert torch.allclose(quantile.float(), exact, rtol=1 / 32)
