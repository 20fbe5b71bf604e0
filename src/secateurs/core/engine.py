"""The block-by-block loop: calibrate -> score -> mask -> propagate, for every method.

This is the only module that knows about hooks, devices and the order of blocks. The model
stays where it was loaded; one block at a time moves to the compute device, so the memory
needed beyond the model is one block plus one buffer of calibration activations.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.core.guard import ChannelAlarm, ChannelCollapseWarning, alarm_message, check_channels
from secateurs.core.model import (
    BlockInputs,
    StopForward,
    all_finite,
    block_output,
    capture_block_inputs,
    describe_non_finite,
    find_blocks,
    find_linears,
    find_mlp_groups,
    per_window,
    weight_matrix,
)
from secateurs.core.patterns import SparsityPattern, zero_masked
from secateurs.core.profiling import give_back_memory
from secateurs.core.recovery import (
    BlockReconstruction,
    LayerReconstruction,
    LayerRecovery,
    WeightRedistributor,
    output_error,
)
from secateurs.core.stats import ActivationStats, StatsRequest, token_classes
from secateurs.core.targets import (
    CombineTargets,
    Target,
    paired_target,
    reference_outputs,
    target_error,
    without_bias,
)
from secateurs.core.units import HeadLayout, find_attention, find_mlp, head_layout
from secateurs.errors import SecateursError

MetricFn = Callable[[nn.Module, "ActivationStats | None"], torch.Tensor]
# (weight, statistics, pattern, ratio, layer name) -> (new weight, prune mask)
Solver = Callable[
    [torch.Tensor, ActivationStats, SparsityPattern, float, str], tuple[torch.Tensor, torch.Tensor]
]
# (weight, statistics) -> score, for the outlier pass
LayerScore = Callable[[torch.Tensor, ActivationStats], torch.Tensor]


@dataclass
class LayerRecord:
    """What happened to one linear layer."""

    block: str
    sublayer: str
    shape: tuple[int, int]
    pruned: int
    recovery: LayerRecovery | None = None
    alarm: ChannelAlarm | None = None
    guarded: bool = False  # the channel guard looked at it (it needs activation statistics)

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
            "solve": 0.0,
            "propagate": 0.0,
            "reconstruct": 0.0,
        }
    )
    reconstruction: list[LayerReconstruction] = field(default_factory=list)
    block_ratios: list[float] | None = None
    allocation: dict | None = None

    def mean_relative_error(self) -> dict[str, float] | None:
        """Mean over layers of the relative output error before and after recovery."""
        done = [r.recovery for r in self.layers if r.recovery is not None]
        if not done:
            return None
        return {
            "before": sum(r.relative_error_before for r in done) / len(done),
            "after": sum(r.relative_error_after for r in done) / len(done),
        }

    def alarms(self) -> dict[str, ChannelAlarm]:
        """The channel guard's alarms, by layer name (see :mod:`secateurs.core.guard`)."""
        return {r.name: r.alarm for r in self.layers if r.alarm is not None}

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(r) | {"name": r.name, "sparsity": r.sparsity} for r in self.layers],
            "seconds": dict(self.seconds),
            "recovery_mean_relative_error": self.mean_relative_error(),
            "guard": (
                {name: asdict(alarm) for name, alarm in self.alarms().items()}
                if any(r.guarded for r in self.layers)
                else None
            ),
            "block_ratios": self.block_ratios,
            "allocation": self.allocation,
            "reconstruction": [asdict(r) for r in self.reconstruction] or None,
        }


def run_block(
    block: nn.Module,
    inputs: BlockInputs,
    batch_size: int,
    keep_outputs: bool,
    before_batch: Callable[[slice], None] | None = None,
    index: int = 0,
) -> torch.Tensor | None:
    """Send every calibration window through ``block`` (number ``index``) in batches.

    With ``keep_outputs`` each batch's output overwrites its own input in ``inputs.hidden``
    (batches never see each other), which is returned: one buffer of activations, not two.
    """
    hidden = inputs.hidden
    outputs = hidden if keep_outputs else None
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch_size):
            if before_batch is not None:
                before_batch(slice(start, start + batch_size))
            batch = hidden[start : start + batch_size]
            args, kwargs = inputs.call_args(batch.shape[0], index)
            if outputs is None:
                with contextlib.suppress(StopForward):
                    block(batch, *args, **kwargs)
                continue
            outputs[start : start + batch.shape[0]] = block_output(block(batch, *args, **kwargs))
    return outputs


