"""Cut pruned MLP neurons out of a model, so that neuron pruning gives a smaller, faster file.

Masking a neuron leaves its zeros in place: same size, same speed. Here every MLP loses the
neurons whose consumer column is all zero (their output is zero whatever the producers
compute, so removing them is exact), and the config's MLP width follows, so the result saves
and loads as an ordinary Hugging Face model of the same class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateurs.core.model import (
    find_blocks,
    find_linears,
    find_mlp_groups,
    is_conv1d,
    weight_matrix,
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


def shrink_mlps(model: nn.Module) -> Shrinkage:
    """Remove the dead MLP neurons of every block in place, to one width for all blocks."""
    field = width_field(model.config)
    _, blocks = find_blocks(model)
    plans = []
    for block in blocks:
        layers = find_linears(block)
        for group in find_mlp_groups(layers):
            live = (weight_matrix(layers[group.consumer]) != 0).any(dim=0)
            plans.append((layers, group, live))
    if not plans:
        raise SecateursError("found no MLP to shrink; neuron pruning needs one in every block")
    before_params = sum(p.numel() for p in model.parameters())
    before = plans[0][2].numel()
    width = max(int(live.sum()) for *_, live in plans)
    for layers, group, live in plans:
        keep = _kept(live, width)
        for name in group.producers:
            rows = [keep + part * live.numel() for part in range(group.parts_of(name))]
            _narrow(layers[name], torch.cat(rows), 0)
        _narrow(layers[group.consumer], keep, 1)
    setattr(model.config, field, width)
    after_params = sum(p.numel() for p in model.parameters())
    return Shrinkage(field, before, width, before_params, after_params)
