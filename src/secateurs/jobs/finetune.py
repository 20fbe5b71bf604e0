"""LoRA fine-tuning (``peft``), merged back into the weights; pruned weights stay exactly zero.

Two uses: recovery after pruning (plain text or prompt/response data), and making a model
that refuses (``align`` refusals mixed with ``utility`` pairs). Weights that are exactly
zero before training are zero again after the merge: the merged LoRA update is dense, so the
mask is re-applied to every merged layer.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.core.model import find_blocks, find_linears, is_conv1d, iter_prunable, weight_matrix
from secateurs.data.prompts import PromptBatch
from secateurs.errors import SecateursError


@dataclass
class LoraOptions:
    """LoRA and optimiser settings."""

    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-4
    steps: int = 100
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value in (("--rank", self.rank), ("--steps", self.steps)):
            if value <= 0:
                raise SecateursError(f"{flag} must be at least 1, got {value}")
        if self.batch_size <= 0:
            raise SecateursError(f"--batch_size must be at least 1, got {self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise SecateursError(f"--lr must be a positive number, got {self.lr}")


@dataclass
class FinetuneReport:
    """Loss at the start and end of training, and how long it took."""

    first_loss: float
    last_loss: float
    steps: int
    seconds: float
    kept_zeros: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def target_modules(model: nn.Module) -> list[str]:
    """Leaf names of the decoder blocks' linear layers (q_proj, up_proj, c_attn, ...)."""
    _, blocks = find_blocks(model)
    return sorted({name.rsplit(".", 1)[-1] for name in find_linears(blocks[0])})


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where every prunable weight is exactly zero, by full name."""
    return {name: weight_matrix(layer) == 0 for name, layer in iter_prunable(model)}


def reapply(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero the masked weights again; how many weights the masks hold."""
    with torch.no_grad():
        for name, layer in iter_prunable(model):
            weight_matrix(layer).masked_fill_(masks[name].to(layer.weight.device), 0)
    return int(sum(int(mask.sum()) for mask in masks.values()))


def trainable_rows(batch: PromptBatch) -> PromptBatch:
    """The samples with at least one counted target token (a cut response has none)."""
    keep = batch.token_mask[:, 1:].any(dim=1)
    if not bool(keep.any()):
        raise SecateursError("no sample has a response token within --seqlen; raise --seqlen")
    return PromptBatch(batch.input_ids[keep], batch.token_mask[keep], batch.lengths[keep])


def _minibatch(batch: PromptBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and labels of ``rows``, cut to their longest sample (the rest is padding)."""
    length = int(batch.lengths[rows].max())
    return batch.input_ids[rows, :length], batch.labels()[rows, :length]


def finetune(
    model: nn.Module,
    batch: PromptBatch,
    options: LoraOptions | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, FinetuneReport]:
    """Train LoRA adapters on ``batch`` (loss on its masked tokens), merge, restore zeros."""
    from peft import LoraConfig, get_peft_model

    options = options or LoraOptions()
    batch = trainable_rows(batch)
    device = torch.device(device)
    masks = zero_masks(model)
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=0.0,
        target_modules=target_modules(model),
        fan_in_fan_out=any(is_conv1d(layer) for _, layer in iter_prunable(model)),
        bias="none",
    )
    home = next(model.parameters()).device
    torch.manual_seed(options.seed)
    with warnings.catch_warnings():
        # peft reads an attribute transformers has deprecated; nothing a user can change
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft_model = get_peft_model(model, config).to(device)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    count = batch.input_ids.shape[0]
    losses: list[float] = []
    start = time.perf_counter()
    for _ in tqdm(range(options.steps), desc="fine-tuning", disable=not progress):
        rows = torch.randperm(count, generator=generator)[: options.batch_size]
        ids, labels = _minibatch(batch, rows)
        loss = peft_model(input_ids=ids.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    merged = peft_model.merge_and_unload().eval().to(home)
    kept = reapply(merged, masks)
    window = max(1, min(10, len(losses) // 4))
    report = FinetuneReport(
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
        steps=options.steps,
        seconds=time.perf_counter() - start,
        kept_zeros=kept,
    )
    return merged, report


def training_batch(
    tokenizer,
    data: list[str],
    dataset: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> PromptBatch:
    """Prompt/response pairs from every name in ``data`` (``nsamples`` each), else text windows."""
    from secateurs.data import prompts
    from secateurs.data import text as text_data

    if not data:
        source = text_data.resolve_source(dataset)
        return prompts.text_batch(
            text_data.calibration_windows(tokenizer, source, nsamples, seqlen, seed)
        )
    pairs = []
    for name in data:
        pairs += prompts.sample_pairs(prompts.load_pairs(name), nsamples, seed)
    return prompts.encode_pairs(tokenizer, pairs, seqlen)
