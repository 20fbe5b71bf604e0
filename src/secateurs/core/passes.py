"""Whole-model passes: statistics of every prunable layer from forward (and backward) passes of
the unpruned model over prompt/response samples, all layers at once, not block by block.

``gradient_magnitudes`` is the pass behind ``wandg``: ``sum over samples of |dL/dW|``. The
absolute value is taken per sample before summing, as the reference implementation of Wei et
al. (ICML 2024) does (it runs one sample per backward and adds ``weight.grad.abs()``), so
gradients of opposite sign on different samples do not cancel.

How, and why this way: no weight requires grad, so autograd forms only activation gradients
and never a weight's ``.grad`` (no optimizer state, no model-sized gradient). Each prunable
layer's input is kept from the forward pass, and a hook on its output's gradient forms every
sample's weight gradient ``G_s^T X_s`` in turn, in one reused buffer of the weight's size that
stays in cache while its absolute value is added into the layer's fp32 accumulator. Samples
are batched (similar lengths together) and the loss is the sum of the samples' own mean
losses, so each sample's gradient is exactly its own; padding sits after a sample's tokens
and, the models being causal, receives no gradient and changes nothing before it. The output
head computes logits only at the positions whose next token counts.

``activation_means`` is the pass behind ``wanda_v2``: the mean over counted tokens of every
layer's squared input, per input feature, recorded while the whole dense model runs (so no
layer sees inputs changed by pruning an earlier one).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from secateurs.core.model import iter_prunable, per_window, weight_matrix
from secateurs.data.prompts import PromptBatch


class _PerSampleAbsGrad:
    """Hooks that add ``|G_s^T X_s|`` of every sample into each layer's accumulator."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device) -> None:
        self.sums = {
            name: torch.zeros(weight_matrix(layer).shape, dtype=torch.float32, device=device)
            for name, layer in layers.items()
        }
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}
        self.lengths: list[int] = []
        self.handles = [
            layer.register_forward_hook(self._forward_hook(name)) for name, layer in layers.items()
        ]

    def _forward_hook(self, name: str):
        def hook(_module, args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                inputs = args[0].detach()
                output.register_hook(lambda grad: self._accumulate(name, inputs, grad))

        return hook

    def _accumulate(self, name: str, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        total = self.sums[name]
        buffer = self.buffers.get(total.shape)
        if buffer is None:
            buffer = self.buffers[total.shape] = torch.empty_like(total)
        inputs = per_window(inputs, len(self.lengths))
        grad = per_window(grad, len(self.lengths))
        for row, length in enumerate(self.lengths):
            g = grad[row, :length].float()
            x = inputs[row, :length].float()
            torch.mm(g.t(), x, out=buffer)
            total.add_(buffer.abs_())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def length_groups(batch: PromptBatch, batch_size: int) -> Iterator[list[int]]:
    """Rows with counted targets, longest first, in groups of ``batch_size``."""
    labels = batch.labels()
    rows = [
        row
        for row in range(batch.input_ids.shape[0])
        if bool((labels[row, 1 : int(batch.lengths[row])] != -100).any())
    ]
    yield from _longest_first(batch, rows, batch_size)


def _longest_first(batch: PromptBatch, rows: list[int], batch_size: int) -> Iterator[list[int]]:
    """``rows``, longest first, in groups of ``batch_size``."""
    rows = sorted(rows, key=lambda row: -int(batch.lengths[row]))
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size]


def _summed_sample_losses(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor):
    """Sum over rows of each row's mean next-token loss over the targets its labels count."""
    targets = labels[:, 1:]
    keep = torch.nonzero((targets != -100).any(dim=0)).squeeze(1)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    if logits.shape[1] != keep.numel():  # a model that ignores logits_to_keep
        logits = logits[:, keep]
    picked = targets[:, keep]
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        picked.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(picked.shape)
    return (nll.sum(dim=1) / (picked != -100).sum(dim=1)).sum()


def gradient_magnitudes(
    model: nn.Module,
    batch: PromptBatch,
    device: torch.device | str = "cpu",
    progress: bool = True,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``sum_s |dL_s/dW|`` per prunable layer, keyed by full name, shaped (out, in), fp32.

    ``L_s`` is sample ``s``'s mean next-token loss over the tokens its mask counts;
    ``batch_size`` samples share one forward and one backward pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    layers = dict(iter_prunable(model))
    home = next(model.parameters()).device
    trainable = {param: param.requires_grad for param in model.parameters()}
    labels = batch.labels()
    model.requires_grad_(False)
    model.to(device)
    recorder = _PerSampleAbsGrad(layers, device)
    # gradients must flow from the embeddings on, though no weight requires them
    start = model.get_input_embeddings().register_forward_hook(
        lambda _module, _args, output: output.requires_grad_(True)
    )
    try:
        groups = list(length_groups(batch, batch_size))
        for rows in tqdm(groups, desc="gradients", disable=not progress):
            recorder.lengths = [int(batch.lengths[row]) for row in rows]
            width = recorder.lengths[0]
            ids = batch.input_ids[rows, :width].to(device)
            target = labels[rows, :width].to(device)
            _summed_sample_losses(model, ids, target).backward()
    finally:
        start.remove()
        recorder.remove()
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        model.to(home)
    return {name: total.contiguous() for name, total in recorder.sums.items()}


class _SquaredInputs:
    """Hooks that add each layer's squared inputs at the counted tokens, per feature."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device) -> None:
        self.sums = {
            name: torch.zeros(weight_matrix(layer).shape[1], dtype=torch.float64, device=device)
            for name, layer in layers.items()
        }
        self.mask: torch.Tensor | None = None
        self.handles = [
            layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()
        ]

    def _hook(self, name: str):
        def hook(_module, args, _output):
            inputs = args[0].detach()
            counted = inputs.reshape(-1, inputs.shape[-1])[self.mask.reshape(-1)]
            self.sums[name].add_(counted.double().square().sum(dim=0))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def activation_means(
    model: nn.Module,
    batch: PromptBatch,
    device: torch.device | str = "cpu",
    progress: bool = True,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Mean over the batch's counted tokens of every prunable layer's squared input, per input
    feature, keyed by full layer name, shape (in,), fp32; from whole-model forward passes.

    Padding never counts (it sits after a sample's tokens and outside its mask), so the result
    does not depend on ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    layers = dict(iter_prunable(model))
    home = next(model.parameters()).device
    model.to(device)
    recorder = _SquaredInputs(layers, device)
    rows = [row for row in range(batch.input_ids.shape[0]) if bool(batch.token_mask[row].any())]
    groups = list(_longest_first(batch, rows, batch_size))
    try:
        with torch.no_grad():
            for group in tqdm(groups, desc="activations", disable=not progress):
                width = int(batch.lengths[group[0]])
                recorder.mask = batch.token_mask[group, :width].to(device)
                model(input_ids=batch.input_ids[group, :width].to(device), use_cache=False)
    finally:
        recorder.remove()
        model.to(home)
    count = int(batch.token_mask[rows].sum()) if rows else 0
    if count == 0:
        raise ValueError("no counted token in the batch: nothing to take activation norms of")
    return {name: (total / count).float() for name, total in recorder.sums.items()}
