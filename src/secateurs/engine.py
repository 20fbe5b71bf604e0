"""The block-by-block loop: calibrate -> score -> mask -> propagate, for every method.

This is the only module that knows about hooks, devices and the order of blocks. The model
stays where it was loaded; one block at a time moves to the compute device, so the memory
needed beyond the model is one block plus two buffers of calibration activations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.errors import SecateursError
from secateurs.model import (
    BlockInputs,
    block_output,
    capture_block_inputs,
    find_blocks,
    find_linears,
    find_mlp_groups,
    weight_matrix,
)
from secateurs.patterns import SparsityPattern
from secateurs.recovery import LayerRecovery, WeightRedistributor
from secateurs.stats import ActivationStats, StatsRequest, token_classes

MetricFn = Callable[[nn.Module, "ActivationStats | None"], torch.Tensor]


@dataclass
class LayerRecord:
    """What happened to one linear layer."""

    block: str
    sublayer: str
    shape: tuple[int, int]
    pruned: int
    recovery: LayerRecovery | None = None

    @property
    def name(self) -> str:
        return f"{self.block}.{self.sublayer}"

    @property
    def sparsity(self) -> float:
        return self.pruned / (self.shape[0] * self.shape[1])


@dataclass
class PruneReport:
    """Per-layer records and where the time went."""

    layers: list[LayerRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(
        default_factory=lambda: {
            "capture": 0.0,
            "calibrate": 0.0,
            "score": 0.0,
            "recover": 0.0,
            "propagate": 0.0,
        }
    )

    def mean_relative_error(self) -> dict[str, float] | None:
        """Mean over layers of the relative output error before and after recovery."""
        done = [r.recovery for r in self.layers if r.recovery is not None]
        if not done:
            return None
        return {
            "before": sum(r.relative_error_before for r in done) / len(done),
            "after": sum(r.relative_error_after for r in done) / len(done),
        }

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(r) | {"name": r.name, "sparsity": r.sparsity} for r in self.layers],
            "seconds": dict(self.seconds),
            "recovery_mean_relative_error": self.mean_relative_error(),
        }


def run_block(
    block: nn.Module,
    inputs: BlockInputs,
    batch_size: int,
    keep_outputs: bool,
    before_batch: Callable[[slice], None] | None = None,
) -> torch.Tensor | None:
    """Send every calibration window through ``block`` in batches."""
    hidden = inputs.hidden
    outputs = torch.empty_like(hidden) if keep_outputs else None
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch_size):
            if before_batch is not None:
                before_batch(slice(start, start + batch_size))
            batch = hidden[start : start + batch_size]
            args, kwargs = inputs.call_args(batch.shape[0])
            result = block_output(block(batch, *args, **kwargs))
            if outputs is not None:
                outputs[start : start + batch.shape[0]] = result
    return outputs


def _calibrate(
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: BlockInputs,
    batch_size: int,
    request: StatsRequest,
    labels: torch.Tensor | None,
    token_mask: torch.Tensor | None = None,
) -> dict[str, ActivationStats]:
    """One pass through the unpruned block, accumulating every layer's input statistics."""
    device = inputs.hidden.device
    stats = {
        name: ActivationStats(weight_matrix(layer).shape[1], device, request)
        for name, layer in layers.items()
    }
    # Layers fed the very same tensor (q/k/v, gate/up) share one set of statistics: the last
    # input is held, so an identity match can never be a freed tensor's reused memory.
    last: dict[str, object] = {"input": None, "owner": None, "labels": None, "keep": None}
    shares: dict[str, str] = {}

    def next_batch(rows: slice) -> None:
        last["labels"] = None if labels is None else labels[rows].to(device)
        last["keep"] = None if token_mask is None else token_mask[rows].to(device)

    def observe(name: str, x: torch.Tensor) -> None:
        if name in shares:
            return
        if x is last["input"]:
            shares[name] = last["owner"]
            return
        last["input"], last["owner"] = x, name
        stats[name].add_batch(x, last["labels"], last["keep"])

    handles = [
        layer.register_forward_hook(lambda _m, args, _out, n=name: observe(n, args[0]))
        for name, layer in layers.items()
    ]
    try:
        run_block(block, inputs, batch_size, keep_outputs=False, before_batch=next_batch)
    finally:
        for handle in handles:
            handle.remove()
    for name, owner in shares.items():
        stats[name] = stats[owner]
    return stats


