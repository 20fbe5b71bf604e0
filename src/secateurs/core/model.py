"""Loading models, finding their decoder blocks and linear layers, capturing block inputs.

Nothing here names an architecture: the decoder stack is found as the largest
``nn.ModuleList`` of identical blocks, and a block's prunable layers are its ``nn.Linear``
modules (and GPT-2 style ``Conv1D``, whose weight is stored transposed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.data import assets
from secateurs.errors import SecateursError
from secateurs.io import check_folder_files

DEFAULT_SEQLEN = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# tensors a non-finite weights error names; the rest are counted
SHOWN_TENSORS = 3


def resolve_model_path(name: str) -> str:
    """A built-in model name becomes its cached folder; anything else is passed through.

    A name written as a path (``./x``, ``../x``, ``/x``, ``~/x``) must be a folder here: it is
    never a hub id, so the hub's "Repo id must be in the form" would point the wrong way.
    """
    if name in assets.BUILTIN_MODELS:
        return str(assets.builtin_model_dir(name))
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise SecateursError(
            f"no such model folder: '{name}'; give a folder holding config.json and the "
            "weights, a hub id (org/name), or a built-in model: " + ", ".join(assets.BUILTIN_MODELS)
        )
    return str(Path(name).expanduser()) if name.startswith("~") else name


def load_config(name: str, cache_dir: str | None = None, trust_remote_code: bool = False):
    """The model's config, cheaply, so bad input is caught before the weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            resolve_model_path(name), cache_dir=cache_dir, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _load_failed(name, exc) from exc


def _load_failed(name: str, exc: Exception) -> SecateursError:
    return SecateursError(
        f"could not load model '{name}': {exc}\nGive a Hugging Face hub id (needs the hub or its "
        "local cache), a local model folder, or a built-in model: "
        + ", ".join(assets.BUILTIN_MODELS)
    )


def load_tokenizer(name: str, cache_dir: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer (cheap: loaded before the weights to check the data first)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            resolve_model_path(name), cache_dir=cache_dir, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _load_failed(name, exc) from exc


def load_model(
    name: str,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    tokenizer=None,
):
    """Load a causal LM in eval mode, kept on the CPU, with its tokenizer."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(name),
            cache_dir=cache_dir,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise _load_failed(name, exc) from exc
    except Exception as exc:
        if not _is_corrupt_weights(exc):
            raise
        if Path(resolve_model_path(name)).is_dir():
            check_folder_files(resolve_model_path(name))  # names the damaged file
        raise SecateursError(
            f"the weights of model '{name}' cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}): a file is truncated or "
            "corrupt; download or save the model again"
        ) from exc
    check_finite_weights(name, stored_tensors(model))
    if tokenizer is None:
        tokenizer = load_tokenizer(name, cache_dir, trust_remote_code)
    model.eval()
    return model, tokenizer


def _is_corrupt_weights(exc: Exception) -> bool:
    """Errors safetensors (and torch's zip reader) raise for a truncated or damaged file."""
    from safetensors import SafetensorError

    return isinstance(exc, SafetensorError) or "PytorchStreamReader" in str(exc)


def stored_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, each once: what a checkpoint holds.

    Non-persistent buffers are left out: the model computes them, and some (causal masks)
    hold -inf by design.
    """
    yield from model.named_parameters()
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buffer


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite; True for integer and meta tensors.

    One sum instead of ``isfinite(t).all()``: a NaN or Inf anywhere makes the sum NaN or
    Inf, and a sum reads the tensor once without making a mask as large as it (4 to 10 times
    faster on SmolLM2's weights). Only a non-finite sum, which may also be an overflow, pays
    the exact check.
    """
    if not tensor.is_floating_point() or tensor.is_meta:
        return True
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(tensor).all())


def describe_non_finite(tensor: torch.Tensor) -> str:
    """How many NaN and Inf values ``tensor`` holds: ``12 NaN``, ``2 NaN, 1 Inf``."""
    return describe_counts(int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum()))


