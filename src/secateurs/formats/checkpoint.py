"""Compressed checkpoints: sparse weights as a bitmask plus their values, every value byte-coded.

A saved Hugging Face folder is rewritten in place, shard by shard. Each 2-D floating-point
weight is stored in the smallest of three forms:

- sparse (more than 1 in ``8 * bytes per value`` entries zero): ``<name>_bitmask``, one bit
  per entry (rows padded to a whole byte, least significant bit first), and ``<name>_values``,
  the nonzeros in row-major order;
- coded: ``<name>_values`` holds every entry;
- as it was, where neither form is smaller.

The values are stored as byte planes (plane k holds byte k, little-endian, of every value):
the planes that carry the sign and exponent repeat a few patterns, and each plane, like the
bitmask, is deflated (zlib, run-length strategy) where that saves at least 5%. This is
lossless; it takes fp16 weights to about 0.8x and bf16 ones to about 0.6x of their bytes on
trained models. ``<name>_layout`` (int64, one row per stream: stored bytes, deflated or not;
the bitmask first) and ``<name>_shape`` (int64) describe the pieces, and an empty ``<name>`` of
the weight's dtype stays in its place: a transformers that does not know the format then stops
with a size-mismatch error instead of initialising the weight at random. Everything else is
stored as it was. The config gains a ``quantization_config`` with ``quant_method``
``secateurs-sparse``. Version 1 folders (raw bitmask and values in the weight's dtype, no
layout) still load.

compressed-tensors had sparse formats (``sparse-bitmask``, ``sparse-24-bitmask``), but its
releases from 0.15 on, which transformers 5 requires, no longer carry them, and vLLM removed
its sparse-only 2:4 support; so this format is secateurs' own. Importing :mod:`secateurs`
registers a transformers quantizer for it: ``AutoModelForCausalLM.from_pretrained`` then
rebuilds the dense weights bit for bit (a -0.0 is stored as a value) and hands back an ordinary
model with no quantization attached.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs.errors import SecateursError
from secateurs.io import atomic_dir, check_json, ensure_free

QUANT_METHOD = "secateurs-sparse"
FORMAT = "bitmask"
VERSION = 2
SUFFIXES = ("_bitmask", "_values", "_shape", "_layout")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAVE_FORMATS = ("dense", "compressed")
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)
# a stream is kept deflated only where that saves this share of its bytes: below it, the
# inflate at load time costs more than the few bytes are worth
_MIN_SAVING = 0.05


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean matrix as one bit per entry, each row padded to a whole byte."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-cols) % 8))
    grouped = padded.reshape(rows, -1, 8) * _BIT_WEIGHTS
    return grouped.sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The boolean matrix that :func:`pack_bits` packed."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS).ne(0)
    return bits.reshape(packed.shape[0], -1)[:, :cols]


def byte_planes(values: torch.Tensor) -> list[torch.Tensor]:
    """Byte k of every value (little-endian) as plane k."""
    size = values.element_size()
    as_bytes = values.contiguous().reshape(-1).view(torch.uint8).reshape(-1, size)
    return [as_bytes[:, k].contiguous() for k in range(size)]


def from_planes(planes: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The values whose :func:`byte_planes` these are."""
    return torch.stack(planes, dim=1).view(dtype).reshape(-1)


@functools.cache
def _streams_pool() -> ThreadPoolExecutor:
    """Threads for (de)flating a matrix's streams side by side: zlib lets go of the GIL."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1)


def deflate(stream: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A uint8 stream deflated where that saves at least 5% of it, else as it was."""
    raw = stream.numpy().tobytes()
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    packed = packer.compress(raw) + packer.flush()
    if len(packed) > (1 - _MIN_SAVING) * len(raw):
        return stream, False
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8), True


def inflate(stored: torch.Tensor, deflated: bool, size: int) -> torch.Tensor:
    """The ``size`` bytes that :func:`deflate` stored."""
    if deflated:
        try:
            raw = zlib.decompress(stored.numpy().tobytes(), -15)
        except zlib.error as exc:
            raise _damaged(f"a stream does not inflate ({exc})") from exc
        stored = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if stored.numel() != size:
        raise _damaged(f"a stream holds {stored.numel()} bytes where {size} were expected")
    return stored


