"""Pruning a model that is never whole in memory: its blocks stream from disk and back.

The model is built as a skeleton whose parameters live on the meta device (no memory). The
modules before the first block (embeddings) are read from the checkpoint's safetensors
shards only to capture the calibration inputs; each decoder block is read when the engine
reaches it, pruned by the same block step as in memory, written to its own shard of the
output folder and freed. Evaluation runs the same way, block by block over the evaluation
windows, whose hidden states are all held. Every read opens the shard, copies the block's
tensors out and closes it, so no mapping of the file outlives the block.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from secateurs.core.engine import run_block
from secateurs.core.model import (
    all_finite,
    block_kinds,
    capture_block_inputs,
    check_finite_weights,
    describe_counts,
    find_blocks,
    find_linears,
    non_finite_weights,
    resolve_model_path,
    ties_embeddings,
    weight_matrix,
)
from secateurs.core.patterns import SparsityPattern
from secateurs.core.profiling import give_back_memory
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import (
    HeadRows,
    PerplexityAccumulator,
    SparsityCheck,
    block_mlp_roles,
    layer_violation,
    window_nll,
)
from secateurs.formats.checkpoint import checkpoint_files, write_index

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_STREAM_FIX = (
    "--offload disk reads safetensors: re-save the model with save_pretrained or use --offload none"
)
_STORED_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_COPY_CHUNK = 16 * 2**20
# A tensor read as a view of a shard's mapping is checked for NaN and Inf when read only up to
# this size (norms, position embeddings): the check would make a larger one (an embedding, an
# untied head) resident. Those are checked as their rows are read, and whole as they are
# copied to the output.
_CHECK_MAPPED_BYTES = 16 * 2**20
# Logits plus head rows of one vocabulary slice when a streamed model is evaluated: the head
# is read from its shard a slice at a time (for a small model it is a fifth of the weights).
STREAMED_HEAD_BYTES = 16 * 2**20


def parse_memory(text: str) -> int:
    """Bytes from ``8GB``, ``512MiB``, ``1.5G`` or a plain number of bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtb]?)(i?b)?\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise SecateursError(
            f"--max_memory '{text}' is not an amount of memory; write it as 8GB, 512MiB or a "
            "number of bytes"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def model_folder(name: str, cache_dir: str | None = None) -> Path:
    """The local folder of a model's config and safetensors shards (downloaded if a hub id)."""
    path = Path(resolve_model_path(name))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(name, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as exc:
        raise SecateursError(
            f"could not find the files of model '{name}' ({type(exc).__name__}); give a local "
            "model folder, a built-in model, or a hub id that can be downloaded (or is in the "
            "local cache)"
        ) from exc


def shard_header(shard: Path) -> tuple[int, dict[str, dict]]:
    """Where a safetensors file's data starts, and each tensor's dtype, shape and offsets."""
    with open(shard, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def checkpoint_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's floating-point tensors take in ``dtype`` (others as stored)."""
    total = 0
    for shard in dict.fromkeys(checkpoint_files(folder, _STREAM_FIX).values()):
        for entry in shard_header(shard)[1].values():
            count = 1
            for dim in entry["shape"]:
                count *= dim
            stored = _DTYPE_BYTES.get(entry["dtype"], 4)
            is_float = entry["dtype"] in ("F64", "F32", "F16", "BF16")
            total += count * (dtype.itemsize if is_float else stored)
    return total


def build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    return model.eval()


def _named_outer(model: nn.Module, blocks: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    """The modules outside the decoder stack, by name: embeddings, final norm, head."""
    block_ids = {id(b) for b in blocks}
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if child is blocks:
                continue
            if any(id(m) in block_ids for m in child.modules()):
                visit(f"{full}.", child)
            else:
                found.append((full, child))

    visit("", model)
    return found


def _free(module: nn.Module) -> None:
    """Put every parameter and saved buffer of ``module`` back on the meta device."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = buffer.to("meta")


def _tie_head(model: nn.Module) -> None:
    """Share the input embedding with the head if the config ties them (as loading does)."""
    if not ties_embeddings(model):
        return
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embedding is not None:
        head.weight = embedding.weight


class DiskBlocks:
    """Reads blocks from a checkpoint folder and writes the pruned ones to ``out`` (a
    :class:`secateurs.core.engine.BlockStore`); each block becomes its own output shard.

    A block's shard is written by a background thread while the engine prunes the next block,
    so the disk's write time hides behind computation; at most one block waits to be written,
    which bounds the memory it costs to one block. Close the store (``with
    contextlib.closing(store)``) so no write outlives a failed run's output folder.
    """

    def __init__(
        self, model: nn.Module, source: Path, dtype: torch.dtype, out: Path | None = None
    ) -> None:
        self.model = model
        self.source = source
        self.files = checkpoint_files(source, _STREAM_FIX)
        self.dtype = dtype
        self.out = out
        self.stack_name, self.blocks = find_blocks(model)
        self.outer = _named_outer(model, self.blocks)
        self.shards = len(self.blocks) + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.zeros: dict[str, tuple[int, int]] = {}
        self.head_name: str | None = None  # the head weight's checkpoint name, once loaded
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _read(self, prefix: str, names: list[str], mapped: bool = False) -> dict[str, torch.Tensor]:
        """The tensors ``prefix + name`` in ``self.dtype``, each shard opened once and closed.

        A tensor stored in ``self.dtype`` is read into memory of its own: a tensor that
        safetensors hands out is a view of a private mapping of the file, and the first write
        to each of its pages (the masks zeroing weights) then copies the page, which took
        twice as long as reading the whole block.

        ``mapped`` tensors stored in ``self.dtype`` are views of a private mapping of the
        shard instead of copies: only the pages a computation touches (the embedding rows of
        the windows' tokens) become resident, and the mapping goes with the last view.
        """
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.files[prefix + name], []).append(name)
        tensors, large_views = {}, set()
        wanted = _DTYPE_NAMES.get(self.dtype)
        for shard, members in by_shard.items():
            start, header = shard_header(shard)
            views = (
                self._views(shard, start, header, [prefix + n for n in members]) if mapped else {}
            )
            with safe_open(shard, "pt") as handle, open(shard, "rb", buffering=0) as file:
                for name in members:
                    key = prefix + name
                    tensor = views.get(key)
                    if tensor is not None:
                        if tensor.numel() * tensor.element_size() > _CHECK_MAPPED_BYTES:
                            large_views.add(name)
                    elif header[key]["dtype"] == wanted:
                        tensor = _read_tensor(file, start, header[key], shard, key)
                    else:
                        tensor = handle.get_tensor(key)
                    if tensor.is_floating_point():
                        tensor = tensor.to(self.dtype)
                    tensors[name] = tensor
        self._check(prefix, {n: t for n, t in tensors.items() if n not in large_views})
        return tensors

    def _check(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse NaN or Inf in tensors just read, as loading a whole model does."""
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        named = ((prefix + name, tensor) for name, tensor in tensors.items())
        check_finite_weights(str(self.source), named, where)

    def _views(
        self, shard: Path, start: int, header: dict[str, dict], names: list[str]
    ) -> dict[str, torch.Tensor]:
        """Views of a shard's mapping (its data at ``start``, its parsed ``header``) for the
        ``names`` stored in ``self.dtype`` and aligned."""
        wanted = _DTYPE_NAMES.get(self.dtype)
        fits = [
            n
            for n in names
            if header[n]["dtype"] == wanted
            and (start + header[n]["data_offsets"][0]) % self.dtype.itemsize == 0
        ]
        if not fits:
            return {}
        whole = torch.from_file(
            str(shard), shared=False, size=shard.stat().st_size, dtype=torch.uint8
        )
        views = {}
        for name in fits:
            begin, end = header[name]["data_offsets"]
            raw = whole[start + begin : start + end]
            views[name] = raw.view(self.dtype).view(header[name]["shape"])
        return views

    def _materialize(
        self, module: nn.Module, prefix: str, optional: bool = False, mapped: bool = False
    ) -> None:
        """Give ``module`` (named ``prefix`` in the model) its weights from the checkpoint."""
        wanted = list(module.state_dict(keep_vars=True))
        missing = [n for n in wanted if prefix + n not in self.files]
        if missing and not optional:
            raise SecateursError(
                f"the checkpoint has no tensor '{prefix + missing[0]}' that the model expects; "
                "--offload disk reads checkpoints saved by transformers' save_pretrained: "
                "re-save the model that way or use --offload none"
            )
        present = [n for n in wanted if n not in missing]
        module.load_state_dict(self._read(prefix, present, mapped), assign=True, strict=False)

    def load_outer(self, windows: torch.Tensor | None = None) -> None:
        """Embeddings, final norm and head (shared with the embeddings when tied), mapped
        from the shards rather than copied where the dtype allows.

        With ``windows``, the input embedding holds only the rows of their tokens (see
        :meth:`_embed_tokens_of`); the head keeps the mapped weight.
        """
        for name, module in self.outer:
            self._materialize(module, f"{name}.", optional=True, mapped=True)
        _tie_head(self.model)
        head = self.model.get_output_embeddings()
        self.head_name = self._stored_name(getattr(head, "weight", None))
        if windows is not None:
            self._embed_tokens_of(windows)
        empty = [n for n, p in self.model.named_parameters() if p.is_meta]
        empty = [n for n in empty if not n.startswith(f"{self.stack_name}.")]
        if empty:
            raise SecateursError(
                f"the checkpoint has no tensor '{empty[0]}' that the model expects; re-save "
                "the model with save_pretrained or use --offload none"
            )

    def _stored_name(self, param: torch.Tensor | None) -> str | None:
        """The checkpoint's name for a parameter of the model (any of its tied names)."""
        for name, other in self.model.named_parameters(remove_duplicate=False):
            if other is param and name in self.files:
                return name
        return None

    def _embed_tokens_of(self, windows: torch.Tensor) -> None:
        """Give the input embedding a weight that holds the rows of ``windows``' tokens only.

        A lookup in a mapped embedding makes nearly all of it resident: the kernel maps
        whole cached folios of the file around each row touched (measured: 512 tokens made
        103 of SmolLM2's 113 MiB resident). So the tokens' rows are read from the shard
        into an otherwise untouched allocation, whose other pages never become memory.
        """
        embedding = self.model.get_input_embeddings()
        name = self._stored_name(getattr(embedding, "weight", None))
        if not isinstance(embedding, nn.Embedding) or name is None:
            return
        tokens = torch.unique(windows.flatten())
        weight = torch.empty(embedding.weight.shape, dtype=self.dtype)
        rows = _read_rows(self.files[name], name, tokens)
        self._check("", {name: rows})
        weight[tokens] = rows.to(self.dtype)
        embedding.weight = nn.Parameter(weight, requires_grad=False)

    def head_rows(self, device: torch.device) -> HeadRows | None:
        """Reads rows of the output head's weight from its shard, a slice at a time.

        The shard is opened per slice, so no mapping of the file keeps the rows resident.
        None if the head's weight is not in the checkpoint under any of its names.
        """
        name = self.head_name
        if name is None:
            return None
        shard = self.files[name]

        def read(start: int, stop: int) -> torch.Tensor:
            with safe_open(shard, "pt") as handle:
                rows = handle.get_slice(name)[start:stop]
            self._check("", {name: rows})
            return rows.to(device=device, dtype=self.dtype)

        return HeadRows(read, STREAMED_HEAD_BYTES, copies=True)

    def free_outer(self) -> None:
        for _, module in self.outer:
            _free(module)
        give_back_memory()

    @contextlib.contextmanager
    def capturing(self, windows: torch.Tensor) -> Iterator[None]:
        """The outer modules, and the blocks run to capture the arguments of later kinds."""
        kinds = block_kinds(self.model, len(self.blocks))
        before = max(kinds.index(kind) for kind in dict.fromkeys(kinds))
        self.load_outer(windows)
        for index in range(before):
            self.load(index, self.blocks[index])
        try:
            yield
        finally:
            self.free_outer()
            for index in range(before):
                _free(self.blocks[index])

    def load(self, index: int, block: nn.Module) -> None:
        self._materialize(block, f"{self.stack_name}.{index}.")

    def release(self, index: int, block: nn.Module) -> None:
        """Count the pruned block's zeros, hand it to the shard writer, free it."""
        prefix = f"{self.stack_name}.{index}."
        for name, layer in find_linears(block).items():
            weight = weight_matrix(layer)
            self.zeros[prefix + name] = (
                weight.numel() - int(weight.count_nonzero()),
                weight.numel(),
            )
        if self.out is not None:
            tensors = {prefix + n: t.detach().contiguous() for n, t in block.state_dict().items()}
            self._write(index + 2, tensors)
        _free(block)
        give_back_memory()

    def _write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        """Queue ``tensors`` as shard ``number``, once the previous shard is on disk."""
        shard = self._shard_name(number)
        for name, tensor in tensors.items():
            self.weight_map[name] = shard
            self.total_size += tensor.numel() * tensor.element_size()
        self._wait_for_writes()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="secateurs-shards")
        self._pending = self._writer.submit(write_shard, self.out / shard, tensors)

    def _wait_for_writes(self) -> None:
        """Wait for the shard being written; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the shard being written and stop the writer.

        A write's error is :meth:`finish`'s (or the next release's) to raise: a run that
        fails elsewhere reports its own error, and its folder is removed anyway.
        """
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._pending = None

    def write_outer(self) -> None:
        """The unchanged outer modules as the first shard; a tied head is saved once.

        A tensor stored in the run's dtype is copied byte for byte from its shard, in
        chunks, so the embedding never needs to be resident to be written.
        """
        self.load_outer()
        tensors: dict[str, torch.Tensor] = {}
        stored: set[int] = set()
        for name, tensor in self.model.state_dict().items():
            if name.startswith(f"{self.stack_name}.") or tensor.data_ptr() in stored:
                continue
            stored.add(tensor.data_ptr())
            tensors[name] = tensor
        shard = self._shard_name(1)
        tensors = _in_file_order(tensors)
        with open(self.out / shard, "wb") as file:
            file.write(_header(tensors))
            for name, tensor in tensors.items():
                self._copy_tensor(file, name, tensor)
                self.weight_map[name] = shard
                self.total_size += tensor.numel() * tensor.element_size()
        self.free_outer()

    def _copy_tensor(self, file, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor's bytes: straight from its source shard if stored as it is now."""
        source = self.files.get(name)
        if source is not None:
            start, header = shard_header(source)
            entry = header[name]
            if entry["dtype"] == _DTYPE_NAMES[tensor.dtype]:
                begin, end = entry["data_offsets"]
                self._copy_checked(file, source, start + begin, end - begin, name, tensor.dtype)
                return
        _write_bytes(file, tensor.detach().contiguous().cpu())

    def _copy_checked(
        self, file, source: Path, offset: int, size: int, name: str, dtype: torch.dtype
    ) -> None:
        """Copy ``size`` bytes of tensor ``name`` from ``source`` in chunks, counting its NaN
        and Inf on the way: a large mapped tensor is checked whole without being resident."""
        buffer = memoryview(bytearray(min(_COPY_CHUNK, size)))
        nan = inf = 0
        with open(source, "rb") as reader:
            reader.seek(offset)
            left = size
            while left:
                # a buffered reader fills the whole chunk, so a chunk holds whole values
                got = reader.readinto(buffer[: min(len(buffer), left)])
                if not got:
                    raise _truncated(source, name)
                file.write(buffer[:got])
                left -= got
                if not dtype.is_floating_point:
                    continue
                values = torch.frombuffer(buffer[:got], dtype=dtype)
                if not all_finite(values):
                    nan += int(torch.isnan(values).sum())
                    inf += int(torch.isinf(values).sum())
        if nan or inf:
            raise non_finite_weights(str(self.source), [(name, describe_counts(nan, inf))])

    def _shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.shards:05d}.safetensors"

    def finish(self) -> None:
        """The index file, config and generation config of the output folder, once every
        shard is written."""
        self._wait_for_writes()
        write_index(self.out, self.weight_map, self.total_size)
        self.model.config.save_pretrained(self.out)
        generation = getattr(self.model, "generation_config", None)
        if generation is not None and self.model.can_generate():
            generation.save_pretrained(self.out)

    def sparsity(self, pattern: SparsityPattern, ratios: list[float]) -> SparsityCheck:
        """The check of :func:`secateurs.evaluate.perplexity.check_sparsity`, from the released
        blocks' counts; the pattern itself is checked on the output shards."""
        layers = {name: zeros / total for name, (zeros, total) in self.zeros.items()}
        zeros = sum(z for z, _ in self.zeros.values())
        total = sum(t for _, t in self.zeros.values())
        violations = []
        for index, block in enumerate(self.blocks):
            prefix = f"{self.stack_name}.{index}."
            roles = block_mlp_roles(block)
            names = list(find_linears(block))
            tensors = self._saved(prefix, names, block)
            for name, weight in tensors.items():
                problem = layer_violation(weight, pattern, roles.get(name), ratios[index])
                if problem:
                    violations.append(f"{prefix}{name}: {problem}")
        return SparsityCheck(layers, zeros / total if total else 0.0, violations)

    def _saved(self, prefix: str, names: list[str], block: nn.Module) -> dict[str, torch.Tensor]:
        """The pruned weight matrices of one block, read back from the output shards."""
        layers = find_linears(block)
        shard = self.out / self.weight_map[f"{prefix}{names[0]}.weight"]
        with safe_open(shard, "pt") as handle:
            return {
                name: _as_matrix(handle.get_tensor(f"{prefix}{name}.weight"), layers[name])
                for name in names
            }


def _in_file_order(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Widest dtype first, then by name, as safetensors orders a file: every tensor then
    starts at a multiple of its element size, so a mapping of the file can view it."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    return {name: tensors[name] for name in order}


def _header(tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors header (its length, then JSON padded to 8 bytes) for ``tensors`` stored
    one after another in this order."""
    entries, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}} | entries, separators=(",", ":"))
    header = header.encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as bytes (no copy)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _write_bytes(file, tensor: torch.Tensor) -> None:
    """Append a contiguous CPU tensor's bytes, written from its own memory (no copy)."""
    if tensor.numel():
        file.write(_bytes_of(tensor))


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write contiguous CPU ``tensors`` as one safetensors file.

    The bytes go to the file straight from the tensors' memory: ``save_file`` first copies
    every tensor into a bytes object, a second copy of a whole block (772 MiB at 7B).
    """
    tensors = _in_file_order(tensors)
    with open(path, "wb") as file:
        file.write(_header(tensors))
        for tensor in tensors.values():
            _write_bytes(file, tensor)


def _truncated(shard: Path, name: str) -> SecateursError:
    return SecateursError(
        f"{shard} ends inside tensor '{name}': the file is truncated; "
        "download or save the model again"
    )


def _read_tensor(file, start: int, entry: dict, shard: Path, name: str) -> torch.Tensor:
    """The tensor of header ``entry``, read from the open unbuffered ``file`` into new memory."""
    tensor = torch.empty(entry["shape"], dtype=_STORED_DTYPES[entry["dtype"]])
    buffer = _bytes_of(tensor)
    begin, end = entry["data_offsets"]
    file.seek(start + begin)
    done = 0
    while done < end - begin:  # one read returns at most about 2 GiB on Linux
        got = file.readinto(buffer[done:])
        if not got:
            raise _truncated(shard, name)
        done += got
    return tensor


def _read_rows(shard: Path, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of the 2-D tensor ``name``, in its stored dtype, read with plain file
    reads (a mapping of the shard would make far more of it resident)."""
    start, header = shard_header(shard)
    entry = header[name]
    dtype = _STORED_DTYPES[entry["dtype"]]
    width = entry["shape"][1]
    row_bytes = width * dtype.itemsize
    out = torch.empty((len(rows), row_bytes), dtype=torch.uint8)
    buffer = out.numpy()
    offset = start + entry["data_offsets"][0]
    with open(shard, "rb", buffering=0) as file:
        for slot, row in enumerate(rows.tolist()):
            file.seek(offset + row * row_bytes)
            file.readinto(buffer[slot])
    return out.view(dtype)


def _as_matrix(weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A stored weight as (out, in), like :func:`secateurs.core.model.weight_matrix`."""
    return weight.t() if type(layer).__name__ == "Conv1D" else weight


class _Replay(nn.Module):
    """Stands in for the first block in the tail pass: returns the final hidden states."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        # models that read per-layer attributes in their loop (Gemma-3's attention kind)
        for key in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, key):
                setattr(self, key, getattr(original, key))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class _Pass(_Replay):
    """Stands in for every later block in the tail pass: hands its input on."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def streamed_perplexity(
    model: nn.Module,
    folder: Path,
    windows: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of the model in ``folder``, one block at a time over all ``windows``.

    The hidden states of every window are held (two buffers of windows x seqlen x width);
    then the model's own forward runs once more per batch with the blocks replaced by
    stand-ins that return those states, so the final norm and head are the model's own and
    the formula is :class:`secateurs.evaluate.perplexity.PerplexityAccumulator`'s.
    """
    store = DiskBlocks(model, folder, dtype)
    blocks = store.blocks
    with store.capturing(windows):
        inputs = capture_block_inputs(model, windows, device, batch_size)
    for index, block in enumerate(tqdm(blocks, desc=desc, disable=not progress)):
        store.load(index, block)
        block.to(device)
        inputs.hidden = run_block(block, inputs, batch_size, True, index=index)
        _free(block)
        give_back_memory()
    originals = list(blocks)
    replay = _Replay(originals[0])
    for index, original in enumerate(originals):
        blocks[index] = replay if index == 0 else _Pass(original)
    accumulator = PerplexityAccumulator(windows.shape[1])
    store.load_outer(windows)
    try:
        _move_outer(store, device)
        rows = store.head_rows(device)
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                replay.hidden = inputs.hidden[start : start + batch.shape[0]]
                accumulator.add(window_nll(model, batch, rows))
    finally:
        for index, original in enumerate(originals):
            blocks[index] = original
        store.free_outer()
    return accumulator.value()


def _move_outer(store: DiskBlocks, device: torch.device) -> None:
    for _, module in store.outer:
        module.to(device)
