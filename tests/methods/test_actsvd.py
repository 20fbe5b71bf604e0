"""ActSVD's rank set difference against dense SVDs, and its block loop on tiny models."""

import torch
from conftest import make_model

from secateurs.core.lowrank import edit_by_grams
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.data.prompts import PromptBatch
from secateurs.methods.actsvd import output_directions, rank_count, rank_set_difference


def _layer(out: int = 12, inp: int = 8, tokens: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, inp, generator=generator, dtype=torch.float64)
    return weight, x


def _projector(weight, x, count):
    """Top ``count`` right singular vectors of X W^T by a dense SVD, as a projector."""
    _, _, vh = torch.linalg.svd(x @ weight.T, full_matrices=False)
    v = vh[:count].T
    return v @ v.T


def test_output_directions_match_a_dense_svd():
    weight, x = _layer()
    for count in (1, 3, 8):
        v = output_directions(weight, x.T @ x, count)
        torch.testing.assert_close(v @ v.T, _projector(weight, x, count), rtol=0, atol=1e-9)


def test_rank_set_difference_is_the_papers_update():
    weight, xu = _layer(seed=0)
    _, xs = _layer(seed=1)
    new, edit = rank_set_difference(weight, xu.T @ xu, xs.T @ xs, 0.75, 0.5)
    pu, ps = _projector(weight, xu, 6), _projector(weight, xs, 4)
    expected = weight - (torch.eye(12, dtype=weight.dtype) - pu) @ ps @ weight
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-9)
    assert (edit.total, edit.utility, edit.safety) == (8, 6, 4)
    # W's outputs span 8 directions; utility keeps 6, so at most min(4, 8 - 6) are removed
    assert edit.removed == 2
    assert int(torch.linalg.matrix_rank(weight - new, atol=1e-9)) == edit.removed


def test_edge_cases_of_the_rank_fractions():
    weight, x = _layer()
    gram = x.T @ x
    same, edit = rank_set_difference(weight, gram, gram, 0.5, 0.5)
    torch.testing.assert_close(same, weight, rtol=0, atol=1e-9)
    assert edit.removed == 0  # safety's directions are utility's: nothing outside
    alone, edit = rank_set_difference(weight, gram, gram, 0.0, 0.25)
    torch.testing.assert_close(alone, weight - _projector(weight, x, 2) @ weight)
    assert edit.removed == 2
    untouched, edit = rank_set_difference(weight, gram, gram * 2, 0.5, 0.0)
    assert torch.equal(untouched, weight) and edit.removed == 0
    assert rank_count(1.5, weight) == 8 and rank_count(0.06, weight) == 0


def _batch(seed: int) -> PromptBatch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (4, 10), generator=generator)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4:] = True
    return PromptBatch(ids, mask, torch.full((4,), 10))


def test_the_block_loop_hands_each_layer_its_grams_and_writes_back():
    model = make_model("llama")
    first = next(name for name, _ in iter_prunable(model))
    layer = dict(iter_prunable(model))[first]
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=_batch(0).input_ids)
    handle.remove()
    x = seen[0][_batch(0).token_mask]
    grams = {}

    def keep(name, weight, by_stream):
        grams[name] = by_stream
        return weight * 0.5, None

    edit_by_grams(model, {"a": _batch(0), "b": _batch(1)}, keep, progress=False)
    torch.testing.assert_close(grams[first]["a"], x.T @ x, rtol=1e-5, atol=1e-5)
    assert set(grams) == {name for name, _ in iter_prunable(model)}
    fresh = dict(iter_prunable(make_model("llama")))
    for name, layer in iter_prunable(model):
        torch.testing.assert_close(weight_matrix(layer), weight_matrix(fresh[name]) * 0.5)


def test_actsvd_on_a_model_is_bit_identical_across_runs():
    def run():
        model = make_model("gpt2")
        edit_by_grams(
            model,
            {"utility": _batch(0), "safety": _batch(1)},
            lambda _n, w, g: rank_set_difference(w, g["utility"], g["safety"], 0.9, 0.5),
            progress=False,
        )
        return [weight_matrix(layer).clone() for _, layer in iter_prunable(model)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    fresh = [weight_matrix(layer) for _, layer in iter_prunable(make_model("gpt2"))]
    assert any(not torch.equal(a, b) for a, b in zip(first, fresh, strict=True))
