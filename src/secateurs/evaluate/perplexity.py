"""Perplexity with the reference formula, and sparsity verification."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from secateurs.core.model import (
    find_blocks,
    find_linears,
    find_mlp_groups,
    iter_prunable,
    weight_matrix,
)
from secateurs.core.patterns import NMSparsity, SparsityPattern, Unstructured, Variant

# Logits of at most this many bytes (fp32) exist at once: for a 511-token window, 32k of
# Gemma's 262k vocabulary entries.
LOGIT_CHUNK_BYTES = 64 * 2**20


def full_logits_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window from the model's whole logits, shape (batch,)."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
    targets = batch[:, 1:]
    # over the last dimension: cross-entropy over a transposed fp32 tensor drifts by ~1e-4
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return nll.view(targets.shape).mean(dim=1)


def _finish_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What causal LMs do to the head's output before returning it (Gemma's soft-capping)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass(frozen=True)
class HeadRows:
    """Where the sliced head computation reads rows ``[start, stop)`` of the head's weight.

    ``budget`` (``LOGIT_CHUNK_BYTES`` if None) bounds the bytes of one slice's fp32 logits
    plus, when ``copies`` (the rows are read from elsewhere, such as the checkpoint of a
    streamed model), its weight rows.
    """

    read: Callable[[int, int], torch.Tensor]
    budget: int | None = None
    copies: bool = False

    def step(self, head: nn.Linear, tokens: int) -> int:
        """Vocabulary entries per slice, so one slice stays in budget."""
        row = head.in_features * head.weight.element_size() if self.copies else 0
        return max(1, (self.budget or LOGIT_CHUNK_BYTES) // (4 * tokens + row))


def _own_rows(head: nn.Linear) -> HeadRows:
    return HeadRows(lambda start, stop: head.weight[start:stop])


class _HeadInput:
    """Holds what the output head was given, and lets the head compute the last token only.

    The model then returns just the last position's logits, made its own way; the chunked
    computation is checked against them, so a model that changes its logits in a way this
    module does not know falls back to the whole logits instead of a wrong number.
    """

    def __init__(self, head: nn.Module) -> None:
        self.hidden: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self)

    def __call__(self, _module, args):
        if len(args) != 1 or self.hidden is not None:
            return None
        self.hidden = args[0]
        return (args[0][:, -1:, :],)


def _sliced_nll(
    model: nn.Module, head: nn.Linear, rows: HeadRows, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """NLL of every target from the head applied one slice of the vocabulary at a time.

    Slicing the vocabulary, not the tokens, reads each row of the head's weight once (it is
    the largest matrix of a small model with a large vocabulary); log-sum-exp is combined
    across slices, and each target's logit is taken from the slice that holds it.
    """
    vocab = head.out_features
    step = rows.step(head, hidden.shape[0] * hidden.shape[1])
    lse = torch.full(targets.shape, float("-inf"), device=hidden.device)
    picked = torch.zeros(targets.shape, device=hidden.device)
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        bias = None if head.bias is None else head.bias[start:stop]
        weight = rows.read(start, stop)
        logits = _finish_logits(model, F.linear(hidden, weight, bias)).float()
        del weight
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        inside = (targets >= start) & (targets < stop)
        index = (targets - start).clamp(0, stop - start - 1).unsqueeze(-1)
        picked += torch.where(inside, logits.gather(-1, index).squeeze(-1), 0.0)
    return lse - picked


@contextlib.contextmanager
def _probe_head(head: nn.Linear, weight: torch.Tensor | None) -> Iterator[None]:
    """The head computes with ``weight`` (its first rows) instead of its own, if given."""
    if weight is None:
        yield
        return
    own_weight, own_bias = head.weight, head.bias
    head.weight = nn.Parameter(weight, requires_grad=False)
    if own_bias is not None:
        head.bias = nn.Parameter(own_bias[: weight.shape[0]], requires_grad=False)
    try:
        yield
    finally:
        head.weight, head.bias = own_weight, own_bias


def chunked_nll(
    model: nn.Module, batch: torch.Tensor, rows: HeadRows | None = None
) -> torch.Tensor | None:
    """Mean next-token NLL of each window, the head applied to a slice of the vocabulary at a
    time, so no more than ``LOGIT_CHUNK_BYTES`` of logits exist at once.

    None when the model's own last-token logits disagree with the sliced ones (or its head is
    not a linear layer it calls), so the caller can use the whole logits. With ``rows`` the
    head's weight is read from there; the model's own check then runs on the first slice of
    the vocabulary only, so the whole head is never needed at once.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None
    probe = None
    if rows is not None:
        probe = rows.read(0, min(head.out_features, rows.step(head, batch.shape[1])))
    else:
        rows = _own_rows(head)
    capture = _HeadInput(head)
    try:
        with _probe_head(head, probe):
            last = model(input_ids=batch, use_cache=False).logits
            hidden = capture.hidden
            if hidden is None or last.shape[1] != 1 or hidden.shape[1] != batch.shape[1]:
                return None
            own = _finish_logits(model, head(hidden[:, -1:, :])).float()
    finally:
        capture.handle.remove()
    if own.shape != last.shape or not torch.allclose(own, last.float(), rtol=1e-4, atol=1e-4):
        return None
    return _sliced_nll(model, head, rows, hidden[:, :-1, :], batch[:, 1:]).mean(dim=1)


