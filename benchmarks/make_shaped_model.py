"""Write a LlamaForCausalLM-shaped checkpoint of seeded random weights, tensor by tensor.

The model never exists in memory: the shard layout is planned from the shapes first, each
shard's safetensors header is written, then each tensor is generated in chunks of at most
``CHUNK_BYTES`` and appended, so the process holds one chunk at a time however large the
shape. Weights are normal(0, 0.02) (``initializer_range``), RMSNorm weights 1. Each tensor's
values come from its own generator, seeded by ``--seed`` and the tensor's name, so a tensor
depends on neither the shard size nor the tensors before it (only on ``CHUNK_BYTES``).

The tokenizer is the built-in SmolLM2's (49,152 tokens), saved into the folder so that
``secateurs prune --model DIR`` works unchanged. Its token ids must index the embedding, so
the model's vocabulary is max(the shape's, the tokenizer's): Llama-2-7B's 32,000 becomes
49,152 (140 M parameters more, 2% of the model); the Llama-3 shapes (128,256) keep theirs.
Both numbers are recorded in ``shaped_model.json`` next to the weights.

    python benchmarks/make_shaped_model.py --config llama-2-7b --dtype float32 --out DIR

Shapes: ``llama-2-7b``, ``llama-3-8b``, ``1b`` (Llama-3.2-1B: tied embeddings) and ``tiny``
(for tests). Prints the parameters, bytes and seconds, and the disk write bandwidth measured
(bytes over the time spent in write and fsync; generation is timed apart). Each shard is
fsynced and then dropped from the page cache (``posix_fadvise DONTNEED``), so a run reading
the folder next starts cold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "shaped_model.json"
CHUNK_BYTES = 64 * 2**20
DEFAULT_SHARD_BYTES = 2 * 2**30
DEFAULT_TOKENIZER = "smollm2-135m"

SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    # Llama-3.2-1B's shape; its llama3 rope scaling (to 131,072 positions) is left out: it
    # changes no tensor, and the benchmarks use short windows
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORED = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class Planned:
    """One tensor of the checkpoint: its name, shape and how it is initialised."""

    name: str
    shape: tuple[int, ...]
    fill: str  # "normal" or "ones"

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def shape_config(
    name: str, tokenizer_vocab: int, dtype: torch.dtype, tokenizer=None, layers: int | None = None
):
    """The transformers ``LlamaConfig`` of shape ``name``, its vocabulary raised to the
    tokenizer's where smaller, its special token ids the tokenizer's; ``layers`` blocks
    instead of the shape's where given."""
    from transformers import LlamaConfig

    settings = dict(SHAPES[name])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be at least 1, got {layers}")
        settings["num_hidden_layers"] = layers
    settings["vocab_size"] = max(settings["vocab_size"], tokenizer_vocab)
    rope_theta = settings.pop("rope_theta")
    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    config = LlamaConfig(
        **settings,
        **special,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        initializer_range=0.02,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    )
    return config


def plan_tensors(config) -> list[Planned]:
    """Every stored tensor of LlamaForCausalLM for ``config``, in save_pretrained's order,
    read off a skeleton on the meta device (so names and shapes are the class's own)."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    planned = []
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        fill = "ones" if tensor.dim() == 1 else "normal"
        planned.append(Planned(name, tuple(tensor.shape), fill))
    return planned


def plan_shards(tensors: list[Planned], itemsize: int, shard_bytes: int) -> list[list[Planned]]:
    """Tensors in order, cut into shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def tensor_chunks(
    tensor: Planned, dtype: torch.dtype, seed: int, std: float
) -> Iterator[torch.Tensor]:
    """The tensor's values, row blocks of at most ``CHUNK_BYTES`` (as float32) at a time."""
    if tensor.fill == "ones":
        yield torch.ones(tensor.shape, dtype=dtype)
        return
    generator = torch.Generator().manual_seed(tensor_seed(seed, tensor.name))
    row = tensor.numel // tensor.shape[0]
    rows = max(1, CHUNK_BYTES // (4 * row))
    for start in range(0, tensor.shape[0], rows):
        count = min(rows, tensor.shape[0] - start)
        chunk = torch.empty((count, *tensor.shape[1:]), dtype=torch.float32)
        chunk.normal_(0.0, std, generator=generator)
        yield chunk.to(dtype)


def _header(shard: list[Planned], dtype: torch.dtype) -> bytes:
    entries, offset = {}, 0
    for tensor in shard:
        size = tensor.numel * dtype.itemsize
        entries[tensor.name] = {
            "dtype": _STORED[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}} | entries).encode()
    header += b" " * (-len(header) % 8)  # data start aligned for every dtype
    return len(header).to_bytes(8, "little") + header


