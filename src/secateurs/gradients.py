"""The gradient scoring pass behind ``wandg``: ``sum over samples of |dL/dW|`` for every layer.

Unlike activation statistics this needs the whole model's loss, so it is a separate pass
(one forward and one backward per sample, all layers at once) whose result feeds the same
mask and pruning code as every other method.

Memory: each prunable weight gets a ``post_accumulate_grad`` hook that adds ``|grad|`` into
a per-layer fp32 accumulator and frees ``.grad`` at once, so at most one layer's gradient is
alive beside the accumulators (one model's worth of fp32); nothing else requires grad, so no
other gradient is ever formed and there is no optimizer state. We chose hooks over
``torch.autograd.grad`` per block because they keep a single ordinary backward pass through
the model, whatever its architecture, with no block-boundary bookkeeping.

The absolute value is taken per sample before summing, as the reference implementation of
Wei et al. (2024) does (it runs one sample per backward and adds ``weight.grad.abs()``), so
gradients of opposite sign on different samples do not cancel.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.model import is_conv1d, iter_prunable
from secateurs.prompts import PromptBatch


def gradient_magnitudes(
    model: nn.Module,
    batch: PromptBatch,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``sum_s |dL_s/dW|`` per prunable layer, keyed by full name, shaped (out, in), fp32.

    ``L_s`` is sample ``s``'s mean next-token loss over the tokens its mask counts.
    """
    device = torch.device(device)
    layers = dict(iter_prunable(model))
    home = next(model.parameters()).device
    trainable = {param: param.requires_grad for param in model.parameters()}
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def accumulate(param: torch.Tensor, name: str) -> None:
        sums[name].add_(param.grad.abs())
        param.grad = None

    model.requires_grad_(False)
    try:
        model.to(device)
        for name, layer in layers.items():
            weight = layer.weight
            sums[name] = torch.zeros(weight.shape, dtype=torch.float32, device=device)
            weight.requires_grad_(True)
            handles.append(
                weight.register_post_accumulate_grad_hook(lambda p, n=name: accumulate(p, n))
            )
        labels = batch.labels()
        rows = tqdm(range(batch.input_ids.shape[0]), desc="gradients", disable=not progress)
        for row in rows:
            length = int(batch.lengths[row])
            ids = batch.input_ids[row : row + 1, :length].to(device)
            target = labels[row : row + 1, :length].to(device)
            if not bool((target[:, 1:] != -100).any()):
                continue
            model(input_ids=ids, labels=target, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in trainable.items():
            param.requires_grad_(flag)
            param.grad = None
        model.to(home)
    return {
        name: (sums[name].t() if is_conv1d(layer) else sums[name]).contiguous()
        for name, layer in layers.items()
    }
