"""Perplexity with the reference formula, and sparsity verification."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from secateurs.model import find_blocks, find_linears, find_mlp_groups, iter_prunable, weight_matrix
from secateurs.patterns import NMSparsity, SparsityPattern, Unstructured, Variant


def window_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window in ``batch``, shape (batch,)."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll.mean(dim=1)


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
    seqlen = windows.shape[1]
    total = 0.0
    try:
        with torch.no_grad():
            bar = tqdm(total=windows.shape[0], desc=desc, disable=not progress, unit="win")
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                total += float((window_nll(model, batch) * seqlen).double().sum())
                bar.update(batch.shape[0])
            bar.close()
    finally:
        model.to(home)
    return float(torch.exp(torch.tensor(total / (windows.shape[0] * seqlen))))


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


def _neuron_violation(weight: torch.Tensor, role: str | None, ratio: float) -> str | None:
    """A producer must have the share of whole zero rows, a consumer of whole zero columns."""
    if role is None:
        return None
    lines = (weight == 0).all(dim=1 if role == "producer" else 0)
    need = int(weight.shape[1 if role == "consumer" else 0] * ratio)
    if int(lines.sum()) < need:
        kind = "rows" if role == "producer" else "columns"
        return f"{int(lines.sum())} all-zero {kind}, expected at least {need}"
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


def _mlp_roles(model: nn.Module) -> dict[str, str]:
    """``producer`` or ``consumer`` for every MLP layer of the decoder stack, by full name."""
    stack_name, blocks = find_blocks(model)
    roles = {}
    for index, block in enumerate(blocks):
        for group in find_mlp_groups(find_linears(block)):
            for name in group.producers:
                roles[f"{stack_name}.{index}.{name}"] = "producer"
            roles[f"{stack_name}.{index}.{group.consumer}"] = "consumer"
    return roles


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
            if pattern.structured:
                problem = _neuron_violation(weight, roles.get(name), ratio)
            else:
                problem = _pattern_violation(weight, pattern, per_layer.get(name, ratio))
            if problem:
                violations.append(f"{name}: {problem}")
    return SparsityCheck(layers, zeros / total if total else 0.0, violations)
