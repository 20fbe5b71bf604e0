import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.core.patterns import (
    NeuronSparsity,
    NMSparsity,
    Unstructured,
    Variant,
    effective_ratio,
    layer_mask,
    nm_mask,
    parse_pattern,
    row_mask,
    variant_mask,
    zero_masked,
)
from secateurs.errors import SecateursError


@st.composite
def scores(draw, multiple_of: int = 1):
    rows = draw(st.integers(1, 12))
    cols = draw(st.integers(1, 10)) * multiple_of
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(rows, cols, generator=generator)
    if draw(st.booleans()):  # many ties: the count must still be exact
        values = (values * 3).floor()
    return values


ratios = st.floats(0.0, 0.99, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(scores(), ratios)
def test_row_mask_prunes_exactly_the_ratio_in_every_row(score, ratio):
    mask = row_mask(score, ratio)
    expected = int(score.shape[1] * ratio)
    assert torch.equal(mask.sum(dim=1), torch.full((score.shape[0],), expected))


@settings(max_examples=60, deadline=None)
@given(scores(), ratios)
def test_row_mask_prunes_the_lowest_scores(score, ratio):
    mask = row_mask(score, ratio)
    for row, pruned in zip(score, mask, strict=True):
        if pruned.any() and (~pruned).any():
            assert row[pruned].max() <= row[~pruned].min()


@settings(max_examples=60, deadline=None)
@given(scores(), ratios)
def test_layer_mask_prunes_exactly_the_ratio_of_the_matrix(score, ratio):
    mask = layer_mask(score, ratio)
    assert int(mask.sum()) == int(score.numel() * ratio)
    if mask.any() and (~mask).any():
        assert score[mask].max() <= score[~mask].min()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 4), (1, 4)]), st.data())
def test_nm_mask_prunes_n_of_every_m(nm, data):
    n, m = nm
    score = data.draw(scores(multiple_of=m))
    mask = nm_mask(score, n, m)
    groups = mask.reshape(score.shape[0], -1, m)
    assert bool((groups.sum(dim=2) == n).all())
    values = score.reshape(score.shape[0], -1, m)
    kept_min = values.masked_fill(groups, float("inf")).amin(dim=2)
    pruned_max = values.masked_fill(~groups, float("-inf")).amax(dim=2)
    assert bool((pruned_max <= kept_min).all())


@settings(max_examples=40, deadline=None)
@given(scores(multiple_of=4), ratios)
def test_pruned_weights_stay_zero_when_pruned_again(score, ratio):
    weight = score.clone()
    for pattern in (Unstructured("row"), Unstructured("layer"), NMSparsity(2, 4)):
        pruned = weight.masked_fill(pattern.create_mask(weight.abs(), ratio), 0)
        again = pruned.masked_fill(pattern.create_mask(pruned.abs(), ratio), 0)
        assert bool((again[pruned == 0] == 0).all())
        # zeros are the lowest magnitudes, so pruning the pruned matrix again changes nothing
        assert torch.equal(again, pruned)


def test_masks_are_identical_for_identical_scores():
    score = torch.rand(64, 64).round(decimals=1)  # heavy ties
    for pattern in (Unstructured("row"), Unstructured("layer"), NMSparsity(4, 8)):
        assert torch.equal(pattern.create_mask(score, 0.5), pattern.create_mask(score.clone(), 0.5))


@pytest.mark.parametrize("text", ["3:2", "2:0", "0:4", "2:2", "a:b", "2-4", "structured", ""])
def test_bad_patterns_are_refused(text):
    with pytest.raises(SecateursError, match=r"N:M|sparsity_type"):
        parse_pattern(text)


def test_parse_pattern():
    nm = parse_pattern("4:8")
    assert isinstance(nm, NMSparsity) and (nm.n, nm.m) == (4, 8)
    assert parse_pattern("unstructured", "layer").scope == "layer"


def test_columns_not_divisible_by_m_are_refused():
    with pytest.raises(SecateursError, match="multiples of 8"):
        NMSparsity(2, 8).check_columns(12, "layer.x")


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(SecateursError, match=r"\[0, 1\)"):
        effective_ratio(Unstructured(), ratio)


def test_nm_ratio_is_corrected_with_a_warning():
    with pytest.warns(UserWarning, match="using 0.5"):
        assert effective_ratio(NMSparsity(2, 4), 0.3) == 0.5


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 70), st.integers(0, 2**31 - 1), ratios)
def test_masks_equal_a_stable_sort_even_with_ties_and_nan(rows, cols, seed, ratio):
    generator = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 5, (rows, cols), generator=generator).float()
    score[score == 4] = float("nan")  # broken statistics: sorted last, never an empty mask
    k = int(cols * ratio)
    expected = torch.zeros_like(score, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], True)
    assert torch.equal(row_mask(score, ratio), expected)
    flat_k = int(score.numel() * ratio)
    flat = torch.zeros(score.numel(), dtype=torch.bool)
    flat[torch.argsort(score.flatten(), stable=True)[:flat_k]] = True
    assert torch.equal(layer_mask(score, ratio), flat.view_as(score))


