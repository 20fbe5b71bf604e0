"""Fine-tuning after pruning: LoRA (``peft``, merged back) or every weight, from the labels or
distilled from the dense model; pruned weights stay exactly zero.

Two uses: recovery after pruning (plain text or prompt/response data), and making a model
that refuses (``align`` refusals mixed with ``utility`` pairs). Weights that are exactly
zero before training are zero again after training: a merged LoRA update (or a full update)
is dense, so the mask is re-applied to every layer.

Distillation (Hinton et al., 2015; as in Sheared-LLaMA and Minitron's recovery) trains the
student on the teacher's whole next-token distribution instead of one label:
``kd_weight * T^2 * KL(teacher_T || student_T) + lm_weight * cross-entropy``. A shrunk model
(``secateurs shrink``) has other shapes than its teacher, but the same vocabulary, which is
all distillation needs.
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
from secateurs.core.patterns import zero_masked
from secateurs.data.prompts import PromptBatch
from secateurs.errors import SecateursError

TRAINED = ("lora", "full")


TEXT_DATA = "text"  # in --data: plain text windows of --dataset beside the pairs


@dataclass
class LoraOptions:
    """What to train (LoRA adapters or every weight), the optimiser and the loss.

    ``teacher`` (a model with the same vocabulary) turns on distillation: the loss is
    ``kd_weight`` times the temperature-scaled KL to the teacher plus ``lm_weight`` times the
    label loss. ``minutes`` bounds the training time: it stops after the step that passes it,
    or after ``steps``, whichever comes first.
    """

    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-4
    steps: int = 100
    batch_size: int = 8
    seed: int = 0
    train: str = "lora"
    kd_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    minutes: float | None = None

    def __post_init__(self) -> None:
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise SecateursError(f"--minutes must be a positive number, got {self.minutes}")
        if self.train not in TRAINED:
            raise SecateursError(f"--train must be lora or full, got '{self.train}'")
        for flag, weight in (("--kd_weight", self.kd_weight), ("--lm_weight", self.lm_weight)):
            if not (weight >= 0 and math.isfinite(weight)):
                raise SecateursError(f"{flag} must be 0 or more, got {weight}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise SecateursError(f"--temperature must be positive, got {self.temperature}")
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
            zero_masked(weight_matrix(layer), masks[name].to(layer.weight.device))
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


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)`` averaged over the tokens that have a label.

    Logits are (batch, tokens, vocab) and predict the next token, like the label loss, so the
    last position and every ``-100`` label are left out.
    """
    counted = labels[:, 1:] != -100
    student = student[:, :-1][counted].float() / temperature
    teacher = teacher[:, :-1][counted].float() / temperature
    kl = nn.functional.kl_div(
        nn.functional.log_softmax(student, dim=-1),
        nn.functional.log_softmax(teacher, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return kl * temperature**2


def _trainable(model: nn.Module, options: LoraOptions) -> nn.Module:
    """The model with LoRA adapters on every block linear, or itself with every weight
    trainable."""
    if options.train == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=0.0,
        target_modules=target_modules(model),
        fan_in_fan_out=any(is_conv1d(layer) for _, layer in iter_prunable(model)),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft reads an attribute transformers has deprecated; nothing a user can change
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        return get_peft_model(model, config)


def finetune(
    model: nn.Module,
    batch: PromptBatch,
    options: LoraOptions | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> tuple[nn.Module, FinetuneReport]:
    """Train on ``batch`` (loss on its masked tokens; distilled from ``teacher`` if given),
    merge LoRA back if that was trained, restore the zeros."""
    options = options or LoraOptions()
    batch = trainable_rows(batch)
    device = torch.device(device)
    masks = zero_masks(model)
    home = next(model.parameters()).device
    torch.manual_seed(options.seed)
    peft_model = _trainable(model, options).to(device)
    if teacher is not None:
        check_teacher(model, teacher)
        teacher = teacher.to(device).eval()
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    count = batch.input_ids.shape[0]
    losses: list[float] = []
    start = time.perf_counter()
    deadline = None if options.minutes is None else start + 60 * options.minutes
    for _ in tqdm(range(options.steps), desc="fine-tuning", disable=not progress):
        if deadline is not None and losses and time.perf_counter() >= deadline:
            break
        rows = torch.randperm(count, generator=generator)[: options.batch_size]
        ids, labels = _minibatch(batch, rows)
        ids, labels = ids.to(device), labels.to(device)
        output = peft_model(input_ids=ids, labels=labels)
        loss = output.loss
        if teacher is not None:
            with torch.no_grad():
                target = teacher(input_ids=ids).logits
            kd = distillation_loss(output.logits, target, labels, options.temperature)
            loss = options.kd_weight * kd + options.lm_weight * loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    if teacher is not None:
        teacher.to(home)
    merged = peft_model if options.train == "full" else peft_model.merge_and_unload()
    merged = merged.eval().to(home)
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    kept = reapply(merged, masks)
    window = max(1, min(10, len(losses) // 4))
    report = FinetuneReport(
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
        steps=len(losses),
        seconds=time.perf_counter() - start,
        kept_zeros=kept,
    )
    return merged, report


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """A teacher must score the same vocabulary as the student."""
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
    if sizes[0] != sizes[1]:
        raise SecateursError(
            f"the teacher's vocabulary ({sizes[1]} tokens) differs from the model's "
            f"({sizes[0]}); distil from the model this one was pruned from"
        )


def training_batch(
    tokenizer,
    data: list[str],
    dataset: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> PromptBatch:
    """Prompt/response pairs from every name in ``data`` (``nsamples`` each), else text windows.

    The name ``text`` among them stands for ``nsamples`` plain text windows of ``dataset``:
    mixed into prompt/response data, they keep the model's language modelling where the
    pairs alone would drift it (a refusal tune costs perplexity without them).
    """
    from secateurs.data import prompts
    from secateurs.data import text as text_data

    def windows() -> PromptBatch:
        source = text_data.resolve_source(dataset)
        return prompts.text_batch(
            text_data.calibration_windows(tokenizer, source, nsamples, seqlen, seed)
        )

    if not data:
        return windows()
    pair_names = [name for name in data if name != TEXT_DATA]
    batches = []
    if pair_names:
        pairs = []
        for name in pair_names:
            pairs += prompts.sample_pairs(prompts.load_pairs(name), nsamples, seed)
        batches.append(prompts.encode_pairs(tokenizer, pairs, seqlen))
    if TEXT_DATA in data:
        batches.append(windows())
    return prompts.join_batches(batches, prompts.pad_id(tokenizer))
