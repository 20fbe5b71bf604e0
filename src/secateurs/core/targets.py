"""What a block's output layer should produce, measured on paired calibration tokens.

A pruned block and the block as it was (``original``) run on the same windows: the pruned one
on the pruned model's stream, the original once, on a *reference* stream (the same stream, or
the dense model's own), its outputs kept. A hook on the output layer of a sub-block
(``o_proj``, ``down_proj``) gives its inputs ``x`` in the pruned block, and the target ``t`` it
should produce for each token is summed into moments, so that a least-squares refit never
holds the activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from secateurs.core.model import BlockInputs, block_output, find_linears, per_window

AIMS = ("layer", "block")


@dataclass
class Target:
    """Sums over the calibration tokens of a layer's inputs times the target (``cross``,
    in x out), of the target (``total``), its energy, and (when asked) the inputs' own
    ``gram`` (in x in), their sum and the token count."""

    cross: torch.Tensor
    total: torch.Tensor
    energy: float
    gram: torch.Tensor | None = None
    inputs_sum: torch.Tensor | None = None
    tokens: int = 0


def without_bias(target: Target, bias: torch.Tensor) -> Target:
    """The target ``t - b`` for the weight alone of a layer whose bias ``b`` stays."""
    assert target.inputs_sum is not None
    b = bias.double().to(target.total.device)
    return Target(
        target.cross - torch.outer(target.inputs_sum, b),
        target.total - target.tokens * b,
        target.energy - 2 * float(b @ target.total) + target.tokens * float(b @ b),
        target.gram,
        target.inputs_sum,
        target.tokens,
    )


def target_error(
    output: float, weight: torch.Tensor, bias: torch.Tensor | None, target: Target
) -> float:
    """``sum over tokens of ||weight x + bias - t||^2`` from the sums alone, given ``output``
    = ``sum over tokens of ||weight x + bias||^2``."""
    produced = float((weight.double() * target.cross.double().t()).sum())
    if bias is not None:
        produced += float(bias.double() @ target.total.double())
    return max(output - 2 * produced + target.energy, 0.0)


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


def _add(total: torch.Tensor | None, term: torch.Tensor | None) -> torch.Tensor | None:
    """Running sums are kept in float64 whatever the products were computed in."""
    if term is None:
        return total
    return term.double() if total is None else total.add_(term.double())


@dataclass
class BatchTarget:
    """One batch's terms of a :class:`Target` (in float64), as they are summed."""

    cross: torch.Tensor
    total: torch.Tensor
    energy: float
    gram: torch.Tensor | None
    inputs_sum: torch.Tensor | None
    tokens: int


# all processes' batch terms, in global batch order, from this process's (data parallel)
CombineTargets = Callable[[list[BatchTarget]], list[BatchTarget]]


class _Sums:
    """The running sums of a target, folded batch by batch in the order they come."""

    def __init__(self) -> None:
        self.cross = self.total = self.gram = self.inputs_sum = None
        self.energy, self.tokens = 0.0, 0

    def fold(self, terms: BatchTarget) -> None:
        self.cross = _add(self.cross, terms.cross)
        self.total = _add(self.total, terms.total)
        self.energy += terms.energy
        self.tokens += terms.tokens
        self.gram = _add(self.gram, terms.gram)
        self.inputs_sum = _add(self.inputs_sum, terms.inputs_sum)

    def target(self) -> Target:
        assert self.cross is not None and self.total is not None
        return Target(self.cross, self.total, self.energy, self.gram, self.inputs_sum, self.tokens)


@dataclass
class Reference:
    """The unpruned block's outputs for every window, and some of its layers' outputs."""

    output: torch.Tensor
    layers: dict[str, torch.Tensor]