def _drop_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_checkpoint(
    out: Path,
    config,
    dtype: torch.dtype,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
) -> dict[str, Any]:
    """Write the shards and index of a random model for ``config``; what was written."""
    tensors = plan_tensors(config)
    shards = plan_shards(tensors, dtype.itemsize, shard_bytes)
    weight_map: dict[str, str] = {}
    generate_s = write_s = 0.0
    written = 0
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with open(out / name, "wb") as file:
            file.write(_header(shard, dtype))
            for tensor in shard:
                weight_map[tensor.name] = name
                chunks = tensor_chunks(tensor, dtype, seed, config.initializer_range)
                while True:
                    start = time.perf_counter()
                    chunk = next(chunks, None)
                    generate_s += time.perf_counter() - start
                    if chunk is None:
                        break
                    start = time.perf_counter()
                    file.write(chunk.contiguous().view(torch.uint8).numpy())
                    write_s += time.perf_counter() - start
                    written += chunk.numel() * dtype.itemsize
            start = time.perf_counter()
            file.flush()
            os.fsync(file.fileno())
            write_s += time.perf_counter() - start
            _drop_cache(file.fileno())
        if progress is not None:
            progress(f"shard {number}/{len(shards)}: {name}, {len(shard)} tensors")
    total_size = sum(t.numel for t in tensors) * dtype.itemsize
    assert written == total_size, (written, total_size)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {
        "tensors": len(tensors),
        "shards": len(shards),
        "total_size": total_size,
        "generate_s": generate_s,
        "write_s": write_s,
    }


def parameter_count(config) -> int:
    return sum(t.numel for t in plan_tensors(config))


def build(
    shape: str,
    out: Path,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    tokenizer: str = DEFAULT_TOKENIZER,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
    layers: int | None = None,
) -> dict[str, Any]:
    """Write shape ``shape`` with seeded random weights and ``tokenizer`` into ``out`` (which
    must not exist; written into ``out.partial`` and renamed at the end); its manifest."""
    from secateurs.core.model import load_tokenizer

    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new folder")
    started = time.perf_counter()
    loaded = load_tokenizer(tokenizer)
    config = shape_config(shape, len(loaded), dtype, loaded, layers)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        written = write_checkpoint(partial, config, dtype, seed, shard_bytes, progress)
        config.save_pretrained(partial)
        loaded.save_pretrained(partial)
        seconds = time.perf_counter() - started
        manifest = {
            "shape": shape,
            "layers": config.num_hidden_layers,
            "dtype": str(dtype).removeprefix("torch."),
            "seed": seed,
            "tokenizer": tokenizer,
            "vocab_size_of_shape": SHAPES[shape]["vocab_size"],
            "vocab_size_of_tokenizer": len(loaded),
            "vocab_size": config.vocab_size,
            "parameters": written["total_size"] // dtype.itemsize,
            "bytes": written["total_size"],
            "shards": written["shards"],
            "tensors": written["tensors"],
            "init": f"normal(0, {config.initializer_range}); RMSNorm weights 1",
            "seconds": seconds,
            "generate_s": written["generate_s"],
            "write_s": written["write_s"],
            "write_bandwidth": written["total_size"] / written["write_s"],
        }
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="a built-in model name, hub id or folder whose tokenizer is saved with the model",
    )
    parser.add_argument("--shard_gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder blocks instead of the shape's (same widths): profile one block of a big "
        "shape in memory, without writing the whole model",
    )
    args = parser.parse_args(argv)
    shard_bytes = int(args.shard_gb * 2**30)
    manifest = build(
        args.config,
        args.out,
        args.dtype,
        args.seed,
        args.tokenizer,
        shard_bytes,
        progress=lambda line: print(line, flush=True),
        layers=args.layers,
    )
    gib = 2**30
    vocab = manifest["vocab_size"]
    if vocab != manifest["vocab_size_of_shape"]:
        vocab = (
            f"{vocab} (the shape's {manifest['vocab_size_of_shape']}, raised to the tokenizer's)"
        )
    print(
        f"wrote {args.out}: {args.config}, {manifest['parameters'] / 1e9:.3f} B parameters, "
        f"{manifest['bytes'] / gib:.2f} GiB ({manifest['dtype']}) in {manifest['shards']} "
        f"shards, vocabulary {vocab}\n"
        f"{manifest['seconds']:.1f} s in all: {manifest['generate_s']:.1f} s generating, "
        f"{manifest['write_s']:.1f} s writing; disk write bandwidth (write + fsync) "
        f"{manifest['write_bandwidth'] / 2**20:.0f} MiB/s"
    )


if __name__ == "__main__":
    sys.exit(main())