def calibrate_block(
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: BlockInputs,
    batch_size: int,
    request: StatsRequest,
    labels: torch.Tensor | None,
    outputs: list[torch.Tensor] | None = None,
    index: int = 0,
    token_mask: torch.Tensor | None = None,
    parallel: DataParallel | None = None,
) -> dict[str, ActivationStats]:
    """One pass through the unpruned block, accumulating every layer's input statistics.

    Given an ``outputs`` list, the block's outputs of the same pass are appended to it;
    without one, each batch's forward pass stops as soon as every layer has seen its input
    (the block's last linear layer, and whatever follows it, never runs). In a ``parallel``
    run each batch's terms are kept, and combined across processes after the pass in the
    order one process would have folded them.
    """
    device = inputs.hidden.device
    keep_terms = parallel is not None
    stats = {
        name: ActivationStats(weight_matrix(layer).shape[1], device, request, keep_terms)
        for name, layer in layers.items()
    }
    # Layers fed the very same tensor (q/k/v, gate/up) share one set of statistics: the last
    # input is held, so an identity match can never be a freed tensor's reused memory.
    last: dict[str, object] = {
        "input": None,
        "owner": None,
        "labels": None,
        "keep": None,
        "windows": 0,
    }
    shares: dict[str, str] = {}
    seen: set[str] = set()

    def next_batch(rows: slice) -> None:
        last["labels"] = None if labels is None else labels[rows].to(device)
        last["keep"] = None if token_mask is None else token_mask[rows].to(device)
        last["windows"] = inputs.hidden[rows].shape[0]
        seen.clear()

    def observe(name: str, x: torch.Tensor) -> None:
        seen.add(name)
        if name not in shares:
            if x is last["input"]:
                shares[name] = last["owner"]
            else:
                last["input"], last["owner"] = x, name
                shaped = per_window(x, last["windows"])
                stats[name].add_batch(shaped, last["labels"], last["keep"])
        if outputs is None and len(seen) == len(layers):
            raise StopForward

    handles = [
        layer.register_forward_pre_hook(lambda _m, args, n=name: observe(n, args[0]))
        for name, layer in layers.items()
    ]
    try:
        result = run_block(
            block,
            inputs,
            batch_size,
            keep_outputs=outputs is not None,
            before_batch=next_batch,
            index=index,
        )
    finally:
        for handle in handles:
            handle.remove()
    if parallel is not None:
        parallel.reduce({name: s for name, s in stats.items() if name not in shares})
    for name, owner in shares.items():
        stats[name] = stats[owner]
    if outputs is not None:
        outputs.append(result)
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


def require_finite(tensor: torch.Tensor, what: str, layer: str) -> None:
    """Stop the run at ``layer`` if ``tensor`` (its ``what``) holds NaN or Inf.

    A mask chosen from such scores is arbitrary (NaN sorts last), and the run would go on to
    report and save a broken model. The weights were checked when loaded, so the cause is
    overflowing activations or a method's arithmetic.
    """
    if not all_finite(tensor):
        raise SecateursError(
            f"pruning stopped at {layer}: its {what} are not finite "
            f"({describe_non_finite(tensor)}); the activations overflow or hold NaN: run with "
            "--dtype float32 (float16 overflows easily), or check the model and the "
            "calibration data"
        )


def _score(
    metric_fn: MetricFn, layer: nn.Module, stats: ActivationStats | None, name: str
) -> torch.Tensor:
    score = metric_fn(layer, stats)
    require_finite(score, "scores", name)
    return score


