"""What a block's output layer should produce, measured on paired calibration tokens.

A pruned block and the block as it was (``original``) run on the same windows: the pruned one
on the pruned model's stream, the original once, on a *reference* stream (the same stream, or
the dense model's own), its outputs kept. A hook on the output layer of a sub-block
(``o_proj``, ``down_proj``) gives its inputs ``x`` in the pruned block, and the target ``t`` it
should produce for each token is summed into moments, so that a least-squares refit never
holds the activations.
"""

from __future__ import annotations

import contextlib
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
    ``gram`` (in x in), their sum and the token count. A target through a norm weighs each
    token's terms, so a fit must use its ``gram`` (always given then), not the inputs' plain
    one."""

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
    wanted: Reference | None,
    batch_size: int,
    aim: str = "block",
    with_gram: bool = False,
    dtype: torch.dtype = torch.float64,
    combine: CombineTargets | None = None,
    through_norms: bool = True,
    norm_only: bool = False,
) -> Target | None:
    """The output ``layer_name`` of ``block`` (number ``index``) should give, as moments.

    ``wanted`` holds the unpruned block's outputs on a reference stream (the pruned model's,
    or the dense model's own). ``aim`` "layer": the unpruned layer's output there (the block
    runs only as far as the layer). ``aim`` "block": ``t = y + (unpruned block output - this
    block's output)``, which also makes up for what the other layers (and, on the dense
    stream, the blocks before) changed; it needs the layer's output to add to the block's
    output (checked on the first batch: a shift of ``y`` must shift the block's output by as
    much); ``wanted`` None aims at this block's own output (``t = y``). Where an RMS norm
    ``n(y) = g y / rms(y)`` stands between the layer and the residual sum (Gemma-3's
    post-attention and post-MLP norms) the correction goes back through the norm, linearised
    at ``y``: ``t = y + rms(y) (wanted - out) / g``, each token's terms weighted by
    ``1 / rms(y)^2`` so that the fit minimises the error the block's output sees (channels whose
    gain is under a tenth of the median take no correction: they barely reach the output and
    would be blown up); ``through_norms`` off leaves that route out, ``norm_only`` returns
    None (after one batch) where the route has no norm. Where neither holds, None is
    returned. ``with_gram`` also sums ``x^T x`` of the layer's inputs in ``block`` (always,
    for a weighted target). Each batch's products are computed in ``dtype`` and summed in
    float64. With ``combine`` (a data-parallel run) the batches' terms are kept, combined
    with the other processes' and folded in global batch order: the sums of one process, bit
    for bit.
    """
    layer = find_linears(block)[layer_name]
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        seen["x"], seen["y"] = args[0], output
        if aim == "layer":
            raise _Enough

    handle = layer.register_forward_hook(hook)
    sums = _Sums()
    kept: list[BatchTarget] = []
    relay: NormRelay | None = None
    try:
        with torch.no_grad():
            for start in range(0, inputs.hidden.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                batch = inputs.hidden[rows]
                args, kwargs = inputs.call_args(batch.shape[0], index)
                if aim == "layer":
                    with contextlib.suppress(_Enough):
                        block(batch, *args, **kwargs)
                    assert wanted is not None, "a layer aim needs the unpruned layer's outputs"
                    x = _flat(seen["x"], dtype)
                    t = _flat(wanted.layers[layer_name][rows], dtype)
                else:
                    if start == 0:
                        out, reaches, relay = _first_pass(
                            block, layer, seen, batch, args, kwargs, through_norms, norm_only
                        )
                        if not reaches:
                            return None
                    else:
                        out = block_output(block(batch, *args, **kwargs))
                    x, y = _flat(seen["x"], dtype), _flat(seen["y"], dtype)
                    got = _flat(out, dtype)
                    reach = got if wanted is None else _flat(wanted.output[rows], dtype)
                    if relay is None:
                        t = y + reach - got
                    else:
                        scale = relay.rms(y)
                        t = y + scale * (reach - got) * relay.inverse_gain.to(dtype)
                        x, t = x / scale, t / scale
                gram = with_gram or relay is not None
                terms = BatchTarget(
                    (x.t() @ t).double(),
                    t.sum(dim=0).double(),
                    float(t.square().sum(dtype=torch.float64)),
                    (x.t() @ x).double() if gram else None,
                    x.sum(dim=0).double() if gram else None,
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


class _Enough(Exception):
    """Raised from a hook once a pass has what it needs from the block."""


@dataclass(frozen=True)
class NormRelay:
    """An RMS norm ``n(y) = gain * y / sqrt(mean(y^2) + eps)`` between a layer and the
    residual sum, and the inverse of its gain where that is usable (0 elsewhere)."""

    gain: torch.Tensor
    eps: float
    inverse_gain: torch.Tensor

    def rms(self, y: torch.Tensor) -> torch.Tensor:
        """Each token's root mean square (with the norm's eps), as a column."""
        return _token_rms(y, self.eps)


def _token_rms(y: torch.Tensor, eps: float) -> torch.Tensor:
    return (y.square().mean(dim=-1, keepdim=True) + eps).sqrt()


# a channel whose gain is under this share of the median takes no correction through the norm
SMALL_GAIN = 0.1


def _first_pass(block, layer, seen, batch, args, kwargs, through_norms, norm_only=False):
    """The block's output on the first batch, whether the layer's output reaches it (added to
    the residual, directly or through an RMS norm; with ``norm_only``, through a norm), and
    that norm as a :class:`NormRelay` (None for a plain sum). The modules fed the layer's
    output tensor itself are noted on the way."""
    fed: list[tuple[nn.Module, torch.Tensor]] = []

    def record(module, args_, output):
        if args_ and args_[0] is seen.get("y"):
            fed.append((module, output))

    handles = [m.register_forward_hook(record) for m in block.modules() if m not in (block, layer)]
    try:
        out = block_output(block(batch, *args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    relay = None
    # weighted sums leave no room for a bias
    if through_norms and len(fed) == 1 and getattr(layer, "bias", None) is None:
        relay = _as_rms_norm(*fed[0], seen["y"])
    if norm_only and relay is None:
        return out, False, None
    shifted = fed[0][0] if relay is not None else layer
    first = dict(seen)  # the probe's pass must not replace the layer's tensors of this one
    adds = _adds_to_residual(block, shifted, batch, args, kwargs, out)
    seen.update(first)
    return out, adds, relay if adds else None


def _as_rms_norm(module: nn.Module, normed: torch.Tensor, y: torch.Tensor) -> NormRelay | None:
    """``module`` as an RMS norm with a per-channel gain, if its output ``normed`` of ``y``
    says it is one; else None."""
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not isinstance(eps, float):
        return None
    y = y.float()
    with torch.no_grad():  # on a row of ones, an RMS norm gives its gain / sqrt(1 + eps)
        ones = torch.ones(1, y.shape[-1], dtype=y.dtype, device=y.device)
        gain = module(ones).float().squeeze(0) * (1.0 + eps) ** 0.5
    if not torch.allclose(normed.float(), gain * y / _token_rms(y, eps), rtol=1e-3, atol=1e-5):
        return None
    usable = gain.abs() >= SMALL_GAIN * gain.abs().median()
    inverse = torch.where(usable, 1.0 / gain.where(usable, torch.ones_like(gain)), 0.0)
    return NormRelay(gain, eps, inverse)


def _adds_to_residual(block, module, batch, args, kwargs, out) -> bool:
    """Whether shifting ``module``'s output by a constant shifts the block's output by it."""
    delta = torch.full((out.shape[-1],), 0.5, dtype=out.dtype, device=out.device)
    handle = module.register_forward_hook(lambda _m, _a, output: output + delta)
    try:
        moved = block_output(block(batch, *args, **kwargs))
    finally:
        handle.remove()
    return bool(torch.allclose(moved - out, delta.expand_as(out), atol=1e-3, rtol=1e-3))