def reference_variant(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """The variant written plainly, row by row, for comparison."""
    ordered, order = torch.sort(score, dim=1, stable=True)
    cumulative = ordered.cumsum(dim=1)

    def at(alpha):
        mask = torch.zeros_like(score, dtype=torch.bool)
        for row in range(score.shape[0]):
            count = int((cumulative[row] <= alpha * cumulative[row, -1]).sum())
            mask[row, order[row, :count]] = True
        return mask

    alpha, low, high = 0.4, 0.0, 0.8
    mask = at(alpha)
    while abs(float(mask.float().mean()) - ratio) > 1e-3 and high - low >= 1e-3:
        if float(mask.float().mean()) > ratio:
            high, alpha = alpha, (alpha + low) / 2
        else:
            low, alpha = alpha, (alpha + high) / 2
        mask = at(alpha)
    return mask


@settings(max_examples=30, deadline=None)
@given(scores(), st.floats(0.05, 0.9))
def test_variant_matches_a_plain_row_by_row_version(score, ratio):
    assert torch.equal(variant_mask(score, ratio), reference_variant(score, ratio))


def test_variant_reaches_the_target_and_varies_counts_per_row():
    generator = torch.Generator().manual_seed(0)
    score = torch.rand(64, 256, generator=generator) ** torch.linspace(1, 6, 64).unsqueeze(1)
    mask = variant_mask(score, 0.5)
    assert abs(float(mask.float().mean()) - 0.5) <= 1e-3
    per_row = mask.sum(dim=1)
    assert int(per_row.max() - per_row.min()) > 20
    # within a row, every pruned score is at most every kept one
    for row in range(score.shape[0]):
        if mask[row].any() and (~mask[row]).any():
            assert float(score[row][mask[row]].max()) <= float(score[row][~mask[row]].min())


@settings(max_examples=40, deadline=None)
@given(scores(), ratios)
def test_neuron_mask_removes_whole_columns_ranked_by_column_sum(score, ratio):
    mask = NeuronSparsity().create_mask(score, ratio)
    columns = mask[0]
    assert bool((mask == columns.unsqueeze(0)).all())
    assert int(columns.sum()) == int(score.shape[1] * ratio)
    sums = score.sum(dim=0)
    if columns.any() and (~columns).any():
        assert float(sums[columns].max()) <= float(sums[~columns].min())


def test_parse_pattern_knows_variant_and_neuron():
    assert isinstance(parse_pattern("unstructured", use_variant=True), Variant)
    assert isinstance(parse_pattern("neuron"), NeuronSparsity)
    assert parse_pattern("neuron").structured and not parse_pattern("2:4").structured
    with pytest.raises(SecateursError, match="--use_variant"):
        parse_pattern("2:4", use_variant=True)


def test_set_difference_on_hand_made_scores():
    from secateurs.core.patterns import SetDifference, set_difference_mask

    safety = torch.tensor([[9.0, 8.0, 1.0], [7.0, 2.0, 3.0]])
    utility = torch.tensor([[9.0, 1.0, 1.0], [1.0, 1.0, 8.0]])
    # top half by safety: 9, 8, 7; top third by utility: 9, 8 -> prune 8 and 7
    mask = set_difference_mask(safety, utility, p=1 / 3, q=0.5)
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    pattern = SetDifference(p=1 / 3, q=0.5)
    assert torch.equal(pattern.create_mask(torch.stack([safety, utility])), mask)
    assert not set_difference_mask(safety, utility, p=0.5, q=0.0).any()
    assert torch.equal(set_difference_mask(safety, utility, p=0.0, q=1.0), torch.ones_like(mask))


def test_set_difference_refuses_fractions_outside_0_1():
    from secateurs.core.patterns import SetDifference

    with pytest.raises(SecateursError, match="--q must be in"):
        SetDifference(0.1, 1.5)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    st.integers(1, 9),
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
)
def test_zero_masked_is_masked_fill_bit_for_bit(dtype, rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator).to(dtype)
    weight[0, 0] = -0.0  # a negative zero kept where it is not masked, +0.0 where it is
    mask = torch.rand(rows, cols, generator=generator) < 0.5
    expected = weight.clone().masked_fill_(mask, 0)
    zero_masked(weight, mask)
    assert torch.equal(weight.view(torch.uint8), expected.view(torch.uint8))


def test_zero_masked_edits_a_transposed_view_in_place():
    weight = torch.randn(6, 4)
    mask = torch.rand(4, 6) < 0.5
    zero_masked(weight.t(), mask)
    assert torch.equal(weight.t() == 0, mask)