def reference_outputs(
    original: nn.Module,
    names: list[str],
    index: int,
    reference: BlockInputs,
    batch_size: int,
) -> Reference:
    """One pass of ``original`` (block ``index``) over the ``reference`` stream, keeping its
    outputs and those of the layers ``names`` (as windows x tokens x features)."""
    linears = find_linears(original)
    windows = reference.hidden.shape[0]
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    batch_windows = [0]
    handles = [
        linears[name].register_forward_hook(
            lambda _m, _a, out, n=name: kept[n].append(per_window(out, batch_windows[0]))
        )
        for name in names
    ]
    outputs = []
    try:
        with torch.no_grad():
            for start in range(0, windows, batch_size):
                batch = reference.hidden[start : start + batch_size]
                batch_windows[0] = batch.shape[0]
                args, kwargs = reference.call_args(batch.shape[0], index)
                outputs.append(block_output(original(batch, *args, **kwargs)))
    finally:
        for handle in handles:
            handle.remove()
    return Reference(torch.cat(outputs), {name: torch.cat(kept[name]) for name in names})


def paired_target(
    block: nn.Module,
    layer_name: str,
    index: int,
    inputs: BlockInputs,
    wanted: Reference,
    batch_size: int,
    aim: str = "block",
    with_gram: bool = False,
    dtype: torch.dtype = torch.float64,
    combine: CombineTargets | None = None,
) -> Target | None:
    """The output ``layer_name`` of ``block`` (number ``index``) should give, as moments.

    ``wanted`` holds the unpruned block's outputs on a reference stream (the pruned model's,
    or the dense model's own). ``aim`` "layer": the unpruned layer's output there. ``aim``
    "block": ``t = y + (unpruned block output - this block's output)``, which also makes up
    for what the other layers (and, on the dense stream, the blocks before) changed; it needs
    the layer's output to add to the block's output (checked on the first batch: a shift of
    ``y`` must shift the block's output by as much; where a norm follows, as in Gemma-3, None
    is returned). ``with_gram`` also sums ``x^T x`` of the layer's inputs in ``block``. Each
    batch's products are computed in ``dtype`` and summed in float64. With ``combine`` (a
    data-parallel run) the batches' terms are kept, combined with the other processes' and
    folded in global batch order: the sums of one process, bit for bit.
    """
    layer = find_linears(block)[layer_name]
    seen: dict[str, torch.Tensor] = {}
    shift: dict[str, torch.Tensor | None] = {"delta": None}

    def hook(_module, args, output):
        seen["x"], seen["y"] = args[0], output
        if shift["delta"] is not None:
            return output + shift["delta"]
        return None

    handle = layer.register_forward_hook(hook)
    sums = _Sums()
    kept: list[BatchTarget] = []
    try:
        with torch.no_grad():
            for start in range(0, inputs.hidden.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                batch = inputs.hidden[rows]
                args, kwargs = inputs.call_args(batch.shape[0], index)
                out = block_output(block(batch, *args, **kwargs))
                x, y = _flat(seen["x"], dtype), _flat(seen["y"], dtype)
                if aim == "block":
                    if start == 0 and not _adds_to_residual(block, batch, args, kwargs, out, shift):
                        return None
                    t = y + _flat(wanted.output[rows], dtype) - _flat(out, dtype)
                else:
                    t = _flat(wanted.layers[layer_name][rows], dtype)
                terms = BatchTarget(
                    (x.t() @ t).double(),
                    t.sum(dim=0).double(),
                    float(t.square().sum(dtype=torch.float64)),
                    (x.t() @ x).double() if with_gram else None,
                    x.sum(dim=0).double() if with_gram else None,
                    x.shape[0],
                )
                if combine is None:
                    sums.fold(terms)
                else:
                    kept.append(terms)
    finally:
        handle.remove()
    for terms in combine(kept) if combine is not None else ():
        sums.fold(terms)
    return sums.target()


def _adds_to_residual(block, batch, args, kwargs, out, shift) -> bool:
    """Whether shifting the layer's output by a constant shifts the block's output by it."""
    delta = torch.full((out.shape[-1],), 0.5, dtype=out.dtype, device=out.device)
    shift["delta"] = delta
    try:
        moved = block_output(block(batch, *args, **kwargs))
    finally:
        shift["delta"] = None
    return bool(torch.allclose(moved - out, delta.expand_as(out), atol=1e-3, rtol=1e-3))