def _layer_masks(
    layers: dict[str, nn.Module],
    stats: dict[str, ActivationStats],
    metric_fn: MetricFn,
    pattern: SparsityPattern,
    ratio: float,
    prefix: str,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, score, mask)`` of every layer the pattern prunes, in block order.

    A structured pattern masks each MLP consumer's columns, and the same neurons' rows of
    its producers; the other layers are left dense. Every score is checked finite before
    any mask is made from it.
    """
    if not pattern.structured:
        for name, layer in layers.items():
            score = _score(metric_fn, layer, stats.get(name), f"{prefix}.{name}")
            yield name, score, pattern.create_mask(score, ratio)
        return
    for group in find_mlp_groups(layers):
        scores = {
            name: _score(metric_fn, layers[name], stats.get(name), f"{prefix}.{name}")
            for name in group.names
        }
        consumer_mask = pattern.create_mask(scores[group.consumer], ratio)
        for name in group.producers:
            rows = group.producer_rows(name, consumer_mask[0])  # every fused part's row
            yield name, scores[name], rows.unsqueeze(1).expand_as(scores[name]).clone()
        yield group.consumer, scores[group.consumer], consumer_mask


def block_ratios(sparsity_ratio: float | Sequence[float], blocks: int) -> list[float]:
    """One ratio per block: a single ratio for all, or a list with one entry per block."""
    if isinstance(sparsity_ratio, (int, float)):
        return [float(sparsity_ratio)] * blocks
    ratios = [float(r) for r in sparsity_ratio]
    if len(ratios) != blocks:
        raise SecateursError(
            f"got {len(ratios)} per-block sparsity ratios for a model with {blocks} blocks; "
            "give one ratio per decoder block"
        )
    return ratios


def _solved_layers(
    layers: dict[str, nn.Module],
    stats: dict[str, ActivationStats],
    solver: Solver,
    pattern: SparsityPattern,
    ratio: float,
    prefix: str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Let ``solver`` prune and update every layer in place; ``(name, mask)`` in block order.

    A solver has no scores to check, so its statistics are checked before it runs (any
    non-finite activation makes the sum of squares non-finite) and its weights before they
    replace the layer's.
    """
    for name, layer in layers.items():
        weight = weight_matrix(layer)
        full = f"{prefix}.{name}"
        require_finite(stats[name].sq_norm, "activation statistics", full)
        new, mask = solver(weight, stats[name], pattern, ratio, full)
        require_finite(new, "weights from the solver", full)
        weight.copy_(new)
        yield name, mask


