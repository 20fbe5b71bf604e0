"""The structured pruning engine: whole blocks, attention heads and MLP neurons, compensated.

Depth first: one pass through the dense model measures how much each block changes its input
(the band of cosine similarities between the hidden states ``h_i`` and ``h_j``, ``j - i`` at
most the number of blocks to remove), and a depth method picks the blocks to drop. Then width,
block by block in order, each block seeing what the pruned blocks before it hand on (as Wanda
and SparseGPT do): the consumer of the heads (``o_proj``) is calibrated, a width method ranks
the heads, the lowest go, and the consumer is refit on the kept heads' activations so that its
output matches the dense one as closely as they allow; then the same for the MLP neurons
(``down_proj``), on activations that already pass through the pruned attention.

Removed units are zeroed here, which is exact (see :mod:`secateurs.core.units`); the
returned :class:`StructurePlan` says what to cut out, which
:func:`secateurs.formats.shrink.cut_structure` does.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.core.engine import calibrate_block, run_block
from secateurs.core.model import (
    BlockInputs,
    capture_block_inputs,
    find_blocks,
    find_linears,
    weight_matrix,
)
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.core.targets import Target, paired_target, reference_outputs, target_error
from secateurs.core.units import (
    check_head_mode,
    choose_units,
    complement,
    find_attention,
    find_mlp,
    head_columns,
    head_layout,
    head_mode,
    heads_to_remove,
    keep_heads,
    mask_heads,
    mask_neurons,
    removed_heads,
)
from secateurs.errors import SecateursError

COMPENSATIONS = ("least_squares", "mean", "none")
TARGETS = ("auto", "dense", "layer")
# score(weight, stats, units, remove) -> one value per unit, lowest removed first
WidthScore = Callable[[torch.Tensor, ActivationStats, torch.Tensor, int], torch.Tensor]
# choose(similarity band, blocks, remove) -> indices of the blocks to remove
DepthChoice = Callable[[dict[tuple[int, int], float], int, int], list[int]]


@dataclass(frozen=True)
class StructureSpec:
    """How much of each unit kind to remove, and how to make up for it."""

    neurons: float = 0.0
    heads: float = 0.0
    blocks: int = 0
    head_mode: str = "query"
    compensation: str = "least_squares"
    damp: float = 0.01
    target: str = "auto"

    def __post_init__(self) -> None:
        for flag, value in (("--neurons", self.neurons), ("--heads", self.heads)):
            if not 0.0 <= value < 1.0:
                raise SecateursError(
                    f"{flag} is the share of units to remove in every block: give a number in "
                    f"[0, 1), got {value}"
                )
        if self.blocks < 0:
            raise SecateursError(f"--blocks must be 0 or more, got {self.blocks}")
        check_head_mode(self.head_mode)
        if self.compensation not in COMPENSATIONS:
            raise SecateursError(
                f"unknown --compensation '{self.compensation}': use {', '.join(COMPENSATIONS)}"
            )
        if self.target not in TARGETS:
            raise SecateursError(f"unknown --target '{self.target}': use {', '.join(TARGETS)}")
        if not (self.damp > 0 and math.isfinite(self.damp)):
            raise SecateursError(f"--damp must be a positive number, got {self.damp}")

    def require_work(self) -> None:
        """Refuse a spec that removes nothing."""
        if not (self.neurons or self.heads or self.blocks):
            raise SecateursError(
                "nothing to remove: give --neurons, --heads (shares such as 0.25), --blocks "
                "(a count) or --params (a share of the parameters)"
            )


@dataclass
class BlockCut:
    """What one kept block keeps: query heads, key/value heads and neurons (None: all)."""

    keep_q: torch.Tensor | None = None
    keep_kv: torch.Tensor | None = None
    keep_neurons: torch.Tensor | None = None
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class StructurePlan:
    """Blocks removed (original indices) and, per original block index, what it keeps."""

    removed_blocks: list[int] = field(default_factory=list)
    cuts: dict[int, BlockCut] = field(default_factory=dict)
    similarity: dict[tuple[int, int], float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        def count(t: torch.Tensor | None) -> int | None:
            return None if t is None else int(t.numel())

        return {
            "removed_blocks": self.removed_blocks,
            "blocks": {
                str(i): {
                    "query_heads": count(c.keep_q),
                    "kv_heads": count(c.keep_kv),
                    "neurons": count(c.keep_neurons),
                    "relative_error": {
                        k: {"uncompensated": a, "compensated": b} for k, (a, b) in c.errors.items()
                    },
                }
                for i, c in sorted(self.cuts.items())
            },
            "adjacent_cosine": {
                str(i): v for (i, j), v in sorted(self.similarity.items()) if j == i + 1
            },
        }


@dataclass(frozen=True)
class InputMoments:
    """A layer's inputs over the calibration tokens: ``sum x x^T``, the mean of ``x`` and the
    count, each token weighted as the refit's target weighs it (a target through a norm does)."""

    gram: torch.Tensor
    mean: torch.Tensor
    tokens: int


