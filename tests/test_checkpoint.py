"""Compressed sparse checkpoints: bitmask packing, folder rewrites, and loading back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import invoke, invoke_prune, make_model, make_windows
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import secateurs  # noqa: F401  (registers the loader with transformers)
from secateurs.checkpoint import (
    QUANT_METHOD,
    convert_folder,
    decode,
    encode,
    is_compressed,
    pack_bits,
    rewrite_folder,
    unpack_bits,
    worth_compressing,
)
from secateurs.errors import SecateursError
from secateurs.pruning import MethodPruner


def _tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def _pruned(arch: str, pattern: str = "unstructured") -> torch.nn.Module:
    model = make_model(arch)
    MethodPruner(model, "wanda", progress=False).prune(
        make_windows(8, 16), 0.5, sparsity_type=pattern
    )
    return model


def _assert_same_weights(expected: torch.nn.Module, loaded: torch.nn.Module) -> None:
    want, got = expected.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        # bit for bit: a compare of the raw bytes, so -0.0 and +0.0 would differ
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 37),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_pack_then_unpack_is_the_mask(rows, cols, density, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=generator) < density
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, (cols + 7) // 8)
    assert torch.equal(unpack_bits(packed, cols), mask)


def test_bits_are_least_significant_first():
    mask = torch.tensor([[True, False, False, False, False, False, False, False, True]])
    assert pack_bits(mask).tolist() == [[1, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encode_decode_round_trip(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 20, generator=generator).to(dtype)
    weight[torch.rand(12, 20, generator=generator) < 0.6] = 0
    parts = encode("layer.weight", weight)
    assert set(parts) == {
        "layer.weight",
        "layer.weight_bitmask",
        "layer.weight_values",
        "layer.weight_shape",
    }
    assert parts["layer.weight"].numel() == 0  # the placeholder
    assert parts["layer.weight_values"].numel() == int(weight.ne(0).sum())
    rebuilt = decode(*list(parts.values())[1:])
    assert rebuilt.dtype == dtype and torch.equal(rebuilt, weight)


def test_decode_refuses_a_damaged_tensor():
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    parts = encode("w", weight)
    with pytest.raises(SecateursError, match="damaged"):
        decode(parts["w_bitmask"], parts["w_values"][:1], parts["w_shape"])
    with pytest.raises(SecateursError, match="damaged"):
        decode(parts["w_bitmask"], parts["w_values"], torch.tensor([3, 2]))


def test_only_sparse_weight_matrices_are_worth_compressing():
    dense = torch.randn(16, 16)
    sparse = dense.clone()
    sparse[:, ::2] = 0
    assert worth_compressing("a.weight", sparse)
    assert not worth_compressing("a.weight", dense)
    assert not worth_compressing("a.bias", sparse)
    assert not worth_compressing("a.weight", sparse.flatten())
    # fp32 breaks even at 1 zero in 32 entries: 1 in 64 is not enough
    nearly_dense = dense.clone()
    nearly_dense.view(-1)[::64] = 0
    assert not worth_compressing("a.weight", nearly_dense)


# Conv1D weights (gpt2), tied embeddings (gemma3), fused projections (phi3)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "phi3"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_compressed_folder_loads_back_bit_identical(tmp_path, arch, pattern):
    model = _pruned(arch, pattern)
    model.save_pretrained(tmp_path / "dense")
    model.save_pretrained(tmp_path / "packed", max_shard_size="100KB")
    summary = rewrite_folder(tmp_path / "packed")
    assert summary.compressed > 0 and summary.bytes_after < summary.bytes_before
    assert is_compressed(tmp_path / "packed")
    assert not is_compressed(tmp_path / "dense")
    stored = _tensors(tmp_path / "packed")
    assert any(name.endswith("_bitmask") for name in stored)
    index = json.loads((tmp_path / "packed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    _assert_same_weights(model, loaded)
    assert getattr(loaded.config, "quantization_config", None) is None
    assert not getattr(loaded, "is_quantized", False)
    # the loaded model is ordinary: saved again, it is a plain dense folder
    loaded.save_pretrained(tmp_path / "again")
    assert not is_compressed(tmp_path / "again")
    assert _tensors(tmp_path / "again").keys() == _tensors(tmp_path / "dense").keys()


def test_compressed_model_computes_the_same_logits(tmp_path):
    model = _pruned("llama")
    model.save_pretrained(tmp_path / "m")
    rewrite_folder(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = make_windows(2, 16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_convert_to_half_and_back_to_dense(tmp_path):
    model = _pruned("llama")
    model.save_pretrained(tmp_path / "m")
    half = convert_folder(tmp_path / "m", tmp_path / "half", "compressed", torch.float16)
    # fp16 halves every tensor; the bitmask form then saves on the pruned matrices
    assert half.bytes_after < 0.7 * (half.bytes_before / 2)
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    convert_folder(tmp_path / "half", tmp_path / "dense16", "dense")
    assert not is_compressed(tmp_path / "dense16")
    stored = _tensors(tmp_path / "dense16")
    expected = {k: v.half() for k, v in _tensors(tmp_path / "m").items()}
    assert stored.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(stored[name], tensor), name


def test_convert_refuses_bad_input_before_writing(tmp_path):
    make_model("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(SecateursError, match="--save_format"):
        convert_folder(tmp_path / "m", tmp_path / "out", "zip")
    (tmp_path / "taken").mkdir()
    with pytest.raises(SecateursError, match="already exists"):
        convert_folder(tmp_path / "m", tmp_path / "taken")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(SecateursError, match="no safetensors"):
        convert_folder(tmp_path / "empty", tmp_path / "out")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SecateursError, match="quantized with gptq"):
        convert_folder(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_transformers_without_secateurs_stops_instead_of_loading_noise(tmp_path):
    model = _pruned("llama")
    model.save_pretrained(tmp_path / "m")
    rewrite_folder(tmp_path / "m")
    script = (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0
    assert "secateurs-sparse" in done.stderr and "mismatch" in done.stderr


def test_a_newer_format_version_is_refused(tmp_path):
    model = _pruned("llama")
    model.save_pretrained(tmp_path / "m")
    rewrite_folder(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"]["version"] = 99
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SecateursError, match="upgrade secateurs"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_prune_saves_compressed_and_eval_reads_it(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "pruned"
    result = invoke_prune(
        tiny_model_dir,
        text_dir,
        "--nsamples",
        "4",
        "--eval_limit",
        "2",
        "--sparsity_type",
        "2:4",
        "--save_model",
        out,
        "--save_format",
        "compressed",
        "--save_json",
        tmp_path / "run.json",
    )
    assert result.exit_code == 0, result.output
    assert is_compressed(out)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["checkpoint"]["save_format"] == "compressed"
    assert record["checkpoint"]["ratio"] < 0.7
    evaluated = invoke(
        "eval",
        "--model",
        out,
        "--dataset",
        text_dir,
        "--seqlen",
        "32",
        "--eval_limit",
        "2",
        "--quiet",
    )
    assert evaluated.exit_code == 0, evaluated.output
    pruned_ppl = record["perplexity"]["pruned"]
    assert f"{pruned_ppl:.3f}" in evaluated.output


def test_prune_refuses_an_unknown_save_format(tiny_model_dir, text_dir, tmp_path):
    result = invoke_prune(
        tiny_model_dir, text_dir, "--save_model", tmp_path / "o", "--save_format", "zip"
    )
    assert result.exit_code == 2
    assert "--save_format must be one of dense, compressed" in result.output
    assert not (tmp_path / "o").exists()


def test_convert_command(tmp_path):
    _pruned("llama").save_pretrained(tmp_path / "m")
    result = invoke(
        "convert",
        "--model",
        tmp_path / "m",
        "--save_model",
        tmp_path / "c",
        "--dtype",
        "float16",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "compressed" in result.output and is_compressed(tmp_path / "c")
    result = invoke("convert", "--model", tmp_path / "m", "--save_model", tmp_path / "c")
    assert result.exit_code == 2 and "already exists" in result.output


def test_streaming_a_compressed_checkpoint_is_refused(tiny_model_dir, text_dir, tmp_path):
    convert_folder(tiny_model_dir, tmp_path / "c")
    result = invoke_prune(
        tmp_path / "c", text_dir, "--offload", "disk", "--save_model", tmp_path / "o"
    )
    assert result.exit_code == 2
    assert "secateurs convert" in result.output and "--save_format dense" in result.output