class BlockStore(Protocol):
    """Where the blocks' weights live when the model is not held in memory (see
    :mod:`secateurs.formats.streaming`): the engine asks for a block before it prunes it and hands
    it back after."""

    def capturing(self, windows: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """Make the modules that capturing the block inputs of ``windows`` runs hold real
        weights."""

    def load(self, index: int, block: nn.Module) -> None:
        """Give block ``index`` its weights."""

    def release(self, index: int, block: nn.Module) -> None:
        """Keep the pruned block ``index`` (write it out) and free its weights."""


@dataclass(frozen=True)
class DataParallel:
    """This process's share of the calibration windows (whole batches) and how the
    statistics of every process are combined (see :mod:`secateurs.jobs.distributed`)."""

    rows: slice
    reduce: Callable[[dict[str, ActivationStats]], None]
    combine_targets: CombineTargets | None = None


class MaskRefiner(Protocol):
    """Changes a layer's mask after the method chose it (DSnoT: :mod:`secateurs.methods.dsnot`),
    keeping the pattern; ``request`` names the statistics it reads."""

    request: StatsRequest

    def check(self, pattern: SparsityPattern) -> None:
        """Refuse a pattern it cannot keep."""

    def refine(
        self,
        weight: torch.Tensor,
        score: torch.Tensor,
        mask: torch.Tensor,
        stats: ActivationStats,
        pattern: SparsityPattern,
    ) -> torch.Tensor:
        """The new mask (True = pruned)."""


@dataclass
class BlockStep:
    """What pruning any one block needs, fixed for the whole run."""

    metric_fn: MetricFn
    pattern: SparsityPattern
    ratios: list[float]
    stack_name: str
    device: torch.device
    batch_size: int
    request: StatsRequest
    redistributor: WeightRedistributor | None = None
    solver: Solver | None = None
    labels: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    parallel: DataParallel | None = None
    refiner: MaskRefiner | None = None
    reconstruction: BlockReconstruction | None = None
    layout: HeadLayout | None = None


def output_layers(block: nn.Module, layout: HeadLayout | None) -> list[str]:
    """The sub-blocks' output layers in the order they run: attention's, then the MLP's."""
    names = []
    attention = find_attention(block, layout) if layout is not None else None
    if attention is not None:
        names.append(attention.consumer)
    mlp = find_mlp(block)
    if mlp is not None:
        names.append(mlp.consumer)
    return names


def _target(step, block, name, index, inputs, wanted, aim) -> Target | None:
    """A refit's target moments: products in float32 (float64 products are several times
    slower on a CPU), summed in float64."""
    combine = step.parallel.combine_targets if step.parallel is not None else None
    return paired_target(
        block, name, index, inputs, wanted, step.batch_size, aim, True, torch.float32, combine
    )


def reconstruct_block(
    step: BlockStep,
    block: nn.Module,
    original: nn.Module,
    index: int,
    inputs: BlockInputs,
    reference: BlockInputs,
    report: PruneReport,
) -> torch.Tensor:
    """Refit the block's output layers in turn on their surviving weights (see
    :class:`secateurs.core.recovery.BlockReconstruction`): the attention's to its unpruned
    output, the last (the MLP's) so that the block's output is the unpruned one. Returns the
    unpruned block's outputs on the ``reference`` stream."""
    assert step.reconstruction is not None
    names = output_layers(block, step.layout)
    wanted = reference_outputs(original, names, index, reference, step.batch_size)
    layers = find_linears(block)
    for position, name in enumerate(names):
        aim = "block" if position == len(names) - 1 else "layer"
        target = _target(step, block, name, index, inputs, wanted, aim)
        if target is None:  # no route from the layer to the block output to aim along
            aim = "layer"
            target = _target(step, block, name, index, inputs, wanted, aim)
        assert target is not None and target.gram is not None
        layer = layers[name]
        weight = weight_matrix(layer)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            target = without_bias(target, bias.detach())
        mask = weight == 0
        gram = target.gram.to(weight.device)
        new = step.reconstruction.solve(weight, mask, gram, target.cross.to(weight.device))
        full = f"{step.stack_name}.{index}.{name}"
        require_finite(new, "weights from the block reconstruction", full)
        energy = max(target.energy, 1e-30)
        before = target_error(output_error(weight, gram), weight, None, target)
        after = target_error(output_error(new, gram), new, None, target)
        if after > before:  # conjugate gradients stopped early on a badly scaled system
            new, after = weight.clone(), before
        weight.copy_(new)
        report.reconstruction.append(
            LayerReconstruction(full, aim, math.sqrt(before / energy), math.sqrt(after / energy))
        )
    return wanted.output


def train_block(
    step: BlockStep,
    block: nn.Module,
    index: int,
    inputs: BlockInputs,
    targets: torch.Tensor,
    report: PruneReport,
) -> None:
    """Train the surviving weights of the block's linear layers towards ``targets`` (the
    unpruned block's outputs), pruned weights held at zero (see
    :class:`secateurs.core.recovery.BlockReconstruction`). Batches come in a seeded order;
    the weights go back to what they were if the error on all windows did not fall."""
    spec = step.reconstruction
    assert spec is not None
    weights = [layer.weight for layer in find_linears(block).values()]
    masks = [w.detach() == 0 for w in weights]
    before = [w.detach().clone() for w in weights]
    trainable = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=spec.lr)
    order = torch.Generator().manual_seed(index)
    count = inputs.hidden.shape[0]
    starts = list(range(0, count, step.batch_size))

    def batch_loss(rows: torch.Tensor | slice) -> torch.Tensor:
        batch = inputs.hidden[rows]
        args, kwargs = inputs.call_args(batch.shape[0], index)
        out = block_output(block(batch, *args, **kwargs)).float()
        return (out - targets[rows].float()).square().sum()

    def total_error() -> float:
        with torch.no_grad():
            return sum(float(batch_loss(slice(start, start + step.batch_size))) for start in starts)

    energy = max(float(targets.float().square().sum()), 1e-30)
    start_error = total_error()
    try:
        for _ in range(spec.epochs):
            shuffled = torch.randperm(count, generator=order)
            for start in starts:
                rows = shuffled[start : start + step.batch_size]
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    (batch_loss(rows) / (rows.numel() * targets[0].numel())).backward()
                optimizer.step()
                with torch.no_grad():
                    for w, mask in zip(weights, masks, strict=True):
                        w.masked_fill_(mask, 0)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            p.grad = None
    end_error = total_error()
    if not end_error < start_error or not math.isfinite(end_error):
        with torch.no_grad():
            for w, old in zip(weights, before, strict=True):
                w.copy_(old)
        end_error = start_error
    report.reconstruction.append(
        LayerReconstruction(
            f"{step.stack_name}.{index}",
            "train",
            math.sqrt(start_error / energy),
            math.sqrt(end_error / energy),
        )
    )