def input_moments(stats: ActivationStats, target: Target | None = None) -> InputMoments:
    """The moments a fit towards ``target`` must use: the target's own where it carries them
    (weighted through a norm), else the layer's plain input statistics."""
    if target is not None and target.gram is not None:
        assert target.inputs_sum is not None
        mean = target.inputs_sum.double() / max(target.tokens, 1)
        return InputMoments(target.gram.double(), mean, target.tokens)
    return InputMoments(stats.gram.double(), stats.mean.double(), stats.tokens)


def fit_statistics(stats: ActivationStats, target: Target | None) -> ActivationStats:
    """The statistics a choice of units reads: with a target that weighs tokens through a
    norm, its weighted second moments, so that a second-order choice (ZipLM) costs each unit
    on the problem the refit then solves."""
    if target is None or target.gram is None:
        return stats
    assert target.inputs_sum is not None
    return stats.reweighted(target.gram, target.inputs_sum, target.tokens)


def refit(
    weight: torch.Tensor,
    stats: ActivationStats,
    keep: torch.Tensor,
    damp: float,
    bias: torch.Tensor | None = None,
    target: Target | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights on the kept columns that best reproduce the target output.

    The target is the layer's own output ``W x`` unless ``target`` gives another (the dense
    model's). ``W_S = (C_S + lambda W_S) (G[S, S] + lambda I)^-1``, with ``G`` the inputs'
    second moment (weighted as the target weighs tokens), ``C`` the inputs' moment with the
    target, and ``lambda`` = ``damp`` times the mean diagonal of ``G[S, S]``: a ridge that
    pulls towards the unchanged weights, so that with few tokens the refit stays close to
    them. With a bias the fit is affine (covariances; the bias takes the means). Returns the
    full-width weight (removed columns zero) and the new bias.
    """
    moments = input_moments(stats, target)
    tokens = max(moments.tokens, 1)
    moment = moments.gram / tokens
    dense = weight.double()
    mean = moments.mean
    if target is None:  # the layer's own output, W x + b
        cross = moment @ dense.t()
        target_mean = dense @ mean
        if bias is not None:
            cross = cross + torch.outer(mean, bias.double())
            target_mean = target_mean + bias.double()
    else:
        cross = target.cross.double() / tokens
        target_mean = target.total.double() / tokens
    if bias is not None:
        moment = moment - torch.outer(mean, mean)
        cross = cross - torch.outer(mean, target_mean)
    inner = moment[keep][:, keep]
    ridge = damp * float(inner.diagonal().mean().clamp_min(1e-12))
    inner = inner + ridge * torch.eye(keep.numel(), dtype=inner.dtype, device=inner.device)
    solved = torch.linalg.solve(inner, cross[keep] + ridge * dense[:, keep].t()).t()
    new = torch.zeros_like(dense)
    new[:, keep] = solved
    new_bias = None
    if bias is not None:
        new_bias = (target_mean - new @ mean).to(bias.dtype)
    return new.to(weight.dtype), new_bias


def output_change(
    moments: InputMoments, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> float:
    """``sum over tokens of ||weight x + bias||^2`` from the input moments alone."""
    weight = weight.double()
    total = float(((weight @ moments.gram) * weight).sum())
    if bias is not None:
        bias = bias.double()
        total += 2 * moments.tokens * float(bias @ weight @ moments.mean)
        total += moments.tokens * float(bias @ bias)
    return max(total, 0.0)


def mean_shift(
    weight: torch.Tensor, stats: ActivationStats, keep: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """A bias that adds the removed columns' average output back (FLAP's compensation)."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[keep] = False
    return bias + (weight.double()[:, removed] @ stats.mean.double()[removed]).to(bias.dtype)


