"""What a block's output layer should produce, measured on paired calibration tokens.

A pruned block and the block as it was (``original``) run on the same windows: the pruned one
on the pruned model's stream, the original on a *reference* stream (the same stream, or the
dense model's own). Hooks on the output layer of a sub-block (``o_proj``, ``down_proj``) give
its inputs ``x`` in the pruned block, and the target ``t`` it should produce for each token is
summed into moments, so that a least-squares refit never holds the activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateurs.core.model import BlockInputs, block_output, find_linears

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


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).double()


def paired_target(
    block: nn.Module,
    original: nn.Module,
    layer_name: str,
    index: int,
    inputs: BlockInputs,
    reference: BlockInputs,
    batch_size: int,
    aim: str = "block",
    with_gram: bool = False,
) -> Target | None:
    """The output ``layer_name`` of ``block`` (number ``index``) should give, as moments.

    ``aim`` "layer": the original layer's output on the ``reference`` stream. ``aim`` "block":
    ``t = y + (original block output - this block's output)``, which also makes up for what the
    other layers (and, on the dense stream, the blocks before) changed; it needs the layer's
    output to add to the block's output (checked on the first batch: a shift of ``y`` must
    shift the block's output by as much; where a norm follows, as in Gemma-3, None is
    returned). ``with_gram`` also sums ``x^T x`` of the layer's inputs in ``block``.
    """
    layer = find_linears(block)[layer_name]
    twin = find_linears(original)[layer_name]
    seen: dict[str, torch.Tensor] = {}
    shift: dict[str, torch.Tensor | None] = {"delta": None}

    def hook(_module, args, output):
        seen["x"], seen["y"] = args[0], output
        if shift["delta"] is not None:
            return output + shift["delta"]
        return None

    def twin_hook(_module, _args, output):
        seen["y0"] = output

    handles = [layer.register_forward_hook(hook), twin.register_forward_hook(twin_hook)]
    cross = total = gram = inputs_sum = None
    energy, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, inputs.hidden.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                batch, reference_batch = inputs.hidden[rows], reference.hidden[rows]
                args, kwargs = inputs.call_args(batch.shape[0], index)
                out = block_output(block(batch, *args, **kwargs))
                x, y = _flat(seen["x"]), _flat(seen["y"])
                if (
                    aim == "block"
                    and start == 0
                    and not _adds_to_residual(block, batch, args, kwargs, out, shift)
                ):
                    return None
                want = block_output(original(reference_batch, *args, **kwargs))
                t = y + _flat(want) - _flat(out) if aim == "block" else _flat(seen["y0"])
                cross = x.t() @ t if cross is None else cross.add_(x.t() @ t)
                total = t.sum(dim=0) if total is None else total.add_(t.sum(dim=0))
                energy += float(t.square().sum())
                tokens += x.shape[0]
                if with_gram:
                    gram = x.t() @ x if gram is None else gram.add_(x.t() @ x)
                    batch_sum = x.sum(dim=0)
                    inputs_sum = batch_sum if inputs_sum is None else inputs_sum.add_(batch_sum)
    finally:
        for handle in handles:
            handle.remove()
    assert cross is not None and total is not None
    return Target(cross, total, energy, gram, inputs_sum, tokens)


def _adds_to_residual(block, batch, args, kwargs, out, shift) -> bool:
    """Whether shifting the layer's output by a constant shifts the block's output by it."""
    delta = torch.full((out.shape[-1],), 0.5, dtype=out.dtype, device=out.device)
    shift["delta"] = delta
    try:
        moved = block_output(block(batch, *args, **kwargs))
    finally:
        shift["delta"] = None
    return bool(torch.allclose(moved - out, delta.expand_as(out), atol=1e-3, rtol=1e-3))