def _apply_masks(
    step: BlockStep,
    layers: dict[str, nn.Module],
    stats: dict[str, ActivationStats],
    masks: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    prefix: str,
    report: PruneReport,
) -> None:
    """Zero (or redistribute) each layer's masked weights and record the layer."""
    start = time.perf_counter()
    for name, score, mask in masks:
        weight = weight_matrix(layers[name])
        mask = mask.to(weight.device)
        if step.refiner is not None:
            mask = step.refiner.refine(weight, score, mask, stats[name], step.pattern)
        record = LayerRecord(prefix, name, tuple(weight.shape), int(torch.count_nonzero(mask)))
        if name in stats:
            record.alarm = check_channels(score, stats[name].sq_norm)
            record.guarded = True
        if step.redistributor is None:
            zero_masked(weight, mask)
            report.seconds["score"] += time.perf_counter() - start
        else:
            report.seconds["score"] += time.perf_counter() - start
            start = time.perf_counter()
            record.recovery = step.redistributor.apply(weight, mask, score, stats[name])
            report.seconds["recover"] += time.perf_counter() - start
        report.layers.append(record)
        del score, mask
        start = time.perf_counter()


def prune_block(
    step: BlockStep,
    block: nn.Module,
    index: int,
    inputs: BlockInputs | None,
    report: PruneReport,
    propagate: bool = True,
    dense: BlockInputs | None = None,
) -> None:
    """Calibrate, prune (and recover) block ``index``, then propagate ``inputs`` through it
    (unless ``propagate`` is off: the last block's outputs feed nothing). With a block
    reconstruction the output layers are refit before propagation; ``dense`` is the dense
    model's stream, which the unpruned block then carries on.

    The block moves to the compute device for the step and back where it was after.
    """
    home = next(block.parameters()).device
    block.to(step.device)
    reconstructs = step.reconstruction is not None and inputs is not None
    original = copy.deepcopy(block) if reconstructs else None
    layers = find_linears(block)
    stats: dict[str, ActivationStats] = {}
    if inputs is not None:
        start = time.perf_counter()
        stats = calibrate_block(
            block,
            layers,
            inputs,
            step.batch_size,
            step.request,
            step.labels,
            index=index,
            token_mask=step.token_mask,
            parallel=step.parallel,
        )
        report.seconds["calibrate"] += time.perf_counter() - start
    prefix = f"{step.stack_name}.{index}"
    ratio = step.ratios[index]
    masks = _layer_masks(layers, stats, step.metric_fn, step.pattern, ratio, prefix)
    if step.solver is not None:
        masks = ()
        start = time.perf_counter()
        for name, mask in _solved_layers(layers, stats, step.solver, step.pattern, ratio, prefix):
            shape = tuple(weight_matrix(layers[name]).shape)
            report.layers.append(LayerRecord(prefix, name, shape, int(torch.count_nonzero(mask))))
        report.seconds["solve"] += time.perf_counter() - start
    _apply_masks(step, layers, stats, masks, prefix, report)
    del stats, masks
    if original is not None:
        assert inputs is not None and step.reconstruction is not None
        start = time.perf_counter()
        reference = dense if dense is not None else inputs
        wanted = reconstruct_block(step, block, original, index, inputs, reference, report)
        if dense is not None:  # the unpruned block's outputs are the dense stream's next step
            dense.hidden = wanted
        if step.reconstruction.epochs > 0:
            train_block(step, block, index, inputs, wanted, report)
        del wanted
        report.seconds["reconstruct"] += time.perf_counter() - start
        del original
    if inputs is not None and propagate:
        start = time.perf_counter()
        inputs.hidden = run_block(block, inputs, step.batch_size, True, index=index)
        report.seconds["propagate"] += time.perf_counter() - start
    block.to(home)
    # the forwards' activations and the layers' scores leave freed heap behind; trimming
    # once a block keeps resident memory flat (each trim walks the heap: not once a layer)
    give_back_memory()


