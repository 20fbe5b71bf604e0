"""Cut pruned units out of a model, so that structured pruning gives a smaller, faster file.

Masking a neuron leaves its zeros in place: same size, same speed. Here every MLP loses the
neurons whose consumer column is all zero (their output is zero whatever the producers
compute, so removing them is exact), and the config's MLP width follows, so the result saves
and loads as an ordinary Hugging Face model of the same class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateurs.core.model import (
    find_blocks,
    find_linears,
    find_mlp_groups,
    is_conv1d,
    parameter_count,
    weight_matrix,
)
from secateurs.core.structure import BlockCut, StructurePlan, StructureSpec
from secateurs.core.units import (
    find_attention,
    head_layout,
    heads_to_remove,
    keep_heads,
    removed_heads,
)
from secateurs.errors import SecateursError

# Config fields that hold the MLP width, by model family (LLaMA/Qwen/Mistral, OPT, GPT-2).
WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


@dataclass(frozen=True)
class Shrinkage:
    """What cutting the neurons out changed."""

    width_field: str
    width_before: int
    width_after: int
    parameters_before: int
    parameters_after: int

    def to_dict(self) -> dict[str, int | str]:
        return dict(self.__dict__)


def width_field(config) -> str:
    """The config field that sets every block's MLP width; a clear error if there is none."""
    for field in WIDTH_FIELDS:
        if hasattr(config, field) and not isinstance(getattr(config, field), (list, tuple)):
            return field
    raise SecateursError(
        f"cannot save a narrower MLP for {type(config).__name__}: its config has none of "
        f"{', '.join(WIDTH_FIELDS)}; pass --keep_shape to save the pruned neurons as zeros"
    )


def _narrow(layer: nn.Module, keep: torch.Tensor, dim: int) -> None:
    """Keep only the output rows (dim 0) or input columns (dim 1) listed in ``keep``."""
    matrix = weight_matrix(layer).index_select(dim, keep)
    conv1d = is_conv1d(layer)
    layer.weight = nn.Parameter(matrix.t().contiguous() if conv1d else matrix.contiguous())
    if dim == 0 and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data.index_select(0, keep))
    out_features, in_features = matrix.shape
    if conv1d:
        layer.nf, layer.nx = out_features, in_features
    else:
        layer.out_features, layer.in_features = out_features, in_features


def _kept(live: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of ``width`` neurons in their original order: every live one, then dead ones
    (lowest index first) where this MLP has fewer live neurons than the widest."""
    live_first = torch.argsort((~live).to(torch.uint8), stable=True)
    return live_first[:width].sort().values


def _cut_neurons(blocks: list[nn.Module], lives: list[torch.Tensor]) -> tuple[int, int]:
    """Cut each block's MLP to the widest live count (padding narrower ones with dead
    neurons, which are exact zeros); the widths before and after."""
    plans = []
    for block, live in zip(blocks, lives, strict=True):
        layers = find_linears(block)
        for group in find_mlp_groups(layers):
            plans.append((layers, group, live))
    if not plans:
        raise SecateursError("found no MLP to shrink; neuron pruning needs one in every block")
    before = plans[0][2].numel()
    width = max(int(live.sum()) for *_, live in plans)
    for layers, group, live in plans:
        keep = _kept(live, width)
        for name in group.producers:
            rows = [keep + part * live.numel() for part in range(group.parts_of(name))]
            _narrow(layers[name], torch.cat(rows), 0)
        _narrow(layers[group.consumer], keep, 1)
    return before, width


def shrink_mlps(model: nn.Module) -> Shrinkage:
    """Remove the dead MLP neurons of every block in place, to one width for all blocks."""
    field = width_field(model.config)
    _, blocks = find_blocks(model)
    pairs = []
    for block in blocks:
        layers = find_linears(block)
        for group in find_mlp_groups(layers)[:1]:
            pairs.append((block, (weight_matrix(layers[group.consumer]) != 0).any(dim=0)))
    before_params = parameter_count(model)
    before, width = _cut_neurons([b for b, _ in pairs], [live for _, live in pairs])
    setattr(model.config, field, width)
    return Shrinkage(field, before, width, before_params, parameter_count(model))


@dataclass(frozen=True)
class StructureShrinkage:
    """What cutting heads, neurons and blocks out changed, in the config's terms."""

    parameters_before: int
    parameters_after: int
    config_changes: dict[str, tuple[Any, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "config": {k: {"before": a, "after": b} for k, (a, b) in self.config_changes.items()},
        }


def _text_config(config):
    return getattr(config, "get_text_config", lambda: config)()


def _set(config, name: str, value: Any, changes: dict[str, tuple[Any, Any]]) -> None:
    before = getattr(config, name, None)
    if before != value:
        changes[name] = (before, value)
    setattr(config, name, value)


def _cut_heads(blocks: list[nn.Module], cuts: list[BlockCut], config, changes) -> None:
    """Cut the removed heads out of every block; the config's head counts follow."""
    layout = head_layout(config)
    counts = {(int(c.keep_q.numel()), int(c.keep_kv.numel())) for c in cuts}  # type: ignore[union-attr]
    if len(counts) != 1:
        raise SecateursError(
            "blocks keep different numbers of heads, which one head count in the config "
            "cannot express; prune the same share of heads in every block"
        )
    heads, kv_heads = counts.pop()
    for block, cut in zip(blocks, cuts, strict=True):
        group = find_attention(block, layout)
        if group is None:
            raise SecateursError(f"found no attention layer to cut in {type(block).__name__}")
        layers = find_linears(block)
        for name in group.producers:
            _narrow(layers[name], group.producer_rows(name, cut.keep_q, cut.keep_kv), 0)
        _narrow(layers[group.consumer], group.columns(cut.keep_q), 1)
        attention = block.get_submodule(group.consumer.rpartition(".")[0])
        for attr, value in (
            ("num_key_value_groups", heads // kv_heads),
            ("num_heads", heads),
            ("num_key_value_heads", kv_heads),
        ):
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, value)
    text = _text_config(config)
    names = ("num_attention_heads", "n_head")
    head_field = next(n for n in names if isinstance(getattr(text, n, None), int))
    _set(text, head_field, heads, changes)
    if isinstance(getattr(text, "num_key_value_heads", None), int):
        _set(text, "num_key_value_heads", kv_heads, changes)
    _set(text, "head_dim", layout.head_dim, changes)


def _drop_blocks(model: nn.Module, removed: list[int], changes) -> None:
    """Remove whole blocks; layer indices and per-layer config lists follow."""
    stack_name, blocks = find_blocks(model)
    count = len(blocks)
    kept = [block for index, block in enumerate(blocks) if index not in set(removed)]
    parent, _, attr = stack_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList(kept))
    for index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    text = _text_config(model.config)
    for name, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == count:
            _set(text, name, [v for i, v in enumerate(value) if i not in set(removed)], changes)
    layers_field = next(
        n for n in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(text, n)
    )
    _set(text, layers_field, len(kept), changes)