def window_nll(model: nn.Module, batch: torch.Tensor, rows: HeadRows | None = None) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window in ``batch``, shape (batch,).

    The vocabulary-wide logits are never all held at once (see :func:`chunked_nll`).
    """
    nll = chunked_nll(model, batch, rows)
    if nll is None:
        warnings.warn(
            f"{type(model).__name__}'s output head is not a plain linear layer, or the model "
            "changes its logits in a way secateurs does not know; evaluating from its whole "
            "logits (more memory)",
            stacklevel=2,
        )
        nll = full_logits_nll(model, batch)
    return nll


class PerplexityAccumulator:
    """``exp(sum_w seqlen * nll_w / (windows * seqlen))`` over the per-window NLL added."""

    def __init__(self, seqlen: int) -> None:
        self.seqlen = seqlen
        self.total = 0.0
        self.windows = 0

    def add(self, nll: torch.Tensor) -> None:
        """Add one batch's mean NLL per window, shape (batch,)."""
        self.total += float((nll * self.seqlen).double().sum())
        self.windows += nll.shape[0]

    def value(self) -> float:
        """The perplexity of every window added so far."""
        return float(torch.exp(torch.tensor(self.total / (self.windows * self.seqlen))))


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """``exp(sum_w seqlen * nll_w / (windows * seqlen))``, the reference Wanda formula."""
    device = torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    accumulator = PerplexityAccumulator(windows.shape[1])
    try:
        with torch.no_grad():
            bar = tqdm(total=windows.shape[0], desc=desc, disable=not progress, unit="win")
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                accumulator.add(window_nll(model, batch))
                bar.update(batch.shape[0])
            bar.close()
    finally:
        model.to(home)
    return accumulator.value()


@dataclass
class SparsityCheck:
    """Measured sparsity per layer and overall, and whether each layer meets its pattern."""

    layers: dict[str, float]
    overall: float
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"overall": self.overall, "layers": self.layers, "violations": self.violations}


