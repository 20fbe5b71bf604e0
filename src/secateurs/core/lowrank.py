"""The block loop of low-rank edits: every linear layer of a block rewritten from its inputs'
Gram on several prompt streams at once (ActSVD's utility and safety data).

Blocks go in order. Each stream's hidden states pass once through the block as it is, giving
every layer's ``X^T X`` over the stream's counted tokens; the update rewrites the block's
weights; then every stream goes on through the edited block, so later blocks see the edits
before them, as in the reference code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.core.engine import calibrate_block, run_block
from secateurs.core.model import capture_block_inputs, find_blocks, find_linears, weight_matrix
from secateurs.core.stats import StatsRequest
from secateurs.data.prompts import PromptBatch

# name, weight (out x in), {stream: gram} -> (new weight, what the update reports)
GramUpdate = Callable[[str, torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, Any]]


def edit_by_grams(
    model: nn.Module,
    streams: dict[str, PromptBatch],
    update: GramUpdate,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Rewrite every prunable layer with ``update`` from its inputs' Gram on each stream;
    what ``update`` reported, by full layer name."""
    device = torch.device(device)
    stack, blocks = find_blocks(model)
    inputs = {
        key: capture_block_inputs(model, batch.input_ids, device, batch_size)
        for key, batch in streams.items()
    }
    request = StatsRequest(gram=True)
    reports: dict[str, Any] = {}
    home = next(model.parameters()).device
    for index, block in enumerate(tqdm(blocks, desc="low-rank edit", disable=not progress)):
        block.to(device)
        layers = find_linears(block)
        grams = {
            key: calibrate_block(
                block,
                layers,
                inputs[key],
                batch_size,
                request,
                None,
                index=index,
                token_mask=streams[key].token_mask,
            )
            for key in streams
        }
        with torch.no_grad():
            for name, layer in layers.items():
                weight = weight_matrix(layer)
                full = f"{stack}.{index}.{name}"
                new, reports[full] = update(
                    full, weight, {k: g[name].gram for k, g in grams.items()}
                )
                weight.copy_(new)
        for key in streams:
            run_block(block, inputs[key], batch_size, keep_outputs=True, index=index)
        block.to(home)
    return reports