def _damaged(what: str) -> SecateursError:
    return SecateursError(f"compressed tensor: {what}; the checkpoint is damaged: save it again")


def codable(name: str, tensor: torch.Tensor) -> bool:
    """Whether a tensor is a weight matrix that the compressed forms may store."""
    return name.endswith("weight") and tensor.dim() == 2 and tensor.is_floating_point()


def nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Where an entry has any bit set: a -0.0 is kept as a value, so decoding is exact."""
    as_ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.view(as_ints[tensor.element_size()]).ne(0)


def bitmask_pays(tensor: torch.Tensor, nonzero: int) -> bool:
    """Whether a bitmask and the nonzeros take fewer bytes than every value."""
    rows, cols = tensor.shape
    size = tensor.element_size()
    return rows * math.ceil(cols / 8) + nonzero * size < tensor.numel() * size


def encode(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors that store a weight matrix in its smallest form, named after ``name``."""
    tensor = tensor.contiguous()
    mask = nonzero_bits(tensor)
    sparse = bitmask_pays(tensor, int(mask.sum()))
    streams = [pack_bits(mask).reshape(-1)] if sparse else []
    streams += byte_planes(tensor[mask] if sparse else tensor)
    coded = list(_streams_pool().map(deflate, streams))
    if not sparse and not any(deflated for _, deflated in coded):
        return {name: tensor}
    pieces = [piece for piece, _ in coded]
    parts = {name: torch.empty(0, dtype=tensor.dtype)}
    if sparse:
        parts[f"{name}_bitmask"] = pieces[0]
    parts[f"{name}_values"] = torch.cat(pieces[int(sparse) :])
    parts[f"{name}_shape"] = torch.tensor(list(tensor.shape), dtype=torch.int64)
    layout = [[piece.numel(), int(deflated)] for piece, deflated in coded]
    parts[f"{name}_layout"] = torch.tensor(layout, dtype=torch.int64)
    return parts