def _neuron_violation(
    weight: torch.Tensor, role: tuple[str, int] | None, ratio: float
) -> str | None:
    """A producer must have the share of whole zero rows, a consumer of whole zero columns.

    ``role`` is ``producer`` or ``consumer`` and the rows per neuron (2 for a fused gate_up).
    """
    if role is None:
        return None
    kind, parts = role
    producer = kind == "producer"
    lines = (weight == 0).all(dim=1 if producer else 0)
    need = parts * int(weight.shape[0 if producer else 1] // parts * ratio)
    if int(lines.sum()) < need:
        return (
            f"{int(lines.sum())} all-zero {'rows' if producer else 'columns'}, "
            f"expected at least {need}"
        )
    return None


def _pattern_violation(weight: torch.Tensor, pattern: SparsityPattern, ratio: float) -> str | None:
    zeros = weight == 0
    rows, cols = weight.shape
    if isinstance(pattern, Variant):
        # the variant's bisection stops within 0.001 of the target or when its bracket closes
        need = int(weight.numel() * (ratio - 0.002))
        if int(zeros.sum()) < need:
            return f"{int(zeros.sum())} zeros, expected about {int(weight.numel() * ratio)}"
        return None
    if isinstance(pattern, NMSparsity):
        per_group = zeros.reshape(rows, cols // pattern.m, pattern.m).sum(dim=2)
        if bool((per_group < pattern.n).any()):
            return f"groups with fewer than {pattern.n} zeros in {pattern.m}"
        return None
    if isinstance(pattern, Unstructured) and pattern.scope == "row":
        need = int(cols * ratio)
        if bool((zeros.sum(dim=1) < need).any()):
            return f"rows with fewer than {need} zeros of {cols}"
        return None
    need = int(weight.numel() * ratio)
    if int(zeros.sum()) < need:
        return f"{int(zeros.sum())} zeros, expected at least {need}"
    return None


def layer_violation(
    weight: torch.Tensor, pattern: SparsityPattern, role: tuple[str, int] | None, ratio: float
) -> str | None:
    """How a pruned layer misses ``pattern`` at ``ratio`` (``role``: its MLP role), or None."""
    if pattern.structured:
        return _neuron_violation(weight, role, ratio)
    return _pattern_violation(weight, pattern, ratio)


def block_mlp_roles(block: nn.Module) -> dict[str, tuple[str, int]]:
    """``producer`` or ``consumer``, and rows per neuron, for a block's MLP layers by name."""
    roles = {}
    for group in find_mlp_groups(find_linears(block)):
        for name in group.producers:
            roles[name] = ("producer", group.parts_of(name))
        roles[group.consumer] = ("consumer", 1)
    return roles


def _mlp_roles(model: nn.Module) -> dict[str, tuple[str, int]]:
    """:func:`block_mlp_roles` for every block of the decoder stack, by full name."""
    stack_name, blocks = find_blocks(model)
    return {
        f"{stack_name}.{index}.{name}": role
        for index, block in enumerate(blocks)
        for name, role in block_mlp_roles(block).items()
    }


def _layer_ratios(model: nn.Module, block_ratios: list[float]) -> dict[str, float]:
    """Each decoder-block layer's full name mapped to its block's ratio."""
    stack_name, blocks = find_blocks(model)
    return {
        f"{stack_name}.{index}.{name}": block_ratios[index]
        for index, block in enumerate(blocks)
        for name in find_linears(block)
    }


def check_sparsity(
    model: nn.Module,
    pattern: SparsityPattern | None = None,
    ratio: float = 0.0,
    block_ratios: list[float] | None = None,
) -> SparsityCheck:
    """Count zeros in every prunable layer; with a pattern, check each layer meets it.

    Zeros that were already in the dense weights count too, so "at least" is the test.
    ``block_ratios`` (one per decoder block) replace ``ratio`` for the blocks' layers.
    """
    layers: dict[str, float] = {}
    violations: list[str] = []
    zeros = total = 0
    roles = _mlp_roles(model) if pattern is not None and pattern.structured else {}
    per_layer = _layer_ratios(model, block_ratios) if block_ratios is not None else {}
    for name, layer in iter_prunable(model):
        weight = weight_matrix(layer)
        count = int((weight == 0).sum())
        layers[name] = count / weight.numel()
        zeros += count
        total += weight.numel()
        if pattern is not None:
            problem = layer_violation(weight, pattern, roles.get(name), per_layer.get(name, ratio))
            if problem:
                violations.append(f"{name}: {problem}")
    return SparsityCheck(layers, zeros / total if total else 0.0, violations)