class StructurePruner:
    """Removes blocks, heads and neurons from a model as a :class:`StructureSpec` says."""

    def __init__(
        self,
        model: nn.Module,
        spec: StructureSpec,
        width: WidthScore | None,
        depth: DepthChoice | None,
        request: StatsRequest = StatsRequest(),
        device: torch.device | str = "cpu",
        batch_size: int = 1,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.spec = spec
        self.width = width
        self.depth = depth
        self.request = request.merge(StatsRequest(mean=True, gram=True))
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        _, self.blocks = find_blocks(model)
        self.layout = head_layout(model.config) if spec.heads else None
        self._check()

    def _check(self) -> None:
        self.spec.require_work()
        count = len(self.blocks)
        if self.spec.blocks >= count:
            raise SecateursError(
                f"--blocks {self.spec.blocks} would remove every block; the model has {count}"
            )
        if (self.spec.neurons or self.spec.heads) and self.width is None:
            raise SecateursError("width pruning needs a width method")
        if self.spec.blocks and self.depth is None:
            raise SecateursError("block removal needs a depth method")
        if self.layout is not None:
            removed = self.heads_removed()
            if removed == 0:
                raise SecateursError(
                    f"--heads {self.spec.heads} removes no head: the model has "
                    f"{self.layout.heads} query heads ({self.layout.kv_heads} key/value) per "
                    "block and removes "
                    + (
                        "whole key/value groups"
                        if head_mode(self.layout, self.spec.head_mode) == "group"
                        else "the same count from every group"
                    )
                    + "; raise --heads"
                )
            if find_attention(self.blocks[0], self.layout) is None:
                raise SecateursError(
                    f"found no attention layer matching {self.layout.heads} heads of "
                    f"{self.layout.head_dim} in {type(self.blocks[0]).__name__}"
                )

    def heads_removed(self) -> int:
        """Query heads removed per block."""
        assert self.layout is not None
        return heads_to_remove(self.layout, self.spec.heads, self.spec.head_mode)

    def prune(self, windows: torch.Tensor, labels: torch.Tensor | None = None) -> StructurePlan:
        """Run the depth and width passes on calibration ``windows``; the model is masked."""
        inputs = capture_block_inputs(self.model, windows, self.device, self.batch_size)
        plan = StructurePlan()
        if self.spec.blocks:
            start = inputs.hidden.clone()
            plan.similarity = self._similarity(inputs)
            assert self.depth is not None
            plan.removed_blocks = sorted(
                self.depth(plan.similarity, self._depth_candidates(), self.spec.blocks)
            )
            inputs.hidden = start
        if self.spec.neurons or self.spec.heads or self._compensates_depth():
            self._widths(inputs, plan, labels)
        return plan

    def _tracks_dense(self) -> bool:
        """Whether an MLP refit aims at the dense model's outputs (so a dense path is run:
        only neuron refits and depth compensation read it)."""
        spec = self.spec
        if spec.compensation != "least_squares":
            return False
        if spec.target == "dense":
            return bool(spec.neurons or spec.blocks)
        return spec.target == "auto" and bool(spec.blocks)

    def _aims_dense(self, after_gap: bool) -> bool:
        """Whether this block's MLP refit aims at the dense model's block output: always
        with ``dense``; with ``auto`` only right after removed blocks, which nothing else
        makes up for. Elsewhere the layer's own output on the pruned stream carries over to
        new text better (BENCHMARKS.md, structured pruning)."""
        return self.spec.target == "dense" or (self.spec.target == "auto" and after_gap)

    def _depth_candidates(self) -> int:
        """How many blocks, from the first, the depth method may remove: all, or with
        compensation all but the last, which must stay to make up for the ones before it (on
        Gemma-3-270M the angular choice of four was the last four, 927 perplexity with
        nothing left to refit)."""
        return len(self.blocks) - 1 if self._compensates_depth() else len(self.blocks)

    def _compensates_depth(self) -> bool:
        """Removed blocks are made up for by refitting the MLP of the next kept block."""
        return bool(self.spec.blocks) and self._tracks_dense()

    def _similarity(self, inputs: BlockInputs) -> dict[tuple[int, int], float]:
        """Mean cosine between ``h_i`` and ``h_j`` over every token, for ``0 < j - i <= n``."""
        reach = self.spec.blocks
        ring = [inputs.hidden.clone()]
        band: dict[tuple[int, int], float] = {}
        steps = tqdm(range(len(self.blocks)), desc="block influence", disable=not self.progress)
        for index in steps:
            with _on(self.blocks[index], self.device) as block:
                run_block(block, inputs, self.batch_size, True, index=index)
            for back, earlier in enumerate(reversed(ring)):
                band[(index - back, index + 1)] = _mean_cosine(earlier, inputs.hidden)
            ring = [*ring, inputs.hidden.clone()][-reach:]
        return band

    def _widths(
        self, inputs: BlockInputs, plan: StructurePlan, labels: torch.Tensor | None
    ) -> None:
        removed = set(plan.removed_blocks)
        dense = replace(inputs, hidden=inputs.hidden.clone()) if self._tracks_dense() else None
        steps = tqdm(range(len(self.blocks)), desc="pruning units", disable=not self.progress)
        for index in steps:
            if index in removed:
                if dense is not None:  # the dense model still runs it
                    with _on(self.blocks[index], self.device) as block:
                        run_block(block, dense, self.batch_size, True, index=index)
                continue  # the pruned model hands its input on unchanged
            cut = BlockCut()
            with _on(self.blocks[index], self.device) as block:
                original = copy.deepcopy(block) if dense is not None else None
                if self.spec.heads:
                    self._prune_heads(block, index, inputs, cut, labels)
                after_gap = index - 1 in removed
                if self.spec.neurons or (after_gap and self._compensates_depth()):
                    aim = dense if self._aims_dense(after_gap) else None
                    self._prune_neurons(block, index, inputs, cut, labels, original, aim)
                run_block(block, inputs, self.batch_size, True, index=index)
                if original is not None and dense is not None:
                    run_block(original, dense, self.batch_size, True, index=index)
            plan.cuts[index] = cut

    def _stats(
        self, block: nn.Module, name: str, index: int, inputs: BlockInputs, labels
    ) -> ActivationStats:
        layers = {name: find_linears(block)[name]}
        return calibrate_block(
            block, layers, inputs, self.batch_size, self.request, labels, index=index
        )[name]

    def _prune_heads(self, block, index, inputs, cut: BlockCut, labels) -> None:
        assert self.layout is not None and self.width is not None
        group = find_attention(block, self.layout)
        if group is None:
            raise SecateursError(f"block {index} has no attention layer matching the others")
        stats = self._stats(block, group.consumer, index, inputs, labels)
        consumer = find_linears(block)[group.consumer]
        units = head_columns(group)
        removed = self.heads_removed()
        scores = self.width(weight_matrix(consumer), stats, units, removed)
        removed_q = removed_heads(scores, self.layout, removed, self.spec.head_mode)
        keep_q, keep_kv = keep_heads(removed_q, self.layout, self.spec.head_mode)
        cut.errors["heads"] = self._compensate(consumer, stats, group.columns(keep_q))
        mask_heads(block, group, keep_q, keep_kv)
        cut.keep_q, cut.keep_kv = keep_q, keep_kv

    def _prune_neurons(
        self,
        block,
        index,
        inputs,
        cut: BlockCut,
        labels,
        original: nn.Module | None,
        dense: BlockInputs | None,
    ) -> None:
        group = find_mlp(block)
        if group is None:
            raise SecateursError(f"block {index} has no MLP to prune neurons from")
        stats = self._stats(block, group.consumer, index, inputs, labels)
        consumer = find_linears(block)[group.consumer]
        width = weight_matrix(consumer).shape[1]
        remove = int(width * self.spec.neurons)
        keep = torch.ones(width, dtype=torch.bool)
        if original is not None and dense is not None:
            target = dense_target(
                block, original, group.consumer, index, inputs, dense, self.batch_size
            )
        else:
            target = self._own_target(block, group.consumer, index, inputs)
        if remove:
            assert self.width is not None
            units = torch.arange(width).unsqueeze(1)
            scores = self.width(
                weight_matrix(consumer), fit_statistics(stats, target), units, remove
            )
            keep[choose_units(scores, remove)] = False
        keep_index = keep.nonzero().squeeze(1)
        cut.errors["neurons"] = self._compensate(consumer, stats, keep_index, target)
        if remove:
            mask_neurons(block, group, keep_index)
            cut.keep_neurons = keep_index

    def _own_target(self, block, consumer: str, index: int, inputs) -> Target | None:
        """With ``auto``, where an RMS norm stands between the consumer and the block's
        output (Gemma-3's post-FFN norm): the consumer's own output, each token weighted by
        how the norm passes an error on (``1 / rms(y)^2``). On Gemma-3-270M at half the
        neurons this took perplexity from 71.5 to 65.1 (BENCHMARKS.md). None elsewhere (one
        batch to find out): the plain refit fits the own output already. (Not for o_proj: its
        output also feeds the MLP, so no norm passes it on to the block's output alone.)"""
        if self.spec.target != "auto" or self.spec.compensation != "least_squares":
            return None
        return paired_target(
            block, consumer, index, inputs, None, self.batch_size, "block", norm_only=True
        )

    def _compensate(
        self,
        consumer: nn.Module,
        stats: ActivationStats,
        keep: torch.Tensor,
        target: Target | None = None,
    ) -> tuple[float, float]:
        """Refit the consumer on its kept columns; its relative output error without and with."""
        weight = weight_matrix(consumer)
        dense = weight.clone()
        plain = dense.clone()
        plain[:, complement(keep, dense.shape[1])] = 0
        bias = getattr(consumer, "bias", None)
        old_bias = None if bias is None else bias.data.clone()
        new, mode = plain, self.spec.compensation
        if mode == "least_squares":
            new, new_bias = refit(dense, stats, keep, self.spec.damp, old_bias, target)
            if new_bias is not None:
                bias.data.copy_(new_bias)
        elif mode == "mean" and bias is not None:
            bias.data.copy_(mean_shift(dense, stats, keep, bias.data))
        weight.copy_(new)
        moments = input_moments(stats, target)
        reference = output_change(moments, dense) or 1.0
        if target is not None:
            new_bias = None if bias is None else bias.data
            before = target_error(output_change(moments, plain, old_bias), plain, old_bias, target)
            after = target_error(output_change(moments, new, new_bias), new, new_bias, target)
            return math.sqrt(before / reference), math.sqrt(after / reference)
        shift = None if bias is None else bias.data - old_bias
        return (
            math.sqrt(output_change(moments, plain - dense) / reference),
            math.sqrt(output_change(moments, new - dense, shift) / reference),
        )


def dense_target(
    block: nn.Module,
    original: nn.Module,
    consumer: str,
    index: int,
    inputs: BlockInputs,
    dense: BlockInputs,
    batch_size: int,
) -> Target | None:
    """The output the consumer should give so that the block's output is the dense model's
    (see :func:`secateurs.core.targets.paired_target`): matching it also corrects what the
    blocks before (pruned, or removed) changed in the residual stream. Through an RMS norm
    (Gemma-3's post-FFN norm) the target weighs each token, and :func:`refit` then fits on
    the target's weighted moments. None where the consumer's output does not reach the
    block's output."""
    wanted = reference_outputs(original, [], index, dense, batch_size)
    return paired_target(block, consumer, index, inputs, wanted, batch_size, "block")


@contextlib.contextmanager
def _on(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``block`` moved to ``device`` for the duration, then back where it was."""
    home = next(block.parameters()).device
    try:
        yield block.to(device)
    finally:
        block.to(home)


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over every token of the cosine between two hidden-state tensors."""
    flat_a, flat_b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    return float(nn.functional.cosine_similarity(flat_a, flat_b, dim=1).double().mean())


def _block_parameters(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def neuron_share_for(model: nn.Module, fraction: float, spec: StructureSpec) -> float:
    """The share of neurons to remove in every kept block so that, with the spec's heads and
    blocks, ``fraction`` of the model's parameters go (uniform allocation)."""
    if not 0.0 < fraction < 1.0:
        raise SecateursError(f"--params must be a share in (0, 1), got {fraction}")
    _, blocks = find_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    first = blocks[0]
    fixed = spec.blocks * _block_parameters(first)
    kept = len(blocks) - spec.blocks
    if spec.heads:
        layout = head_layout(model.config)
        removed = heads_to_remove(layout, spec.heads, spec.head_mode)
        groups = removed // layout.per_group if head_mode(layout, spec.head_mode) == "group" else 0
        hidden = weight_matrix(find_linears(first)[find_mlp(first).consumer]).shape[0]  # type: ignore[union-attr]
        # a query head: its rows of q and its columns of o; a group adds its k and v rows
        fixed += kept * 2 * layout.head_dim * hidden * (removed + groups)
    mlp = find_mlp(first)
    if mlp is None:
        raise SecateursError("--params needs an MLP in every block to spend the budget on")
    layers = find_linears(first)
    mlp_params = sum(weight_matrix(layers[name]).numel() for name in mlp.names)
    share = (fraction * total - fixed) / (kept * mlp_params)
    if not 0.0 <= share < 1.0:
        raise SecateursError(
            f"--params {fraction} cannot be met by removing neurons"
            + (" on top of the heads and blocks asked for" if fixed else "")
            + f": it would need {share:.0%} of every MLP; choose a smaller budget"
        )
    return share
