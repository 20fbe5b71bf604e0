import pytest
import torch
from conftest import make_model

from secateurs.api import MethodPruner
from secateurs.core.model import is_conv1d, iter_prunable, weight_matrix
from secateurs.core.passes import activation_means, gradient_magnitudes
from secateurs.data.prompts import PromptBatch


def _batch(seed: int = 0) -> PromptBatch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (4, 12), generator=generator)
    lengths = torch.tensor([12, 9, 7, 12])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        mask[row, length - 4 : length] = True
    return PromptBatch(ids, mask, lengths)


def _direct(model, batch: PromptBatch) -> dict[str, torch.Tensor]:
    """The definition, one layer and one sample at a time with torch.autograd.grad."""
    layers = dict(iter_prunable(model))
    weights = [layer.weight for layer in layers.values()]
    for weight in weights:
        weight.requires_grad_(True)
    sums = {name: torch.zeros_like(weight_matrix(layer)) for name, layer in layers.items()}
    labels = batch.labels()
    for row in range(batch.input_ids.shape[0]):
        length = int(batch.lengths[row])
        loss = model(
            input_ids=batch.input_ids[row : row + 1, :length], labels=labels[row : row + 1, :length]
        ).loss
        grads = torch.autograd.grad(loss, weights)
        for (name, layer), grad in zip(layers.items(), grads, strict=True):
            sums[name] += (grad.t() if is_conv1d(layer) else grad).abs()
    for weight in weights:
        weight.requires_grad_(False)
    return sums


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_matches_direct_autograd(arch):
    model = make_model(arch)
    batch = _batch()
    expected = _direct(make_model(arch), batch)
    got = gradient_magnitudes(model, batch, progress=False)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored as found


def test_padding_and_prompt_tokens_do_not_count():
    model = make_model("llama")
    batch = _batch()
    padded = PromptBatch(
        torch.where(
            batch.token_mask | (torch.arange(12) < batch.lengths[:, None]), batch.input_ids, 5
        ),
        batch.token_mask,
        batch.lengths,
    )
    first = gradient_magnitudes(model, batch, progress=False)
    second = gradient_magnitudes(model, padded, progress=False)
    for name in first:
        assert torch.equal(first[name], second[name])


def test_wandg_scores_are_weight_times_gradient_and_reproducible():
    model = make_model("llama")
    batch = _batch()
    pruner = MethodPruner(model, "wandg", progress=False)
    scores = pruner.scores(batch)
    gradients = gradient_magnitudes(make_model("llama"), batch, progress=False)
    for name, layer in iter_prunable(model):
        torch.testing.assert_close(scores[name], weight_matrix(layer).abs() * gradients[name])
    again = MethodPruner(make_model("llama"), "wandg", progress=False).scores(batch)
    assert all(torch.equal(scores[n], again[n]) for n in scores)


def test_wandg_prunes_per_row_and_masks_are_bit_identical():
    batch = _batch()
    models = [make_model("llama") for _ in range(2)]
    for model in models:
        MethodPruner(model, "wandg", progress=False).prune(batch, 0.5, "unstructured")
    for (_, a), (_, b) in zip(iter_prunable(models[0]), iter_prunable(models[1]), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0)
        assert int((a.weight == 0).sum(dim=1).min()) >= a.weight.shape[1] // 2


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batch_size_changes_only_rounding(batch_size):
    batch = _batch()
    single = gradient_magnitudes(make_model("llama"), batch, progress=False, batch_size=1)
    got = gradient_magnitudes(make_model("llama"), batch, progress=False, batch_size=batch_size)
    for name in single:
        torch.testing.assert_close(got[name], single[name], rtol=1e-5, atol=1e-7)
    again = gradient_magnitudes(make_model("llama"), batch, progress=False, batch_size=batch_size)
    assert all(torch.equal(got[n], again[n]) for n in got)


def test_rows_without_counted_targets_are_skipped():
    batch = _batch()
    mask = batch.token_mask.clone()
    mask[1] = False
    mask[2] = False
    mask[2, 0] = True  # a first token is never a target
    trimmed = PromptBatch(batch.input_ids, mask, batch.lengths)
    keep = [0, 3]
    only = PromptBatch(batch.input_ids[keep], mask[keep], batch.lengths[keep])
    got = gradient_magnitudes(make_model("llama"), trimmed, progress=False, batch_size=4)
    expected = gradient_magnitudes(make_model("llama"), only, progress=False, batch_size=4)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        gradient_magnitudes(make_model("llama"), _batch(), progress=False, batch_size=0)


def _direct_means(model, batch: PromptBatch) -> dict[str, torch.Tensor]:
    """The definition: each sample alone, every layer's inputs at the counted tokens."""
    layers = dict(iter_prunable(model))
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []
    for name, layer in layers.items():

        def hook(_m, args, _o, name=name):
            rows[name].append(args[0][0])

        handles.append(layer.register_forward_hook(hook))
    counted = []
    with torch.no_grad():
        for row in range(batch.input_ids.shape[0]):
            length = int(batch.lengths[row])
            model(input_ids=batch.input_ids[row : row + 1, :length])
            counted.append(batch.token_mask[row, :length])
    for handle in handles:
        handle.remove()
    return {
        name: torch.cat([x[m] for x, m in zip(seen, counted, strict=True)]).square().mean(dim=0)
        for name, seen in rows.items()
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_activation_means_match_the_definition(arch, batch_size):
    model = make_model(arch)
    batch = _batch()
    expected = _direct_means(make_model(arch), batch)
    got = activation_means(model, batch, progress=False, batch_size=batch_size)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == (weight_matrix(dict(iter_prunable(model))[name]).shape[1],)
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)


def test_activation_means_skip_uncounted_rows_and_refuse_an_empty_mask():
    batch = _batch()
    mask = batch.token_mask.clone()
    mask[1] = False
    trimmed = PromptBatch(batch.input_ids, mask, batch.lengths)
    rows = [0, 2, 3]
    only = PromptBatch(batch.input_ids[rows], batch.token_mask[rows], batch.lengths[rows])
    got = activation_means(make_model("llama"), trimmed, progress=False)
    expected = activation_means(make_model("llama"), only, progress=False)
    assert all(torch.equal(got[n], expected[n]) for n in got)
    empty = PromptBatch(batch.input_ids, torch.zeros_like(mask), batch.lengths)
    with pytest.raises(ValueError, match="no counted token"):
        activation_means(make_model("llama"), empty, progress=False)
