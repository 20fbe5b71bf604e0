"""benchmarks/make_shaped_model.py: a random LLaMA-shaped checkpoint written tensor by tensor
that ``secateurs prune`` reads unchanged, in memory and streamed, to the same masks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, invoke_prune, make_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file

_BUILDER = Path(__file__).resolve().parents[2] / "benchmarks" / "make_shaped_model.py"


def _load_builder():
    spec = importlib.util.spec_from_file_location("make_shaped_model", _BUILDER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


shaped = _load_builder()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        out |= load_file(shard)
    return out


@pytest.fixture
def tokenizer_dir(tmp_path):
    path = tmp_path / "tokenizer"
    make_tokenizer().save_pretrained(path)
    return path


def _build(tmp_path, tokenizer_dir, name="model", seed=0, shard_bytes=100_000):
    out = tmp_path / name
    manifest = shaped.build("tiny", out, "float32", seed, str(tokenizer_dir), shard_bytes)
    return out, manifest


def test_tiny_shape_config_index_and_tensors(tmp_path, tokenizer_dir):
    out, manifest = _build(tmp_path, tokenizer_dir)
    shape = shaped.SHAPES["tiny"]
    config = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"):
        assert config[key] == shape[key]
    # the tokenizer's 128 ids fit the shape's 256: the shape's vocabulary is kept
    assert config["vocab_size"] == shape["vocab_size"] == manifest["vocab_size"]
    assert manifest["vocab_size_of_tokenizer"] == VOCAB
    assert (out / "tokenizer.json").is_file()
    assert not out.with_name(out.name + ".partial").exists()

    index = json.loads((out / shaped.INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) == manifest["shards"] > 1  # 100 kB shards: several
    stored = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as handle:
            assert set(handle.keys()) == {n for n, s in weight_map.items() if s == shard}
            for name in sorted(handle.keys()):
                tensor = handle.get_tensor(name)
                stored += tensor.numel() * tensor.element_size()
                if tensor.dim() == 1:
                    assert torch.equal(tensor, torch.ones_like(tensor)), name
                else:
                    assert abs(tensor.std().item() - 0.02) < 0.003, name
    assert stored == index["metadata"]["total_size"] == manifest["bytes"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert {n: list(t.shape) for n, t in model.state_dict().items()} == {
        n: list(t.shape) for n, t in _tensors(out).items()
    }
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]


def test_values_depend_on_seed_and_name_only(tmp_path, tokenizer_dir):
    first, _ = _build(tmp_path, tokenizer_dir, "a", shard_bytes=100_000)
    resharded, _ = _build(tmp_path, tokenizer_dir, "b", shard_bytes=10**9)
    other, _ = _build(tmp_path, tokenizer_dir, "c", seed=1)
    a, b, c = _tensors(first), _tensors(resharded), _tensors(other)
    assert len(list(resharded.glob("*.safetensors"))) == 1
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_generated_a_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr(shaped, "CHUNK_BYTES", 4096)
    tensor = shaped.Planned("model.layers.0.mlp.up_proj.weight", (100, 64), "normal")
    chunks = list(shaped.tensor_chunks(tensor, torch.float32, 0, 0.02))
    assert len(chunks) > 1
    assert all(c.numel() * c.element_size() <= 4096 for c in chunks)
    again = torch.cat(list(shaped.tensor_chunks(tensor, torch.float32, 0, 0.02)))
    assert torch.equal(torch.cat(chunks), again)
    assert again.shape == (100, 64)


def test_vocabulary_raised_to_the_tokenizer():
    config = shaped.shape_config("llama-2-7b", 49152, torch.float32)
    assert config.vocab_size == 49152
    assert shaped.shape_config("llama-3-8b", 49152, torch.float32).vocab_size == 128256
    planned = shaped.plan_tensors(shaped.shape_config("1b", 49152, torch.float32))
    assert "lm_head.weight" not in {t.name for t in planned}  # tied: stored once
    assert sum(t.numel for t in planned) == 1_235_814_400  # Llama-3.2-1B's count


def test_fewer_layers_keep_the_widths():
    full = shaped.shape_config("llama-2-7b", 49152, torch.float32)
    short = shaped.shape_config("llama-2-7b", 49152, torch.float32, layers=2)
    assert short.num_hidden_layers == 2 and full.num_hidden_layers == 32
    assert (short.hidden_size, short.intermediate_size) == (4096, 11008)
    blocks = {t.name.split(".")[2] for t in shaped.plan_tensors(short) if ".layers." in t.name}
    assert blocks == {"0", "1"}
    with pytest.raises(ValueError, match="--layers"):
        shaped.shape_config("llama-2-7b", 49152, torch.float32, layers=0)


def test_streamed_and_in_memory_prune_agree(tmp_path, tokenizer_dir, text_dir):
    model, _ = _build(tmp_path, tokenizer_dir)
    common = ("--prune_method", "wanda", "--nsamples", "8", "--eval_limit", "2", "--no_eval_dense")
    memory = invoke_prune(model, text_dir, *common, "--save_model", tmp_path / "m")
    disk = invoke_prune(
        model, text_dir, *common, "--offload", "disk", "--save_model", tmp_path / "d"
    )
    assert memory.exit_code == 0, memory.output
    assert disk.exit_code == 0, disk.output
    saved_memory, saved_disk = _tensors(tmp_path / "m"), _tensors(tmp_path / "d")
    assert saved_memory.keys() == saved_disk.keys()
    assert all(torch.equal(saved_memory[k], saved_disk[k]) for k in saved_memory)
    up = saved_disk["model.layers.0.mlp.up_proj.weight"]
    assert (up == 0).float().mean().item() == 0.5
