"""Structural units of a decoder block: attention heads (GQA-aware) and MLP neurons.

A unit is a set of columns of a *consumer* layer (``o_proj`` for a head, ``down_proj`` for a
neuron) and the rows of its *producers* (``q/k/v_proj``, ``gate/up_proj``) that only it reads.
Removing a unit is zeroing those columns and rows (exact: the zeroed columns see whatever the
producers compute and add nothing) and later cutting them out (:mod:`secateurs.formats.shrink`).

Heads are found from the config's head counts and the layers' shapes, never by name. With
grouped-query attention a key/value head serves ``H / K`` query heads; ``group`` removes a key/
value head with all of its query heads, ``query`` removes the same number of query heads from
every group, so the model stays expressible by two counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateurs.core.model import MLPGroup, find_linears, find_mlp_groups, weight_matrix
from secateurs.errors import SecateursError

HEAD_MODES = ("query", "group")


@dataclass(frozen=True)
class HeadLayout:
    """The head counts of a model: query heads, key/value heads, and width of one head."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def per_group(self) -> int:
        """Query heads that share one key/value head."""
        return self.heads // self.kv_heads


def head_layout(config) -> HeadLayout:
    """Head counts from a config (LLaMA-style names, GPT-2's ``n_head``)."""
    text = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    if not heads or not hidden:
        raise SecateursError(
            f"{type(config).__name__} names no head count (num_attention_heads), so its "
            "attention heads cannot be pruned"
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return HeadLayout(int(heads), int(kv_heads), int(head_dim))


@dataclass(frozen=True)
class AttentionGroup:
    """An attention layer: producers and their row segments, and the consumer.

    ``segments[name]`` lists ``(kind, offset)`` for each part of a producer's rows: ``q`` parts
    hold one row block per query head, ``kv`` parts one per key/value head (a fused ``qkv_proj``
    has three parts).
    """

    producers: tuple[str, ...]
    consumer: str
    segments: tuple[tuple[tuple[str, int], ...], ...]
    layout: HeadLayout

    def producer_rows(self, name: str, keep_q: torch.Tensor, keep_kv: torch.Tensor) -> torch.Tensor:
        """Rows of producer ``name`` that the kept query and key/value heads own, in order."""
        d = self.layout.head_dim
        within = torch.arange(d)
        parts = []
        for kind, offset in self.segments[self.producers.index(name)]:
            heads = keep_q if kind == "q" else keep_kv
            parts.append((offset + heads[:, None] * d + within).reshape(-1))
        return torch.cat(parts)

    def columns(self, heads: torch.Tensor) -> torch.Tensor:
        """Consumer columns read from ``heads`` (query head indices), in order."""
        d = self.layout.head_dim
        return (heads[:, None] * d + torch.arange(d)).reshape(-1)


def _segments(rows: int, layout: HeadLayout) -> tuple[tuple[str, int], ...] | None:
    """How a producer of ``rows`` rows splits into query and key/value parts, if it does."""
    q, kv = layout.heads * layout.head_dim, layout.kv_heads * layout.head_dim
    if rows == q + 2 * kv:
        return (("q", 0), ("kv", q), ("kv", q + kv))
    if rows == q:
        return (("q", 0),)
    if rows == kv:
        return (("kv", 0),)
    return None


def find_attention(block: nn.Module, layout: HeadLayout) -> AttentionGroup | None:
    """The block's attention, found by shape among sibling layers; None if there is none.

    The consumer reads ``H * d`` features and writes the block's width; its siblings read
    that width and produce, between them, ``(H + 2K) * d`` rows of query, key and value.
    Where shapes cannot tell the query projection from the output one (both square), the
    consumer is the last one the module defines (``o_proj`` after ``q_proj`` in every family).
    """
    layers = find_linears(block)
    mlp_names = {name for group in find_mlp_groups(layers) for name in group.names}
    siblings: dict[str, list[str]] = {}
    for name in layers:
        if name not in mlp_names:
            siblings.setdefault(name.rpartition(".")[0], []).append(name)
    shapes = {name: tuple(weight_matrix(layer).shape) for name, layer in layers.items()}
    q, kv = layout.heads * layout.head_dim, layout.kv_heads * layout.head_dim
    for names in siblings.values():
        for consumer in reversed(names):
            out_width, inner = shapes[consumer]
            if inner != q:
                continue
            producers = tuple(n for n in names if n != consumer)
            segments = [_segments(shapes[n][0], layout) for n in producers]
            if any(
                s is None or shapes[n][1] != out_width
                for s, n in zip(segments, producers, strict=True)
            ):
                continue
            if sum(shapes[n][0] for n in producers) == q + 2 * kv:
                return AttentionGroup(producers, consumer, tuple(segments), layout)  # type: ignore[arg-type]
    return None


def find_mlp(block: nn.Module) -> MLPGroup | None:
    """The block's MLP (one per block in every family secateurs knows), or None."""
    groups = find_mlp_groups(find_linears(block))
    return groups[0] if groups else None


def head_columns(group: AttentionGroup) -> torch.Tensor:
    """Each query head's consumer columns, (heads, head_dim)."""
    return group.columns(torch.arange(group.layout.heads)).reshape(group.layout.heads, -1)


def keep_heads(
    removed_q: torch.Tensor, layout: HeadLayout, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept query heads and kept key/value heads, sorted, for removed query heads.

    In ``group`` mode the removed query heads are whole groups (their key/value head goes
    too); in ``query`` mode every key/value head stays.
    """
    gone = torch.zeros(layout.heads, dtype=torch.bool)
    gone[removed_q] = True
    keep_q = (~gone).nonzero().squeeze(1)
    if head_mode(layout, mode) == "group":
        keep_kv = (~gone.view(layout.kv_heads, layout.per_group).all(dim=1)).nonzero().squeeze(1)
    else:
        keep_kv = torch.arange(layout.kv_heads)
    return keep_q, keep_kv


def zero_rows(layer: nn.Module, rows: torch.Tensor) -> None:
    """Zero output rows ``rows`` of a layer (and their bias)."""
    weight_matrix(layer)[rows] = 0
    if getattr(layer, "bias", None) is not None:
        layer.bias.data[rows] = 0


def complement(keep: torch.Tensor, size: int) -> torch.Tensor:
    """The indices in ``range(size)`` not in ``keep``."""
    gone = torch.ones(size, dtype=torch.bool)
    gone[keep] = False
    return gone.nonzero().squeeze(1)


def mask_heads(
    block: nn.Module, group: AttentionGroup, keep_q: torch.Tensor, keep_kv: torch.Tensor
) -> None:
    """Zero every row and column the removed heads own, in place."""
    layers = find_linears(block)
    layout = group.layout
    removed_q, removed_kv = complement(keep_q, layout.heads), complement(keep_kv, layout.kv_heads)
    for name in group.producers:
        zero_rows(layers[name], group.producer_rows(name, removed_q, removed_kv))
    weight_matrix(layers[group.consumer])[:, group.columns(removed_q)] = 0


def mask_neurons(block: nn.Module, group: MLPGroup, keep: torch.Tensor) -> None:
    """Zero every producer row and consumer column of the removed neurons, in place."""
    layers = find_linears(block)
    consumer = weight_matrix(layers[group.consumer])
    removed = complement(keep, consumer.shape[1])
    for name in group.producers:
        rows = torch.cat(
            [removed + part * consumer.shape[1] for part in range(group.parts_of(name))]
        )
        zero_rows(layers[name], rows)
    consumer[:, removed] = 0


def head_mode(layout: HeadLayout, mode: str) -> str:
    """The mode that applies: with one query head per key/value head both are ``group``."""
    return "group" if layout.per_group == 1 else check_head_mode(mode)


def heads_to_remove(layout: HeadLayout, share: float, mode: str) -> int:
    """Query heads removed per block: whole groups, or the same count from each group."""
    if head_mode(layout, mode) == "group":
        return int(layout.kv_heads * share) * layout.per_group
    return int(layout.per_group * share) * layout.kv_heads


def removed_heads(scores: torch.Tensor, layout: HeadLayout, remove: int, mode: str) -> torch.Tensor:
    """The query heads to remove given one score per head (lowest go): whole groups by their
    summed score, or the lowest ``remove / K`` heads of every group."""
    if head_mode(layout, mode) == "group":
        per = layout.per_group
        gone = choose_units(scores.view(layout.kv_heads, per).sum(dim=1), remove // per)
        return (gone[:, None] * per + torch.arange(per)).reshape(-1)
    return choose_units(scores, remove, layout.kv_heads)


def choose_units(scores: torch.Tensor, remove: int, groups: int = 1) -> torch.Tensor:
    """Indices of the ``remove`` lowest-scoring units, the same count from each of ``groups``
    equal consecutive groups; ties go to the lower index, so the choice is reproducible."""
    per = scores.numel() // groups
    take = remove // groups
    order = torch.sort(scores.view(groups, per).double(), dim=1, stable=True).indices[:, :take]
    return (order + torch.arange(groups).unsqueeze(1) * per).reshape(-1).sort().values


def check_head_mode(mode: str) -> str:
    if mode not in HEAD_MODES:
        raise SecateursError(f"unknown --head_mode '{mode}': use {' or '.join(HEAD_MODES)}")
    return mode