def describe_counts(nan: int, inf: int) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in (("NaN", nan), ("Inf", inf)) if count)


def check_finite_weights(
    model: str, tensors: Iterable[tuple[str, torch.Tensor]], where: str = ""
) -> None:
    """Refuse weights holding NaN or Inf, naming a few of the tensors and counting them all.

    Such a model prunes "successfully" otherwise: every score and perplexity is NaN, the
    masks are arbitrary, and the sparsity check passes. ``where`` says which part of the
    model ``tensors`` are when they are not all of it (a streamed block).
    """
    found = [(name, describe_non_finite(t)) for name, t in tensors if not all_finite(t)]
    if found:
        raise non_finite_weights(model, found, where)


def non_finite_weights(model: str, found: list[tuple[str, str]], where: str = "") -> SecateursError:
    """The error for tensors ``found`` as ``(name, what they hold)``, a few named."""
    shown = ", ".join(f"{name} ({counts})" for name, counts in found[:SHOWN_TENSORS])
    more = f" and {len(found) - SHOWN_TENSORS} more" if len(found) > SHOWN_TENSORS else ""
    count = f"{len(found)} tensor{'s' if len(found) > 1 else ''}{where}"
    return SecateursError(
        f"the weights of model '{model}' are not finite ({count}): {shown}{more}; the "
        "checkpoint is corrupt or was saved after a failed run; download it again or save it "
        "again from a good copy"
    )


def context_length(config) -> int | None:
    """The longest sequence the model accepts, if its config says."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    for key in _CONTEXT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def choose_seqlen(config, requested: int | None) -> int:
    """``requested``, checked against the context; by default 2048 capped by the context."""
    context = context_length(config)
    if requested is None:
        return min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN
    if requested <= 1:
        raise SecateursError(f"--seqlen must be at least 2 tokens, got {requested}")
    if context is not None and requested > context:
        raise SecateursError(
            f"--seqlen {requested} is longer than the model's context of {context} tokens; "
            f"use --seqlen {context} or less, or leave it out for the default "
            f"({min(DEFAULT_SEQLEN, context)})"
        )
    return requested


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ties_embeddings(model: nn.Module) -> bool:
    """Whether the config shares the input embedding with the output head."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    return bool(getattr(config or model.config, "tie_word_embeddings", False))