def check_pattern_fits(model: nn.Module, pattern: SparsityPattern) -> None:
    """Fail before any work if some layer cannot take the pattern."""
    stack_name, blocks = find_blocks(model)
    layers = find_linears(blocks[0])
    for name, layer in layers.items():
        pattern.check_columns(weight_matrix(layer).shape[1], f"{stack_name}.0.{name}")
    if pattern.structured and not find_mlp_groups(layers):
        raise SecateursError(
            f"found no MLP in {stack_name}.0 (layers: {', '.join(layers)}), so there are no "
            "neurons to remove; use unstructured or N:M sparsity"
        )


def _layer_masks(
    layers: dict[str, nn.Module],
    stats: dict[str, ActivationStats],
    metric_fn: MetricFn,
    pattern: SparsityPattern,
    ratio: float,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, score, mask)`` of every layer the pattern prunes, in block order.

    A structured pattern masks each MLP consumer's columns, and the same neurons' rows of
    its producers; the other layers are left dense.
    """
    if not pattern.structured:
        for name, layer in layers.items():
            score = metric_fn(layer, stats.get(name))
            yield name, score, pattern.create_mask(score, ratio)
        return
    for group in find_mlp_groups(layers):
        scores = {name: metric_fn(layers[name], stats.get(name)) for name in group.names}
        consumer_mask = pattern.create_mask(scores[group.consumer], ratio)
        neurons = consumer_mask[0]
        for name in group.producers:
            yield name, scores[name], neurons.unsqueeze(1).expand_as(scores[name]).clone()
        yield group.consumer, scores[group.consumer], consumer_mask


def prune_sequential(
    model: nn.Module,
    windows: torch.Tensor | None,
    metric_fn: MetricFn,
    pattern: SparsityPattern,
    sparsity_ratio: float,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    calibrated: bool = True,
    progress: bool = True,
    redistributor: WeightRedistributor | None = None,
    request: StatsRequest | None = None,
    token_mask: torch.Tensor | None = None,
) -> PruneReport:
    """Prune every linear layer of every decoder block, in block order.

    With ``calibrated``, block ``i`` is scored on the outputs of the already-pruned blocks
    ``0..i-1``: all its layers see the unpruned block's activations, all are pruned (and
    recovered, with a ``redistributor``), then the windows run through the pruned block to
    become the next block's inputs. ``request`` names the statistics the scores need
    beyond Wanda's norms; with token classes, tokens are labelled from ``windows``.
    ``token_mask`` (same shape as ``windows``) limits the statistics to the tokens it marks.
    """
    device = torch.device(device)
    check_pattern_fits(model, pattern)
    calibrated = calibrated or redistributor is not None
    if calibrated and (windows is None or windows.shape[0] == 0):
        raise ValueError("this method needs calibration windows")
    request = request or StatsRequest()
    if redistributor is not None:
        request = request.merge(redistributor.request)
    labels = token_classes(windows, request.classes) if request.classes else None
    report = PruneReport()
    stack_name, blocks = find_blocks(model)
    inputs = None
    if calibrated:
        start = time.perf_counter()
        inputs = capture_block_inputs(model, windows, device, batch_size)
        report.seconds["capture"] += time.perf_counter() - start
    for index, block in enumerate(tqdm(blocks, desc="pruning blocks", disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        layers = find_linears(block)
        stats: dict[str, ActivationStats] = {}
        if inputs is not None:
            start = time.perf_counter()
            stats = _calibrate(block, layers, inputs, batch_size, request, labels, token_mask)
            report.seconds["calibrate"] += time.perf_counter() - start
        start = time.perf_counter()
        for name, score, mask in _layer_masks(layers, stats, metric_fn, pattern, sparsity_ratio):
            weight = weight_matrix(layers[name])
            mask = mask.to(weight.device)
            record = LayerRecord(
                f"{stack_name}.{index}", name, tuple(weight.shape), int(mask.sum())
            )
            if redistributor is None:
                weight.masked_fill_(mask, 0)
                report.seconds["score"] += time.perf_counter() - start
            else:
                report.seconds["score"] += time.perf_counter() - start
                start = time.perf_counter()
                record.recovery = redistributor.apply(weight, mask, score, stats[name])
                report.seconds["recover"] += time.perf_counter() - start
            report.layers.append(record)
            start = time.perf_counter()
        if inputs is not None:
            start = time.perf_counter()
            inputs.hidden = run_block(block, inputs, batch_size, keep_outputs=True)
            report.seconds["propagate"] += time.perf_counter() - start
        block.to(home)
    return report