def decode(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense matrix that :func:`encode` stored; ``parts`` keyed by suffix (``""``: the
    placeholder, whose dtype the values take)."""
    rows, cols = (int(v) for v in parts["_shape"].tolist())
    if "_layout" not in parts:
        return _decode_version_1(parts["_bitmask"], parts["_values"], rows, cols)
    if "" not in parts:
        raise _damaged("its placeholder, which carries the dtype, is missing")
    dtype = parts[""].dtype
    layout = [(int(size), bool(flag)) for size, flag in parts["_layout"].tolist()]
    sparse = "_bitmask" in parts
    if len(layout) != int(sparse) + parts[""].element_size():
        raise _damaged(f"its layout lists {len(layout)} streams")
    mask = None
    if sparse:
        packed = inflate(parts["_bitmask"], layout[0][1], rows * math.ceil(cols / 8))
        mask = unpack_bits(packed.reshape(rows, -1), cols)
    count = int(mask.sum()) if mask is not None else rows * cols
    stored = parts["_values"]
    if sum(size for size, _ in layout[int(sparse) :]) != stored.numel():
        raise _damaged(f"its values hold {stored.numel()} bytes, not what its layout lists")
    sizes, flags = zip(*layout[int(sparse) :], strict=True)
    chunks = stored.split(list(sizes))
    planes = _streams_pool().map(inflate, chunks, flags, [count] * len(chunks))
    values = from_planes(list(planes), dtype)
    return values.reshape(rows, cols) if mask is None else _scatter(mask, values)


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A zero matrix of ``mask``'s shape with ``values`` where the mask is set, row-major."""
    dense = torch.zeros(mask.shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def _decode_version_1(
    bitmask: torch.Tensor, values: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """A matrix of a version 1 folder: a raw 2-D bitmask and the nonzeros in their dtype."""
    if bitmask.shape[0] != rows or bitmask.shape[1] != math.ceil(cols / 8):
        raise _damaged(
            f"its bitmask has shape {tuple(bitmask.shape)}, which does not match its stored "
            f"shape ({rows}, {cols})"
        )
    mask = unpack_bits(bitmask, cols)
    if int(mask.sum()) != values.numel():
        raise _damaged(f"its bitmask marks {int(mask.sum())} entries but holds {values.numel()}")
    return _scatter(mask, values)


@dataclass
class Conversion:
    """What rewriting a folder did: tensor counts and bytes before and after."""

    save_format: str
    compressed: int = 0
    dense: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "save_format": self.save_format,
            "tensors_compressed": self.compressed,
            "tensors_dense": self.dense,
            "tensor_bytes_before": self.bytes_before,
            "tensor_bytes_after": self.bytes_after,
            "ratio": self.bytes_after / max(self.bytes_before, 1),
        }


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def checkpoint_files(
    folder: Path, fix: str = "give a folder written by save_pretrained or secateurs"
) -> dict[str, Path]:
    """Every tensor name of a safetensors checkpoint folder and the shard that holds it."""
    index = folder / INDEX_FILE
    if index.is_file():
        check_json(index)
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(single, "pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    raise SecateursError(
        f"'{folder}' holds no safetensors checkpoint ({INDEX_FILE} or {SINGLE_FILE}); {fix}"
    )


def _shards(folder: Path) -> list[str]:
    return sorted({path.name for path in checkpoint_files(folder).values()})


def _quant_method(config: Path) -> str | None:
    """The ``quant_method`` a model's config.json names, if any."""
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method")


def is_compressed(folder: str | Path) -> bool:
    """Whether a model folder holds a secateurs compressed checkpoint."""
    config = Path(folder) / "config.json"
    return config.is_file() and _quant_method(config) == QUANT_METHOD


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The ``model.safetensors.index.json`` of a sharded folder."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _coded_bases(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """The names of the coded weights among a shard's tensors."""
    candidates = {name.removesuffix("_values") for name in tensors if name.endswith("_values")}
    return {base for base in candidates if base in tensors and f"{base}_shape" in tensors}


def decode_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard's tensors with every coded weight rebuilt dense, in the stored order."""
    bases = _coded_bases(tensors)
    pieces = {base + suffix for base in bases for suffix in SUFFIXES}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in bases:
            suffixes = [s for s in ("", *SUFFIXES) if name + s in tensors]
            out[name] = decode({s: tensors[name + s] for s in suffixes})
        elif name not in pieces:
            out[name] = tensor
    return out


def check_convertible(folder: Path) -> None:
    """Refuse a folder quantized by another method: its tensors are not plain weights."""
    config = folder / "config.json"
    if not config.is_file():
        raise SecateursError(f"'{folder}' has no config.json; give a Hugging Face model folder")
    method = _quant_method(config)
    if method not in (None, QUANT_METHOD):
        raise SecateursError(
            f"'{folder}' is quantized with {method}; secateurs converts dense or "
            f"{QUANT_METHOD} checkpoints only: load it with its own library and save it dense"
        )


def _rewrite(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, summary: Conversion
) -> dict[str, torch.Tensor]:
    summary.bytes_before += _nbytes(tensors)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in decode_all(tensors).items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        parts = {name: tensor}
        if summary.save_format == "compressed" and codable(name, tensor):
            parts = encode(name, tensor)
        summary.compressed += len(parts) > 1
        summary.dense += len(parts) == 1
        out.update(parts)
    summary.bytes_after += _nbytes(out)
    return out


def rewrite_folder(
    folder: str | Path, save_format: str = "compressed", dtype: torch.dtype | None = None
) -> Conversion:
    """Rewrite a saved model folder's shards in ``save_format`` (optionally cast first).

    Works in place, one shard in memory at a time: call it on a folder that is still being
    written (a temporary folder of :func:`secateurs.io.atomic_dir`), never on the only copy.
    """
    check_save_format(save_format)
    folder = Path(folder)
    check_convertible(folder)
    summary = Conversion(save_format)
    weight_map: dict[str, str] = {}
    for shard in _shards(folder):
        path = folder / shard
        with safe_open(path, framework="pt") as reader:
            metadata = reader.metadata() or {}
            names = reader.keys()
            tensors = {name: reader.get_tensor(name) for name in names}
        tensors = _rewrite(tensors, dtype, summary)
        save_file(tensors, path, metadata=metadata | {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    if (folder / INDEX_FILE).exists():
        write_index(folder, weight_map, summary.bytes_after)
    _mark_config(folder / "config.json", save_format, dtype)
    return summary


def convert_folder(
    source: str | Path,
    target: str | Path,
    save_format: str = "compressed",
    dtype: torch.dtype | None = None,
) -> Conversion:
    """Copy a model folder to ``target`` (which must not exist) in ``save_format``, atomically."""
    check_save_format(save_format)
    source = Path(source)
    check_convertible(source)
    _shards(source)
    ensure_free(target, "--save_model")
    with atomic_dir(Path(target)) as tmp:
        for item in source.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        return rewrite_folder(tmp, save_format, dtype)


def _mark_config(path: Path, save_format: str, dtype: torch.dtype | None) -> None:
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)  # ours: other methods are refused up front
    if save_format == "compressed":
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format": FORMAT,
            "version": VERSION,
        }
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_save_format(name: str) -> None:
    if name not in SAVE_FORMATS:
        raise SecateursError(
            f"--save_format must be one of {', '.join(SAVE_FORMATS)}, got '{name}'"
        )


def _register_with_transformers() -> None:
    """Teach ``from_pretrained`` to read the compressed form back into dense weights."""
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING or QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        return

    class SparseCheckpointConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a secateurs compressed checkpoint."""

        def __init__(self, format: str = FORMAT, version: int = VERSION, **_: Any) -> None:
            if format != FORMAT or version > VERSION:
                raise SecateursError(
                    f"this checkpoint is secateurs-sparse format '{format}' version {version}; "
                    f"this secateurs reads '{FORMAT}' up to version {VERSION}: upgrade secateurs"
                )
            self.quant_method = QUANT_METHOD
            self.format = format
            self.version = version
            # transformers then drops the quantization from the loaded model: it is dense
            self.dequantize = True

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "format": self.format, "version": self.version}

    class BitmaskDecode(ConversionOps):
        """Rebuild one dense weight from its stored pieces (or pass a plain one through)."""

        def __init__(self, quantizer: HfQuantizer) -> None:
            self.quantizer = quantizer

        def convert(
            self,
            input_dict: dict[str, Any],
            source_patterns: list[str],
            target_patterns: list[str],
            full_layer_name: str | None = None,
            **kwargs: Any,
        ) -> dict[str, torch.Tensor]:
            parts = {
                key.removeprefix("weight"): value[0] if isinstance(value, list) else value
                for key, value in input_dict.items()
            }
            if "_values" not in parts:
                return {full_layer_name: parts[""]}
            return {full_layer_name: decode(parts)}

        @property
        def reverse_op(self) -> ConversionOps:
            return PassThrough()

    class PassThrough(ConversionOps):
        """Saving a loaded model again: its weights are dense, written as they are."""

        def convert(self, input_dict: dict[str, Any], *args: Any, **kwargs: Any) -> dict:
            return input_dict

    class SparseCheckpointQuantizer(HfQuantizer):
        """Loads secateurs compressed checkpoints as ordinary dense models."""

        requires_calibration = False
        serialized_names: ClassVar[dict[str, list[str]]] = {
            "weight": ["weight", *(f"weight{suffix}" for suffix in SUFFIXES)]
        }

        def get_load_operations(self) -> dict:
            return {"dequantize": BitmaskDecode}

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    register_quantization_config(QUANT_METHOD)(SparseCheckpointConfig)
    register_quantizer(QUANT_METHOD)(SparseCheckpointQuantizer)


_register_with_transformers()
