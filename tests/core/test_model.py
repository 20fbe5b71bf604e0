import pytest
import torch
from conftest import make_model, make_windows

from secateurs.core.model import (
    block_output,
    capture_block_inputs,
    choose_seqlen,
    context_length,
    find_blocks,
    find_linears,
    find_mlp_groups,
    iter_prunable,
    weight_matrix,
)
from secateurs.errors import SecateursError

EXPECTED_STACK = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gemma3": "model.layers",
    "mistral": "model.layers",
    "phi3": "model.layers",
}
EXPECTED_LINEARS = {
    "llama": 7,
    "qwen2": 7,
    "opt": 6,
    "gpt2": 4,
    "gemma3": 7,
    "mistral": 7,
    "phi3": 4,
}


def test_finds_the_decoder_stack_and_its_linears(arch):
    model = make_model(arch)
    name, blocks = find_blocks(model)
    assert name == EXPECTED_STACK[arch]
    assert len(blocks) == 3
    assert len(find_linears(blocks[0])) == EXPECTED_LINEARS[arch]
    assert len(list(iter_prunable(model))) == 3 * EXPECTED_LINEARS[arch]


def test_weight_matrix_is_out_by_in_and_a_view(arch):
    model = make_model(arch)
    for _, layer in iter_prunable(model):
        weight = weight_matrix(layer)
        weight[0, 0] = 0.0
        assert layer.weight.data.flatten().eq(0).any()
        if isinstance(layer, torch.nn.Linear):
            assert weight.shape == (layer.out_features, layer.in_features)


def test_captured_inputs_replay_the_model(arch):
    """Running the captured inputs through every block gives the model's own hidden states."""
    model = make_model(arch)
    windows = make_windows(5, 12)
    inputs = capture_block_inputs(model, windows, torch.device("cpu"), batch_size=2)
    assert set(inputs.extra) == {2, 1}
    with torch.no_grad():
        expected = model(windows, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(inputs.hidden, expected[0])
    _, blocks = find_blocks(model)
    hidden = inputs.hidden
    with torch.no_grad():
        for index, block in enumerate(blocks[:-1]):
            parts = []
            for start in range(0, 5, 2):
                batch = hidden[start : start + 2]
                args, kwargs = inputs.call_args(batch.shape[0], index)
                parts.append(block_output(block(batch, *args, **kwargs)))
            hidden = torch.cat(parts)
            torch.testing.assert_close(hidden, expected[index + 1], rtol=1e-5, atol=1e-5)


def test_capture_leaves_the_model_where_it_was():
    model = make_model("llama")
    capture_block_inputs(model, make_windows(2, 8), torch.device("cpu"), 2)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_seqlen_defaults_to_2048_capped_by_context():
    config = make_model("llama").config
    assert context_length(config) == 256
    assert choose_seqlen(config, None) == 256
    config.max_position_embeddings = 131072
    assert choose_seqlen(config, None) == 2048


def test_seqlen_longer_than_context_is_refused():
    config = make_model("gpt2").config
    with pytest.raises(SecateursError, match="longer than the model's context of 256"):
        choose_seqlen(config, 512)
    with pytest.raises(SecateursError, match="at least 2"):
        choose_seqlen(config, 1)


EXPECTED_MLPS = {
    "llama": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
    "qwen2": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
    "opt": [(("fc1",), "fc2")],
    "gpt2": [(("mlp.c_fc",), "mlp.c_proj")],
    "gemma3": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
    "mistral": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
    "phi3": [(("mlp.gate_up_proj",), "mlp.down_proj")],
}


def test_mlp_groups_are_found_by_shape_in_every_architecture(arch):
    _, blocks = find_blocks(make_model(arch))
    groups = find_mlp_groups(find_linears(blocks[0]))
    assert [(g.producers, g.consumer) for g in groups] == EXPECTED_MLPS[arch]
