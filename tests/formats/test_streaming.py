"""Streaming a model from disk: the same pruned tensors and perplexity as in memory."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from conftest import make_model, make_windows
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from secateurs.api import MethodPruner
from secateurs.core.model import model_size_bytes
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import perplexity
from secateurs.formats import streaming
from secateurs.formats.streaming import (
    DiskBlocks,
    build_skeleton,
    checkpoint_bytes,
    checkpoint_files,
    parse_memory,
    streamed_perplexity,
    write_shard,
)

CPU = torch.device("cpu")


def _tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        out |= load_file(shard)
    return out


def _sharded(tmp_path, arch: str):
    """A tiny model saved in several small shards."""
    source = tmp_path / "source"
    make_model(arch).save_pretrained(source, max_shard_size="100KB")
    assert len(set(checkpoint_files(source).values())) > 2
    return source


def _streamed(source, out, method: str, windows, **prune_args) -> DiskBlocks:
    skeleton = build_skeleton(source, torch.float32)
    out.mkdir()
    store = DiskBlocks(skeleton, source, torch.float32, out)
    store.write_outer()
    MethodPruner(skeleton, method, progress=False, store=store).prune(windows, **prune_args)
    store.finish()
    return store


# tied embeddings and two attention kinds (gemma3), Conv1D (gpt2), fused projections (phi3)
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "phi3"])
def test_streamed_tensors_equal_in_memory_save(tmp_path, arch):
    source = _sharded(tmp_path, arch)
    windows = make_windows(8, 16)
    model = make_model(arch)
    MethodPruner(model, "wanda", progress=False).prune(windows, 0.5)
    model.save_pretrained(tmp_path / "memory")
    store = _streamed(source, tmp_path / "streamed", "wanda", windows, sparsity_ratio=0.5)
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert memory.keys() == streamed.keys()
    for name, tensor in memory.items():
        assert torch.equal(tensor, streamed[name]), name
    # every block went back to the meta device once written
    assert all(p.is_meta for block in store.blocks for p in block.parameters())


@pytest.mark.parametrize(
    ("method", "args"),
    [("sparsegpt", {"sparsity_ratio": 0.5}), ("wanda", {"sparsity_type": "2:4"})],
)
def test_streamed_solver_and_nm_equal_in_memory(tmp_path, method, args):
    source = _sharded(tmp_path, "llama")
    windows = make_windows(8, 16)
    model = make_model("llama")
    MethodPruner(model, method, progress=False).prune(windows, **args)
    _streamed(source, tmp_path / "streamed", method, windows, **args)
    streamed = _tensors(tmp_path / "streamed")
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(tensor, streamed[name]), name


def test_streamed_folder_loads_as_a_model_with_the_same_logits(tmp_path):
    source = _sharded(tmp_path, "llama")
    windows = make_windows(4, 16)
    _streamed(source, tmp_path / "streamed", "wanda", windows, sparsity_ratio=0.5)
    model = make_model("llama")
    MethodPruner(model, "wanda", progress=False).prune(windows, 0.5)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    with torch.no_grad():
        assert torch.equal(loaded(windows).logits, model(windows).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_streamed_perplexity_equals_in_memory(tmp_path, arch):
    source = _sharded(tmp_path, arch)
    windows = make_windows(5, 16, seed=3)
    skeleton = build_skeleton(source, torch.float32)
    streamed = streamed_perplexity(skeleton, source, windows, torch.float32, CPU, 2, False)
    assert streamed == perplexity(make_model(arch), windows, CPU, 2, False)
    assert all(p.is_meta for p in skeleton.parameters())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_streamed_evaluation_reads_the_head_a_slice_at_a_time(tmp_path, arch, monkeypatch):
    """The head is read from its shard in vocabulary slices (tied or not), never whole, and
    the perplexity still matches the in-memory one (summation order aside)."""
    source = _sharded(tmp_path, arch)
    windows = make_windows(3, 16, seed=4)
    # 15 targets' logits (4 bytes) and a 64-wide fp32 row: 9 vocabulary entries per slice;
    # the probe of the model's own last-token logits is sized for 16 tokens: 8 entries
    monkeypatch.setattr(streaming, "STREAMED_HEAD_BYTES", 9 * (4 * 15 + 64 * 4))
    reads: list[int] = []
    head_rows = DiskBlocks.head_rows

    def recording(self, device):
        rows = head_rows(self, device)
        read = rows.read
        return dataclasses.replace(rows, read=lambda a, b: reads.append(b - a) or read(a, b))

    monkeypatch.setattr(DiskBlocks, "head_rows", recording)
    skeleton = build_skeleton(source, torch.float32)
    streamed = streamed_perplexity(skeleton, source, windows, torch.float32, CPU, 1, False)
    vocab = skeleton.config.vocab_size
    assert max(reads) == 9 and sum(reads) == 3 * (8 + vocab)  # a probe and a pass per window
    in_memory = perplexity(make_model(arch), windows, CPU, 1, False)
    assert streamed == pytest.approx(in_memory, rel=1e-6)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_streamed_embedding_holds_the_rows_of_the_windows_tokens(tmp_path, stored):
    """Capture and evaluation read only their tokens' embedding rows (as the run's dtype);
    the tied head keeps the whole weight, so a whole-logits fallback stays right."""
    model = make_model("gemma3").to(stored)
    model.save_pretrained(tmp_path / "source", max_shard_size="100KB")
    windows = make_windows(2, 8, seed=5)
    store = DiskBlocks(
        build_skeleton(tmp_path / "source", torch.float32), tmp_path / "source", torch.float32
    )
    store.load_outer(windows)
    tokens = windows.unique()
    expected = model.get_input_embeddings().weight.float()
    assert torch.equal(store.model.get_input_embeddings().weight[tokens], expected[tokens])
    assert torch.equal(store.model.get_output_embeddings().weight, expected)
    store.free_outer()


def test_checkpoint_bytes_counts_the_weights_in_the_run_dtype(tmp_path):
    source = _sharded(tmp_path, "llama")
    model = make_model("llama")
    assert checkpoint_bytes(source, torch.float32) == model_size_bytes(model)
    assert checkpoint_bytes(source, torch.bfloat16) == model_size_bytes(model) // 2


def test_a_checkpoint_without_a_block_tensor_fails_clearly(tmp_path):
    source = tmp_path / "source"
    make_model("llama").save_pretrained(source)
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    skeleton = build_skeleton(source, torch.float32)
    store = DiskBlocks(skeleton, source, torch.float32)
    with pytest.raises(SecateursError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        store.load(1, store.blocks[1])


def test_a_folder_without_safetensors_fails_clearly(tmp_path):
    with pytest.raises(SecateursError, match="safetensors"):
        checkpoint_files(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5g", 3 * 2**29), ("1000", 1000)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "0GB", "-1G", "8 XB"])
def test_parse_memory_refuses_what_is_not_an_amount(text):
    with pytest.raises(SecateursError, match="--max_memory"):
        parse_memory(text)


def test_a_bf16_checkpoint_streams_as_fp32_like_loading_it_as_fp32(tmp_path):
    source = tmp_path / "source"
    make_model("llama").to(torch.bfloat16).save_pretrained(source, max_shard_size="60KB")
    windows = make_windows(6, 16)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    MethodPruner(model, "wanda", progress=False).prune(windows, 0.5)
    model.save_pretrained(tmp_path / "memory")
    _streamed(source, tmp_path / "streamed", "wanda", windows, sparsity_ratio=0.5)
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert memory.keys() == streamed.keys()
    assert all(streamed[k].dtype == torch.float32 for k in streamed)
    assert all(torch.equal(memory[k], streamed[k]) for k in memory)


def test_one_block_holds_weights_at_a_time(tmp_path):
    source = _sharded(tmp_path, "llama")
    skeleton = build_skeleton(source, torch.float32)
    (tmp_path / "out").mkdir()
    store = DiskBlocks(skeleton, source, torch.float32, tmp_path / "out")
    resident: list[int] = []
    load = store.load

    def counting_load(index, block):
        load(index, block)
        resident.append(sum(not b.weight.is_meta for b in _layers(store)))

    store.load = counting_load
    with contextlib.closing(store):
        MethodPruner(skeleton, "wanda", progress=False, store=store).prune(make_windows(4, 16), 0.5)
    assert resident == [1] * len(store.blocks)
    assert all(p.is_meta for p in skeleton.parameters())


def _layers(store: DiskBlocks) -> list[torch.nn.Module]:
    """The first linear layer of every block."""
    return [next(m for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in store.blocks]


def test_write_shard_reads_back_as_safetensors_with_every_tensor_aligned(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5).to(torch.bfloat16),
        "a.weight": torch.randn(4, 7),
        "c.scalar": torch.tensor(2.5),
        "d.empty": torch.zeros(0, 3),
        "e.index": torch.arange(5),
        "f.flags": torch.tensor([True, False, True]),
    }
    write_shard(tmp_path / "x.safetensors", tensors)
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    start, header = streaming.shard_header(tmp_path / "x.safetensors")
    for name, entry in header.items():
        assert (start + entry["data_offsets"][0]) % tensors[name].element_size() == 0, name


def test_a_failed_shard_write_fails_the_run(tmp_path, monkeypatch):
    """The background writer's error reaches the engine's caller, not a silent thread."""
    source = _sharded(tmp_path, "llama")
    real = streaming.write_shard

    def failing(path, tensors):
        if path.name.startswith("model-00003"):
            raise OSError(28, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(streaming, "write_shard", failing)
    with pytest.raises(OSError, match="No space left"):
        _streamed(source, tmp_path / "out", "wanda", make_windows(4, 16), sparsity_ratio=0.5)
