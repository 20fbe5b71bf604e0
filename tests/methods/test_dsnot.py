"""DSnoT: the refined mask keeps every row's count (and N:M groups) and never raises the
expected output shift it minimises."""

import pytest
import torch
from conftest import invoke_prune, make_model, make_windows
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.api import MethodPruner
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.core.patterns import nm_mask, row_mask
from secateurs.errors import SecateursError
from secateurs.methods.dsnot import DSnoTOptions, MaskRefiner, dsnot, expected_shift


def _layer(seed: int, rows: int = 6, columns: int = 16):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    mean = torch.randn(columns, generator=generator)
    variance = torch.rand(columns, generator=generator) + 0.1
    score = weight.abs() * (mean.square() + variance).sqrt()
    return weight, mean, variance, score


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_unstructured_refinement_keeps_counts_and_never_raises_the_shift(seed, ratio):
    weight, mean, variance, score = _layer(seed)
    initial = row_mask(score, ratio)
    refined = dsnot(weight, score, initial, mean, variance, DSnoTOptions(threshold=0.0))
    assert torch.equal(refined.sum(dim=1), initial.sum(dim=1))
    before = expected_shift(weight, initial, mean).abs()
    after = expected_shift(weight, refined, mean).abs()
    assert bool((after <= before + 1e-12).all())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), nm=st.sampled_from([(2, 4), (4, 8), (1, 4)]))
def test_nm_refinement_keeps_every_group(seed, nm):
    n, m = nm
    weight, mean, variance, score = _layer(seed)
    initial = nm_mask(score, n, m)
    refined = dsnot(weight, score, initial, mean, variance, DSnoTOptions(threshold=0.0), m)
    assert bool((refined.view(6, -1, m).sum(dim=2) == n).all())
    before = expected_shift(weight, initial, mean).abs()
    assert bool((expected_shift(weight, refined, mean).abs() <= before + 1e-12).all())


def test_a_helpful_swap_is_made_and_a_sign_flip_or_high_threshold_is_not():
    mean, variance = torch.ones(4), torch.ones(4)
    score = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    initial = torch.tensor([[True, True, False, True]])
    weight = torch.tensor([[2.0, 1.0, -0.5, 0.2]])  # shift 3.2
    refined = dsnot(weight, score, initial, mean, variance, DSnoTOptions(threshold=0.0))
    # the 2.0 grows back, the -0.5 goes: shift 0.7; then no negative weight is left to cut
    assert torch.equal(refined, torch.tensor([[False, True, True, True]]))
    flipping = torch.tensor([[2.0, 1.0, -1.5, 0.2]])  # the same swap ends at -0.3
    assert torch.equal(dsnot(flipping, score, initial, mean, variance), initial)
    high = DSnoTOptions(threshold=10.0)
    assert torch.equal(dsnot(weight, score, initial, mean, variance, high), initial)


def test_wanda_with_dsnot_through_the_engine_is_reproducible():
    windows = make_windows(4, 16)

    def run(refiner):
        model = make_model("llama")
        MethodPruner(model, "wanda", progress=False, refiner=refiner).prune(windows, 0.5)
        return {name: weight_matrix(layer) == 0 for name, layer in iter_prunable(model)}

    exact = MaskRefiner(DSnoTOptions(threshold=0.0))
    plain, refined, again = run(None), run(exact), run(exact)
    assert all(torch.equal(refined[n], again[n]) for n in refined)
    assert all(torch.equal(refined[n].sum(1), plain[n].sum(1)) for n in refined)
    assert any(not torch.equal(refined[n], plain[n]) for n in refined)


def test_refine_from_the_command_line(tiny_model_dir, text_dir, tmp_path):
    out = invoke_prune(tiny_model_dir, text_dir, "--refine", "dsnot", "--nsamples", "4",
                       "--eval_limit", "1", "--sparsity_type", "2:4")  # fmt: skip
    assert out.exit_code == 0, out.output
    for args, message in (
        (("--prune_method", "sparsegpt"), "updates weights itself"),
        (("--sparsity_type", "neuron"), "refines unstructured and N:M masks"),
        (("--dsnot_cycles", "0"), "--dsnot_cycles must be at least 1"),
    ):
        bad = invoke_prune(tiny_model_dir, text_dir, "--refine", "dsnot", *args)
        assert bad.exit_code == 2 and message in bad.output, bad.output


def test_options_are_checked():
    with pytest.raises(SecateursError, match="--dsnot_threshold"):
        DSnoTOptions(threshold=-1.0)