def prune_sequential(
    model: nn.Module,
    windows: torch.Tensor | None,
    metric_fn: MetricFn,
    pattern: SparsityPattern,
    sparsity_ratio: float | Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    calibrated: bool = True,
    progress: bool = True,
    redistributor: WeightRedistributor | None = None,
    request: StatsRequest | None = None,
    solver: Solver | None = None,
    token_mask: torch.Tensor | None = None,
    store: BlockStore | None = None,
    parallel: DataParallel | None = None,
    refiner: MaskRefiner | None = None,
    reconstruction: BlockReconstruction | None = None,
) -> PruneReport:
    """Prune every linear layer of every decoder block, in block order.

    With ``calibrated``, block ``i`` is scored on the outputs of the already-pruned blocks
    ``0..i-1``: all its layers see the unpruned block's activations, all are pruned (and
    recovered, with a ``redistributor``), then the windows run through the pruned block to
    become the next block's inputs. ``request`` names the statistics the scores need
    beyond Wanda's norms; with token classes, tokens are labelled from ``windows``.
    ``sparsity_ratio`` is one ratio, or one per block (OWL). A ``solver`` replaces scoring,
    masking and recovery: it prunes and updates each layer itself (SparseGPT). Every
    scored layer goes through the channel guard; one warning per run names the layers it
    flags (:class:`secateurs.core.guard.ChannelCollapseWarning`). ``token_mask`` (same shape as
    ``windows``) limits the statistics to the tokens it marks. With a ``store`` the blocks'
    weights are read before and written after each block (the model is a skeleton); with
    ``parallel`` this process calibrates on its share of ``windows`` only and the
    statistics are combined with the other processes'. A ``refiner`` changes each layer's
    mask before it is applied (DSnoT). A ``reconstruction`` refits each block's output layers
    after it is pruned (:class:`secateurs.core.recovery.BlockReconstruction`).
    """
    device = torch.device(device)
    check_pattern_fits(model, pattern)
    if solver is not None and (redistributor is not None or pattern.structured):
        raise SecateursError(
            "a method that updates the surviving weights itself (sparsegpt) takes neither "
            "--use_recovery nor neuron sparsity; drop --use_recovery, or use unstructured or N:M"
        )
    if refiner is not None:
        if solver is not None:
            raise SecateursError(
                "a method that chooses masks and updates weights itself (sparsegpt) takes no "
                "--refine; refine a score method's masks (wanda, magnitude, ...)"
            )
        refiner.check(pattern)
    if reconstruction is not None and parallel is not None and reconstruction.epochs > 0:
        raise SecateursError(
            "--reconstruct_epochs trains in one process only (its gradients are not combined "
            "across torchrun processes); launch without torchrun, or use --reconstruct_epochs 0"
        )
    calibrated = (
        calibrated
        or redistributor is not None
        or solver is not None
        or refiner is not None
        or reconstruction is not None
    )
    if calibrated and (windows is None or windows.shape[0] == 0):
        raise ValueError("this method needs calibration windows")
    request = request or StatsRequest()
    if refiner is not None:
        request = request.merge(refiner.request)
    if redistributor is not None:
        request = request.merge(redistributor.request)
        if redistributor.strategy.request.gram:
            _warn_if_underdetermined(model, windows, token_mask)
    # labels come from every window, so that every process of a parallel run ranks alike
    labels = token_classes(windows, request.classes, token_mask) if request.classes else None
    if parallel is not None and calibrated:
        windows = windows[parallel.rows]
        labels = None if labels is None else labels[parallel.rows]
        token_mask = None if token_mask is None else token_mask[parallel.rows]
    report = PruneReport()
    stack_name, blocks = find_blocks(model)
    step = BlockStep(
        metric_fn,
        pattern,
        block_ratios(sparsity_ratio, len(blocks)),
        stack_name,
        device,
        batch_size,
        request,
        redistributor,
        solver,
        labels,
        token_mask,
        parallel,
        refiner,
        reconstruction,
        _layout_or_none(model) if reconstruction is not None else None,
    )
    if not isinstance(sparsity_ratio, (int, float)):
        report.block_ratios = step.ratios
    inputs = None
    if calibrated:
        start = time.perf_counter()
        with store.capturing(windows) if store is not None else contextlib.nullcontext():
            inputs = capture_block_inputs(model, windows, device, batch_size)
        report.seconds["capture"] += time.perf_counter() - start
    dense = None
    if inputs is not None and reconstruction is not None and reconstruction.stream == "dense":
        dense = replace(inputs, hidden=inputs.hidden.clone())
    for index, block in enumerate(tqdm(blocks, desc="pruning blocks", disable=not progress)):
        if store is not None:
            store.load(index, block)
        last = index == len(blocks) - 1
        prune_block(step, block, index, inputs, report, propagate=not last, dense=dense)
        if store is not None:
            store.release(index, block)
    if report.alarms():
        warnings.warn(alarm_message(report.alarms()), ChannelCollapseWarning, stacklevel=2)
    return report


