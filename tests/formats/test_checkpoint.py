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
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import secateurs  # noqa: F401  (registers the loader with transformers)
from secateurs.api import MethodPruner
from secateurs.errors import SecateursError
from secateurs.formats.checkpoint import (
    QUANT_METHOD,
    bitmask_pays,
    byte_planes,
    codable,
    convert_folder,
    decode,
    deflate,
    encode,
    from_planes,
    inflate,
    is_compressed,
    pack_bits,
    rewrite_folder,
    unpack_bits,
)


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


def _stored(parts: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """``encode``'s tensors keyed by suffix, as ``decode`` takes them."""
    return {key.removeprefix(name): value for key, value in parts.items()}


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 37),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_encode_then_decode_is_the_matrix_bit_for_bit(rows, cols, density, dtype, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=generator) * scale).to(dtype)
    weight[torch.rand(rows, cols, generator=generator) >= density] = 0
    # dequantized checkpoints hold -0.0: it must come back as -0.0, not +0.0
    weight[torch.rand(rows, cols, generator=generator) < 0.1] = -0.0
    parts = encode("w", weight)
    rebuilt = decode(_stored(parts, "w")) if len(parts) > 1 else parts["w"]
    assert rebuilt.dtype == dtype and rebuilt.shape == weight.shape
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_sparse_matrix_is_stored_as_bitmask_and_coded_values(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=generator).to(dtype)
    weight[torch.rand(64, 96, generator=generator) < 0.5] = 0
    parts = encode("layer.weight", weight)
    assert set(parts) == {
        "layer.weight",
        "layer.weight_bitmask",
        "layer.weight_values",
        "layer.weight_shape",
        "layer.weight_layout",
    }
    placeholder = parts["layer.weight"]
    assert placeholder.numel() == 0 and placeholder.dtype == dtype
    # one stream for the bitmask, one per byte of a value
    assert parts["layer.weight_layout"].shape == (1 + weight.element_size(), 2)
    nonzero = int(weight.ne(0).sum())
    stored = parts["layer.weight_values"].numel() + parts["layer.weight_bitmask"].numel()
    # the exponent bytes of normal values repeat a few patterns: they deflate
    assert stored < 0.95 * (nonzero * weight.element_size() + 64 * 12)


def test_a_dense_matrix_is_coded_only_where_its_bytes_deflate():
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(64, 64, generator=generator).half()
    parts = encode("w", gaussian)
    assert "w_bitmask" not in parts and "w_values" in parts
    assert sum(t.numel() * t.element_size() for t in parts.values()) < 0.95 * 64 * 64 * 2
    noise = torch.randint(-(2**15), 2**15, (64, 64), generator=generator, dtype=torch.int16)
    noise = noise.view(torch.float16)  # uniform bit patterns: nothing to gain
    assert set(encode("w", noise)) == {"w"}


def test_byte_planes_hold_each_byte_of_every_value():
    values = torch.tensor([1.0, -2.5, 0.0], dtype=torch.float32)
    planes = byte_planes(values)
    assert len(planes) == 4
    assert [int(plane[1]) for plane in planes] == list(values[1:2].view(torch.uint8).tolist())
    assert torch.equal(from_planes(planes, torch.float32), values)


def test_deflate_keeps_what_does_not_shrink():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8)
    assert deflate(noise) == (noise, False)
    zeros = torch.zeros(4096, dtype=torch.uint8)
    packed, deflated = deflate(zeros)
    assert deflated and packed.numel() < 100
    assert torch.equal(inflate(packed, True, 4096), zeros)


def test_decode_refuses_a_damaged_tensor():
    weight = torch.randn(16, 24)
    weight[:, ::2] = 0
    parts = _stored(encode("w", weight), "w")
    with pytest.raises(SecateursError, match="damaged"):
        decode(parts | {"_values": parts["_values"][:-1]})
    with pytest.raises(SecateursError, match="damaged"):
        decode(parts | {"_shape": torch.tensor([17, 24])})
    with pytest.raises(SecateursError, match="damaged"):
        decode(parts | {"_layout": parts["_layout"][:-1]})
    bad = parts["_values"].clone()
    bad[:8] = 255
    layout = parts["_layout"].clone()
    layout[1:, 1] = 1  # claims every plane is deflated
    with pytest.raises(SecateursError, match="damaged"):
        decode(parts | {"_values": bad, "_layout": layout})


def test_version_1_tensors_still_decode():
    weight = torch.tensor([[1.5, 0.0, 0.0], [0.0, 0.0, -2.0]], dtype=torch.float16)
    version_1 = {
        "": torch.empty(0, dtype=torch.float16),
        "_bitmask": pack_bits(weight.ne(0)),
        "_values": weight[weight.ne(0)],
        "_shape": torch.tensor([2, 3]),
    }
    assert torch.equal(decode(version_1), weight)
    with pytest.raises(SecateursError, match="damaged"):
        decode(version_1 | {"_values": weight[weight.ne(0)][:1]})


def test_a_version_1_folder_still_loads(tmp_path):
    model = _pruned("llama")
    model.save_pretrained(tmp_path / "m")
    shard = tmp_path / "m" / "model.safetensors"
    version_1: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(shard).items():
        if name.endswith("proj.weight"):
            kept = tensor.ne(0)
            version_1[name] = torch.empty(0, dtype=tensor.dtype)
            version_1[f"{name}_bitmask"] = pack_bits(kept)
            version_1[f"{name}_values"] = tensor[kept]
            version_1[f"{name}_shape"] = torch.tensor(list(tensor.shape))
        else:
            version_1[name] = tensor
    save_file(version_1, shard, metadata={"format": "pt"})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": "bitmask",
        "version": 1,
    }
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path / "m"))


def test_only_float_weight_matrices_are_codable():
    dense = torch.randn(16, 16)
    assert codable("a.weight", dense)
    assert not codable("a.bias", dense)
    assert not codable("a.weight", dense.flatten())
    assert not codable("a.weight", dense.long())


def test_the_bitmask_pays_above_one_zero_in_eight_bytes_per_value():
    matrix = torch.randn(16, 16)
    # fp32 breaks even at 1 zero in 32 entries
    assert bitmask_pays(matrix, 256 - 9)
    assert not bitmask_pays(matrix, 256 - 8)
    assert bitmask_pays(matrix.half(), 256 - 17)
    assert not bitmask_pays(matrix.half(), 256 - 16)


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