def parameter_count(model: nn.Module) -> int:
    """The model's weights, a tied head counted once (a streamed run holds the embedding's
    rows apart from the head, but they are one weight)."""
    total = _param_count(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if ties_embeddings(model) and head is not None and head.weight is not embedding.weight:
        total -= head.weight.numel()
    return total


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: the ModuleList of same-type blocks holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not find_linears(module[0]):
            continue
        size = _param_count(module)
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise SecateursError(
            f"found no stack of decoder blocks with linear layers in {type(model).__name__}"
        )
    return best[1], best[2]


def is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a linear layer with its weight stored as (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The prunable linear layers of a block, by their name inside the block."""
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) or is_conv1d(module)
    }


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out_features, in_features); a view, so in-place edits stick."""
    return layer.weight.data.t() if is_conv1d(layer) else layer.weight.data


def per_window(x: torch.Tensor, windows: int) -> torch.Tensor:
    """A linear layer's input or output as (windows, tokens, features).

    Some models (OPT) flatten the batch to (windows * tokens, features) before their MLP.
    """
    return x if x.dim() == 3 else x.reshape(windows, -1, x.shape[-1])


@dataclass(frozen=True)
class MLPGroup:
    """An MLP inside a block: its neurons are the producers' output rows and the consumer's
    input columns (LLaMA: gate_proj and up_proj produce, down_proj consumes)."""

    producers: tuple[str, ...]
    consumer: str
    # Rows per neuron of each producer: 2 for a fused gate_up_proj (Phi-3), whose rows are
    # all gate rows then all up rows, so neuron j is rows j and width + j.
    parts: tuple[int, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.producers, self.consumer)

    def parts_of(self, name: str) -> int:
        """How many rows of producer ``name`` belong to each neuron."""
        return self.parts[self.producers.index(name)] if self.parts else 1

    def producer_rows(self, name: str, neurons: torch.Tensor) -> torch.Tensor:
        """A per-neuron vector repeated for each of a producer's fused parts (its rows)."""
        return neurons.repeat(self.parts_of(name))


def find_mlp_groups(layers: dict[str, nn.Module]) -> list[MLPGroup]:
    """The MLPs among a block's layers, found by shape among siblings, never by name.

    Within one parent module, a consumer reads ``F`` features that every other sibling
    produces from the block's width, wider than it, and writes that width back.
    Attention is never matched: its output projection reads what q produces, but k and v
    (or q itself, reading the same width it writes) break the rule. A producer of a whole
    multiple of ``F`` rows is fused (gate and up in one matrix, Phi-3's ``gate_up_proj``).
    """
    siblings: dict[str, list[str]] = {}
    for name in layers:
        siblings.setdefault(name.rpartition(".")[0], []).append(name)
    shapes = {name: tuple(weight_matrix(layer).shape) for name, layer in layers.items()}
    groups = []
    for names in siblings.values():
        for consumer in names:
            out_width, inner = shapes[consumer]
            producers = tuple(n for n in names if n != consumer)
            fits = all(shapes[n][1] == out_width and shapes[n][0] % inner == 0 for n in producers)
            if producers and fits and inner > out_width:
                parts = tuple(shapes[n][0] // inner for n in producers)
                groups.append(MLPGroup(producers, consumer, parts))
    return groups


def iter_prunable(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every prunable layer of the decoder stack, by its full name in the model."""
    stack_name, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        for name, layer in find_linears(block).items():
            yield f"{stack_name}.{index}.{name}", layer


class StopForward(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


CallArgs = tuple[tuple, dict[str, Any]]


@dataclass
class BlockInputs:
    """Hidden states entering the first block, and the other arguments blocks are called with.

    Blocks of one kind receive the same extra arguments (attention mask, position ids, rotary
    embeddings) at every depth; they depend only on the batch size, so one set per batch size
    is kept. Stacks that mix kinds (Gemma-3: sliding-window and full attention layers, each
    with its own mask and rotary embeddings) keep one set per kind in ``by_kind``.
    """

    hidden: torch.Tensor
    extra: dict[int, CallArgs] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    by_kind: dict[str, dict[int, CallArgs]] = field(default_factory=dict)

    def call_args(self, batch_size: int, index: int = 0) -> CallArgs:
        """The extra arguments of block ``index`` for a batch of ``batch_size`` windows."""
        if self.kinds and self.kinds[index] != self.kinds[0]:
            return self.by_kind[self.kinds[index]][batch_size]
        return self.extra[batch_size]


def block_kinds(model: nn.Module, count: int) -> list[str]:
    """Each block's attention kind from the config's ``layer_types``; one kind if it has none."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", lambda: config)()
    kinds = getattr(text_config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(kinds) >= count:
        return [str(kind) for kind in kinds[:count]]
    return [""] * count


def _non_block_modules(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """Top-level modules that hold no decoder block, so they can move to the device."""
    block_ids = {id(b) for b in blocks}
    keep: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if child is blocks:
                continue
            if any(id(m) in block_ids for m in child.modules()):
                visit(child)
            else:
                keep.append(child)

    visit(model)
    return keep


def _move(modules: list[nn.Module], device: torch.device) -> None:
    for module in modules:
        module.to(device)


def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int
) -> BlockInputs:
    """Run the model up to its first block for every batch of windows; keep what block 0 gets.

    A forward pre-hook records the first block's exact call and ends the forward pass there,
    so no module is replaced and the layers after the embedding never run.
    """
    _, blocks = find_blocks(model)
    outer = _non_block_modules(model, blocks)
    original = next(model.parameters()).device
    recorded: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        recorded["args"], recorded["kwargs"] = args, kwargs
        raise StopForward

    hidden: torch.Tensor | None = None
    extra: dict[int, tuple[tuple, dict[str, Any]]] = {}
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    _move(outer, device)
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                with contextlib.suppress(StopForward):
                    model(input_ids=batch, use_cache=False)
                args, kwargs = recorded["args"], recorded["kwargs"]
                states = args[0] if args else kwargs.pop("hidden_states")
                if hidden is None:
                    # one buffer filled batch by batch: concatenating would hold it twice
                    hidden = states.new_empty((windows.shape[0], *states.shape[1:]))
                hidden[start : start + batch.shape[0]] = states
                extra.setdefault(batch.shape[0], (tuple(args[1:]), dict(kwargs)))
    finally:
        handle.remove()
        _move(outer, original)
    inputs = BlockInputs(hidden, extra, block_kinds(model, len(blocks)))
    sizes = sorted(extra)
    for kind in dict.fromkeys(inputs.kinds):
        if kind != inputs.kinds[0]:
            first = inputs.kinds.index(kind)
            inputs.by_kind[kind] = _capture_call_args(model, windows, device, first, sizes)
    return inputs


def _capture_call_args(
    model: nn.Module, windows: torch.Tensor, device: torch.device, index: int, sizes: list[int]
) -> dict[int, CallArgs]:
    """The extra arguments block ``index`` is called with, one batch of each size.

    The blocks before it run for real (moved to ``device`` for that one batch), since their
    outputs are what the model would hand on; only the arguments are kept.
    """
    _, blocks = find_blocks(model)
    moved = [*_non_block_modules(model, blocks), *blocks[:index]]
    original = next(model.parameters()).device
    recorded: dict[int, CallArgs] = {}

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        if not args:
            kwargs.pop("hidden_states")
        recorded[len(recorded)] = (tuple(args[1:]), kwargs)
        raise StopForward

    handle = blocks[index].register_forward_pre_hook(hook, with_kwargs=True)
    _move(moved, device)
    try:
        with torch.no_grad():
            for size in sizes:
                with contextlib.suppress(StopForward):
                    model(input_ids=windows[:size].to(device), use_cache=False)
    finally:
        handle.remove()
        _move(moved, original)
    return {size: recorded[i] for i, size in enumerate(sizes)}


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (older blocks return a tuple, newer a tensor)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def model_size_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def base_weights(model: nn.Module, base: nn.Module, base_name: str) -> dict[str, torch.Tensor]:
    """The weight of each of ``model``'s prunable layers in ``base`` (the model it was
    fine-tuned from), by full name; a clear error where the two models' layers differ, or
    where no weight differs at all (every score of the change would be zero)."""
    layers = dict(iter_prunable(model))
    others = {name: weight_matrix(layer).detach() for name, layer in iter_prunable(base)}
    missing = sorted(set(layers) - set(others))
    shapes = [
        name
        for name, layer in layers.items()
        if name in others and others[name].shape != weight_matrix(layer).shape
    ]
    if missing or shapes or len(others) != len(layers):
        where = missing[:1] or shapes[:1] or sorted(set(others) - set(layers))[:1]
        raise SecateursError(
            f"--base_model {base_name} does not have this model's linear layers (first "
            f"difference: {where[0] if where else 'their count'}); --use_diff needs the model "
            "--model was fine-tuned from, with the same architecture and sizes"
        )
    if all(torch.equal(weight_matrix(layer), others[name]) for name, layer in layers.items()):
        raise SecateursError(
            f"--base_model {base_name} has the same weights as --model in every prunable "
            "layer: every --use_diff score would be zero and the masks arbitrary; give the "
            "model --model was fine-tuned from"
        )
    return others