def _layout_or_none(model: nn.Module) -> HeadLayout | None:
    """The model's head layout; None where its config names no head count (then only the
    MLP's output layer is refit)."""
    try:
        return head_layout(model.config)
    except SecateursError:
        return None


def _warn_if_underdetermined(
    model: nn.Module, windows: torch.Tensor, token_mask: torch.Tensor | None
) -> None:
    """Warn where a least-squares fit has fewer calibration tokens than a layer has inputs."""
    tokens = int(windows.numel() if token_mask is None else token_mask.sum())
    _, blocks = find_blocks(model)
    widest = max(weight_matrix(layer).shape[1] for layer in find_linears(blocks[0]).values())
    if tokens < widest:
        warnings.warn(
            f"least-squares recovery fits {widest} inputs per row from {tokens} calibration "
            "tokens: the fit follows the calibration text and can make perplexity worse than "
            f"no recovery; give it at least {widest} tokens (--nsamples x --seqlen)",
            stacklevel=3,
        )


def block_outlier_ratios(
    model: nn.Module,
    windows: torch.Tensor,
    threshold: float,
    score: LayerScore,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    token_mask: torch.Tensor | None = None,
) -> list[float]:
    """Every block's share of ``score`` (Wanda's) above ``threshold`` times its mean score.

    One pass through the dense model (OWL, Yin et al. 2024): each block's statistics and
    outputs come from the same forward pass of the unpruned block, so it costs about one
    forward pass of the calibration windows. The mean is over all the block's linear layers
    together, as in the reference code. ``token_mask`` (shaped like ``windows``) limits the
    statistics to the tokens it marks, as in the pruning pass.
    """
    device = torch.device(device)
    stack_name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, windows, device, batch_size)
    ratios = []
    for index, block in enumerate(tqdm(blocks, desc="outlier ratios", disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        layers = find_linears(block)
        outputs: list[torch.Tensor] = []
        stats = calibrate_block(
            block,
            layers,
            inputs,
            batch_size,
            StatsRequest(),
            None,
            outputs,
            index=index,
            token_mask=token_mask,
        )
        scores = [score(weight_matrix(layer), stats[n]) for n, layer in layers.items()]
        for name, value in zip(layers, scores, strict=True):
            require_finite(value, "scores", f"{stack_name}.{index}.{name}")
        total = sum(float(score.sum(dtype=torch.float64)) for score in scores)
        count = sum(score.numel() for score in scores)
        cut = threshold * total / count
        ratios.append(sum(int((score > cut).sum()) for score in scores) / count)
        inputs.hidden = outputs[0]
        block.to(home)
    return ratios
