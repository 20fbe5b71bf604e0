"""wanda_v2: |W| * sqrt(mean squared input) from whole-model passes, and --use_diff's scores."""

import pytest
import torch
from conftest import make_model

from secateurs.api import MethodPruner
from secateurs.core.model import base_weights, iter_prunable, weight_matrix
from secateurs.data.prompts import PromptBatch
from secateurs.errors import SecateursError


def _batch() -> PromptBatch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (5, 10), generator=generator)
    lengths = torch.tensor([10, 8, 10, 6, 9])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        mask[row, 3:length] = True
    return PromptBatch(ids, mask, lengths)


def _direct(model, batch: PromptBatch) -> dict[str, torch.Tensor]:
    """|W| * sqrt(mean of x^2 over the counted tokens), recorded sample by sample."""
    layers = dict(iter_prunable(model))
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(lambda _m, a, _o, n=name: inputs[n].append(a[0][0]))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        for row in range(batch.input_ids.shape[0]):
            model(input_ids=batch.input_ids[row : row + 1, : int(batch.lengths[row])])
    for handle in handles:
        handle.remove()
    masks = [batch.token_mask[r, : int(batch.lengths[r])] for r in range(len(batch.lengths))]
    scores = {}
    for name, layer in layers.items():
        x = torch.cat([seen[m] for seen, m in zip(inputs[name], masks, strict=True)])
        scores[name] = weight_matrix(layer).abs() * x.square().mean(dim=0).sqrt()[None]
    return scores


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scores_match_a_direct_computation(arch):
    model = make_model(arch)
    got = MethodPruner(model, "wanda_v2", progress=False, batch_size=2).scores(_batch())
    expected = _direct(make_model(arch), _batch())
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)


def test_scores_read_the_dense_model_in_every_block():
    """Unlike wanda, no block's statistics see an earlier block pruned: pruning at a high
    ratio leaves the same masks as pruning each layer from the dense model's scores."""
    batch = _batch()
    table = MethodPruner(make_model("llama"), "wanda_v2", progress=False).scores(batch)
    model = make_model("llama")
    MethodPruner(model, "wanda_v2", progress=False).prune(batch, 0.6)
    for name, layer in iter_prunable(model):
        keep = table[name].sort(dim=1, stable=True).indices[:, : int(0.6 * table[name].shape[1])]
        expected = torch.zeros_like(table[name], dtype=torch.bool).scatter_(1, keep, True)
        assert torch.equal(weight_matrix(layer) == 0, expected), name


def test_masks_are_bit_identical_across_runs_and_batch_sizes():
    masks = []
    for batch_size in (1, 4, 4):
        model = make_model("llama")
        MethodPruner(model, "wanda_v2", progress=False, batch_size=batch_size).prune(_batch(), 0.5)
        masks.append([weight_matrix(layer) == 0 for _, layer in iter_prunable(model)])
    assert all(torch.equal(a, b) for a, b in zip(masks[1], masks[2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1], strict=True))


def test_use_diff_scores_the_change_from_the_base():
    tuned, base = make_model("llama", seed=1), make_model("llama", seed=0)
    reference = base_weights(tuned, base, "base")
    got = MethodPruner(tuned, "wanda_v2", progress=False, base=reference).scores(_batch())
    plain = MethodPruner(make_model("llama", seed=1), "wanda_v2", progress=False).scores(_batch())
    for name, layer in iter_prunable(tuned):
        change = (weight_matrix(layer) - reference[name]).abs()
        ratio = plain[name] / weight_matrix(layer).abs()
        torch.testing.assert_close(got[name], change * ratio, rtol=1e-4, atol=1e-6)


def test_use_diff_refuses_a_model_and_itself_and_different_layers():
    with pytest.raises(SecateursError, match="same weights as --model in every prunable layer"):
        base_weights(make_model("llama"), make_model("llama"), "itself")
    with pytest.raises(SecateursError, match="does not have this model's linear layers"):
        base_weights(make_model("llama"), make_model("qwen2"), "other")


def test_use_diff_with_a_solver_is_refused():
    tuned, base = make_model("llama", seed=1), make_model("llama")
    with pytest.raises(SecateursError, match="--use_diff needs a score method"):
        MethodPruner(tuned, "sparsegpt", base=base_weights(tuned, base, "base"))