def check_expressible(model: nn.Module) -> None:
    """Refuse a cut the model's own class cannot build from the changed config.

    A fresh model of the same class is built from the config on the meta device (no
    memory); every tensor must have the cut model's shape, or the saved folder would not load.
    """
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    for name, tensor in model.state_dict().items():
        want = expected.get(name)
        if want is not None and want != tuple(tensor.shape):
            raise SecateursError(
                f"transformers cannot express this cut for {type(model).__name__}: {name} is "
                f"{tuple(tensor.shape)} after cutting but {want} when built from the changed "
                "config (its class derives that width from fields the cut cannot change); "
                "prune other units for this family"
            )


def cut_structure(model: nn.Module, plan: StructurePlan) -> StructureShrinkage:
    """Cut out what a structured prune removed: blocks, heads, neurons; check it reloads."""
    before = parameter_count(model)
    changes: dict[str, tuple[Any, Any]] = {}
    _, blocks = find_blocks(model)
    kept = [i for i in range(len(blocks)) if i not in set(plan.removed_blocks)]
    head_cuts = [
        (blocks[i], plan.cuts[i])
        for i in kept
        if plan.cuts.get(i) and plan.cuts[i].keep_q is not None
    ]
    if head_cuts:
        _cut_heads([b for b, _ in head_cuts], [c for _, c in head_cuts], model.config, changes)
    neuron_cuts = [
        (blocks[i], plan.cuts[i])
        for i in kept
        if plan.cuts.get(i) and plan.cuts[i].keep_neurons is not None
    ]
    if neuron_cuts:
        field = width_field(_text_config(model.config))
        lives = []
        for block, cut in neuron_cuts:
            group = find_mlp_groups(find_linears(block))[0]
            live = torch.zeros(
                weight_matrix(find_linears(block)[group.consumer]).shape[1], dtype=torch.bool
            )
            live[cut.keep_neurons] = True
            lives.append(live)
        _, width = _cut_neurons([b for b, _ in neuron_cuts], lives)
        _set(_text_config(model.config), field, width, changes)
    if plan.removed_blocks:
        _drop_blocks(model, plan.removed_blocks, changes)
    check_expressible(model)
    return StructureShrinkage(before, parameter_count(model), changes)


def check_cut_possible(model: nn.Module, spec: StructureSpec) -> None:
    """Refuse, before any calibration, a cut the model's class could not load.

    The same cut (the first units of each kind) is made on a copy of the model built on the
    meta device, which costs no memory and no compute.
    """
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        ghost = type(model)(config)
    _, blocks = find_blocks(ghost)
    plan = StructurePlan(removed_blocks=list(range(spec.blocks)))
    layout = head_layout(config) if spec.heads else None
    for index in range(spec.blocks, len(blocks)):
        cut = BlockCut()
        if layout is not None:
            remove = heads_to_remove(layout, spec.heads, spec.head_mode)
            cut.keep_q, cut.keep_kv = keep_heads(
                removed_heads(
                    -torch.arange(layout.heads, dtype=torch.float), layout, remove, spec.head_mode
                ),
                layout,
                spec.head_mode,
            )
        if spec.neurons:
            group = find_mlp_groups(find_linears(blocks[index]))
            if group:
                width = weight_matrix(find_linears(blocks[index])[group[0].consumer]).shape[1]
                cut.keep_neurons = torch.arange(width - int(width * spec.neurons))
        plan.cuts[index] = cut
    cut_structure(ghost, plan)
