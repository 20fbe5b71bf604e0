"""The random baseline: uniform scores, seeded by --random_seed and the layer's name."""

import torch
from conftest import invoke_prune, make_model

from secateurs.api import MethodPruner
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.methods.random import RandomOptions, random_score


def test_scores_are_uniform_and_seeded_by_layer_name():
    weight = torch.randn(64, 128)
    first = random_score(weight, None, RandomOptions(3), "model.layers.0.mlp.up_proj")
    assert torch.equal(
        first, random_score(weight * 7, None, RandomOptions(3), "model.layers.0.mlp.up_proj")
    )
    assert not torch.equal(
        first, random_score(weight, None, RandomOptions(4), "model.layers.0.mlp.up_proj")
    )
    assert not torch.equal(
        first, random_score(weight, None, RandomOptions(3), "model.layers.1.mlp.up_proj")
    )
    assert first.shape == weight.shape and float(first.min()) >= 0 and float(first.max()) < 1
    assert abs(float(first.mean()) - 0.5) < 0.02


def _masks(seed: int) -> dict[str, torch.Tensor]:
    model = make_model("llama")
    MethodPruner(model, "random", options=RandomOptions(seed), progress=False).prune(None, 0.5)
    return {name: weight_matrix(layer) == 0 for name, layer in iter_prunable(model)}


def test_same_seed_same_masks_other_seed_other_masks():
    first, again, other = _masks(0), _masks(0), _masks(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)
    for mask in first.values():  # per row, as Wanda: every row loses half
        assert torch.equal(mask.sum(dim=1), torch.full((mask.shape[0],), mask.shape[1] // 2))


def test_random_from_the_command_line(tiny_model_dir, text_dir):
    result = invoke_prune(
        tiny_model_dir,
        text_dir,
        "--prune_method",
        "random",
        "--random_seed",
        "5",
        "--nsamples",
        "2",
        "--eval_limit",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "random" in result.output
