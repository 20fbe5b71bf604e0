import json

import pytest
import torch
from conftest import invoke, invoke_prune, make_model, make_windows
from transformers import AutoModelForCausalLM, PretrainedConfig

from secateurs import WandaPruner
from secateurs.core.model import find_blocks, find_linears, find_mlp_groups, weight_matrix
from secateurs.errors import SecateursError
from secateurs.formats.shrink import shrink_mlps, width_field


def _logits(model, seed: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model(make_windows(2, 16, seed=seed)).logits


def _mlp_widths(model) -> set[int]:
    widths = set()
    for block in find_blocks(model)[1]:
        layers = find_linears(block)
        for group in find_mlp_groups(layers):
            widths.add(weight_matrix(layers[group.consumer]).shape[1])
            widths |= {
                weight_matrix(layers[n]).shape[0] // group.parts_of(n) for n in group.producers
            }
    return widths


def test_neuron_pruned_model_shrinks_exactly_and_reloads(arch, tmp_path):
    model = make_model(arch)
    WandaPruner(model, progress=False).prune(make_windows(), 0.25, "neuron")
    masked = _logits(model)
    width = next(iter(_mlp_widths(model)))
    params = sum(p.numel() for p in model.parameters())

    shrinkage = shrink_mlps(model)

    assert _mlp_widths(model) == {width - width // 4}
    assert (shrinkage.width_before, shrinkage.width_after) == (width, width - width // 4)
    assert shrinkage.parameters_before == params
    assert shrinkage.parameters_after == sum(p.numel() for p in model.parameters()) < params
    torch.testing.assert_close(_logits(model), masked, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(reloaded.config, shrinkage.width_field) == width - width // 4
    torch.testing.assert_close(_logits(reloaded), masked, rtol=1e-5, atol=1e-5)


def test_blocks_with_fewer_dead_neurons_set_the_width():
    model = make_model("llama")
    blocks = find_blocks(model)[1]
    for index, block in enumerate(blocks):
        block.mlp.down_proj.weight.data[:, : 10 * index] = 0
    assert shrink_mlps(model).width_after == 128 and _mlp_widths(model) == {128}

    model = make_model("llama")
    for index, block in enumerate(find_blocks(model)[1]):
        block.mlp.down_proj.weight.data[:, 3 : 3 + 10 * (index + 1)] = 0
    before = _logits(model)
    assert shrink_mlps(model).width_after == 118 and _mlp_widths(model) == {118}
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


def test_a_neuron_with_zero_producers_but_a_live_consumer_is_kept():
    model = make_model("llama")
    for block in find_blocks(model)[1]:
        block.mlp.up_proj.weight.data[:8] = 0
    assert shrink_mlps(model).width_after == 128


def test_config_without_a_width_field_is_refused():
    with pytest.raises(SecateursError, match="--keep_shape"):
        width_field(PretrainedConfig())


def _prune_neurons(tiny_model_dir, text_dir, saved, *extra):
    return invoke_prune(
        tiny_model_dir,
        text_dir,
        *("--nsamples", "4", "--sparsity_type", "neuron", "--sparsity_ratio", "0.5"),
        *("--no_eval_dense", "--save_model", saved, *extra),
    )


def test_cli_saves_neuron_pruned_models_narrower_unless_told(tmp_path, tiny_model_dir, text_dir):
    narrow, full = tmp_path / "narrow", tmp_path / "full"
    result = _prune_neurons(tiny_model_dir, text_dir, narrow)
    assert result.exit_code == 0, result.output
    assert "MLP width 128 -> 64" in result.output
    saved = json.loads((narrow / "secateurs.json").read_text())
    assert saved["saved_model"]["width_after"] == 64
    assert json.loads((narrow / "config.json").read_text())["intermediate_size"] == 64

    result = _prune_neurons(tiny_model_dir, text_dir, full, "--keep_shape")
    assert result.exit_code == 0, result.output
    assert json.loads((full / "config.json").read_text())["intermediate_size"] == 128
    assert (narrow / "model.safetensors").stat().st_size < (
        full / "model.safetensors"
    ).stat().st_size

    again = [
        invoke("eval", "--model", path, "--dataset", text_dir, "--seqlen", "32", "--quiet")
        for path in (narrow, full)
    ]
    assert all(r.exit_code == 0 for r in again), [r.output for r in again]
    ppl = [line for r in again for line in r.output.splitlines() if line.startswith("perplexity")]
    assert ppl[0].split()[1] == ppl[1].split()[1]
