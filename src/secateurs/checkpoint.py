"""Compressed sparse checkpoints: each sparse weight as a bitmask of its nonzeros plus their values.

A saved Hugging Face folder is rewritten in place, shard by shard: every 2-D floating-point
tensor that the bitmask form makes smaller (more than 1 in ``8 * bytes per value`` entries
zero) becomes ``<name>_bitmask`` (uint8, one bit per entry, rows padded to a whole byte,
least significant bit first), ``<name>_values`` (the nonzeros in row-major order, in the
tensor's dtype) and ``<name>_shape`` (int64), with an empty ``<name>`` left in its place: a
transformers that does not know the format then stops with a size-mismatch error instead of
initialising the weight at random. Everything else is stored as it was. The config gains a
``quantization_config`` with ``quant_method`` ``secateurs-sparse``.

compressed-tensors had such formats (``sparse-bitmask``, ``sparse-24-bitmask``), but its
releases from 0.15 on, which transformers 5 requires, no longer carry them, and vLLM removed
its sparse-only 2:4 support; so this format is secateurs' own. Importing :mod:`secateurs`
registers a transformers quantizer for it: ``AutoModelForCausalLM.from_pretrained`` then
rebuilds the dense weights bit for bit (zeros read back as +0.0) and hands back an ordinary
model with no quantization attached.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs.errors import SecateursError
from secateurs.io import atomic_dir, ensure_free

QUANT_METHOD = "secateurs-sparse"
FORMAT = "bitmask"
VERSION = 1
SUFFIXES = ("_bitmask", "_values", "_shape")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAVE_FORMATS = ("dense", "compressed")
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)


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


def worth_compressing(name: str, tensor: torch.Tensor) -> bool:
    """Whether a weight matrix's bitmask form is smaller than the matrix."""
    if not name.endswith("weight") or tensor.dim() != 2 or not tensor.is_floating_point():
        return False
    rows, cols = tensor.shape
    nonzero = int(torch.count_nonzero(tensor))
    packed = rows * math.ceil(cols / 8) + nonzero * tensor.element_size() + 16
    return packed < tensor.numel() * tensor.element_size()


def encode(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three tensors that store ``tensor`` compressed, named after ``name``."""
    tensor = tensor.contiguous()
    mask = tensor.ne(0)
    return {
        name: torch.empty(0, dtype=tensor.dtype),
        f"{name}_bitmask": pack_bits(mask),
        f"{name}_values": tensor[mask],
        f"{name}_shape": torch.tensor(list(tensor.shape), dtype=torch.int64),
    }


def decode(bitmask: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The dense tensor that :func:`encode` stored."""
    rows, cols = (int(v) for v in shape.tolist())
    if bitmask.shape[0] != rows or bitmask.shape[1] != math.ceil(cols / 8):
        raise SecateursError(
            f"a compressed tensor's bitmask has shape {tuple(bitmask.shape)}, which does not "
            f"match its stored shape ({rows}, {cols}); the checkpoint is damaged: save it again"
        )
    mask = unpack_bits(bitmask, cols)
    if int(mask.sum()) != values.numel():
        raise SecateursError(
            f"a compressed tensor's bitmask marks {int(mask.sum())} entries but holds "
            f"{values.numel()} values; the checkpoint is damaged: save it again"
        )
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values
    return dense


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


def decode_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard's tensors with every compressed weight rebuilt dense, in the stored order."""
    bases = {n.removesuffix("_bitmask") for n in tensors if n.endswith("_bitmask")}
    parts = {base + suffix for base in bases for suffix in ("", *SUFFIXES)}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith("_bitmask") and name.removesuffix("_bitmask") in bases:
            base = name.removesuffix("_bitmask")
            out[base] = decode(tensor, tensors[f"{base}_values"], tensors[f"{base}_shape"])
        elif name not in parts:
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
        if summary.save_format == "compressed" and worth_compressing(name, tensor):
            out.update(encode(name, tensor))
            summary.compressed += 1
        else:
            out[name] = tensor
            summary.dense += 1
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
        """Rebuild one dense weight from its bitmask and values (or pass a dense one through)."""

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
            parts = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
            if "weight_bitmask" not in parts:
                return {full_layer_name: parts["weight"]}
            dense = decode(parts["weight_bitmask"], parts["weight_values"], parts["weight_shape"])
            return {full_layer_name: dense}

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
