"""The Python API: pruner classes over the engine, and a one-call :func:`prune`."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateurs.core.engine import (
    BlockStore,
    DataParallel,
    MaskRefiner,
    MetricFn,
    PruneReport,
    Solver,
    prune_sequential,
)
from secateurs.core.model import choose_seqlen, iter_prunable, load_model, weight_matrix
from secateurs.core.patterns import (
    NMSparsity,
    SetDifference,
    SparsityPattern,
    Unstructured,
    effective_ratio,
    parse_pattern,
)
from secateurs.core.recovery import BlockReconstruction
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.data import text as data
from secateurs.data.prompts import PromptBatch, text_batch
from secateurs.errors import SecateursError
from secateurs.methods.allocation import allocate, check_allocation
from secateurs.methods.recovery import WeightRedistributor
from secateurs.methods.registry import Method, get_method


def as_windows(dataloader: Any) -> torch.Tensor | None:
    """Calibration windows as one (n, seqlen) tensor.

    Accepts a tensor, or an iterable of tensors or of ``(input_ids, target)`` pairs as the
    reference data loaders yield.
    """
    if dataloader is None or isinstance(dataloader, torch.Tensor):
        return dataloader
    rows = []
    for item in dataloader:
        ids = item[0] if isinstance(item, (tuple, list)) else item
        rows.append(ids if ids.dim() == 2 else ids.unsqueeze(0))
    return torch.cat(rows) if rows else None


# Above this share of weights a set difference stops isolating safety (Wei et al. prune ~3%).
LARGE_SET_DIFFERENCE = 0.1


def negated(metric: MetricFn) -> MetricFn:
    """The metric with its sign flipped: the highest scores are pruned (``--neg_prune``)."""
    return lambda layer, stats: -metric(layer, stats)


def table_metric(model: nn.Module, table: dict[str, torch.Tensor]) -> MetricFn:
    """A metric that looks each layer's score up by its full module name."""
    names = {id(layer): name for name, layer in iter_prunable(model)}
    return lambda layer, _stats: table[names[id(layer)]]


class BasePruner(ABC):
    """A pruning method: subclass it and implement :meth:`compute_pruning_metric`.

    ``default_scope`` is how unstructured pruning compares scores (``row`` or ``layer``),
    ``calibrated`` whether the method needs calibration activations. A ``redistributor``
    (see :mod:`secateurs.methods.recovery`) updates each layer's survivors right after it is
    pruned. A ``store`` streams the blocks of a skeleton model from disk
    (:mod:`secateurs.formats.streaming`);
    ``parallel`` calibrates on this process's share of the windows
    (:mod:`secateurs.jobs.distributed`). A ``refiner`` (DSnoT, :mod:`secateurs.methods.dsnot`)
    changes each layer's mask before it is applied; a ``reconstruction``
    (:class:`secateurs.core.recovery.BlockReconstruction`) refits each block's output layers
    after it is pruned.
    """

    default_scope = "row"
    calibrated = True
    solver: Solver | None = None

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        progress: bool = True,
        redistributor: WeightRedistributor | None = None,
        store: BlockStore | None = None,
        parallel: DataParallel | None = None,
        refiner: MaskRefiner | None = None,
        reconstruction: BlockReconstruction | None = None,
    ) -> None:
        self.model = model
        self.redistributor = redistributor
        self.refiner = refiner
        self.reconstruction = reconstruction
        self.store = store
        self.parallel = parallel
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress

    def stats_request(self) -> StatsRequest:
        """Statistics beyond Wanda's norms that :meth:`compute_pruning_metric` reads."""
        return StatsRequest()

    @abstractmethod
    def compute_pruning_metric(
        self, layer: nn.Module, activation_stats: ActivationStats | None
    ) -> torch.Tensor:
        """Score every weight of ``layer`` as (out, in); the lowest scores are pruned."""

    def prune(
        self,
        dataloader: Any = None,
        sparsity_ratio: float = 0.5,
        sparsity_type: str = "unstructured",
        scope: str | None = None,
        use_variant: bool = False,
        block_ratios: Sequence[float] | None = None,
        token_mask: torch.Tensor | None = None,
        negate: bool = False,
    ) -> PruneReport:
        """Prune the model in place, block by block.

        ``block_ratios`` (one per decoder block, see :mod:`secateurs.methods.allocation`) replace
        ``sparsity_ratio`` for unstructured sparsity. ``token_mask`` limits the statistics
        to the tokens it marks (a :class:`PromptBatch` as ``dataloader`` brings its own);
        ``negate`` prunes the highest scores instead.
        """
        if isinstance(dataloader, PromptBatch):
            dataloader, token_mask = dataloader.input_ids, dataloader.token_mask
        pattern = parse_pattern(sparsity_type, scope or self.default_scope, use_variant)
        ratio: float | Sequence[float] = effective_ratio(pattern, sparsity_ratio)
        if block_ratios is not None:
            if isinstance(pattern, NMSparsity) or pattern.structured:
                raise SecateursError(
                    f"per-block sparsity ratios need unstructured sparsity, not "
                    f"{pattern.describe()}"
                )
            ratio = block_ratios
        needs_data = (
            self.calibrated
            or self.redistributor is not None
            or self.refiner is not None
            or self.reconstruction is not None
        )
        metric = self.compute_pruning_metric
        return prune_sequential(
            self.model,
            as_windows(dataloader) if needs_data else None,
            negated(metric) if negate else metric,
            pattern,
            ratio,
            device=self.device,
            batch_size=self.batch_size,
            calibrated=self.calibrated,
            progress=self.progress,
            redistributor=self.redistributor,
            request=self.stats_request(),
            solver=self.solver,
            token_mask=token_mask if needs_data else None,
            store=self.store,
            parallel=self.parallel,
            refiner=self.refiner,
            reconstruction=self.reconstruction,
        )


class TablePruner(BasePruner):
    """Prunes from precomputed scores (a gradient pass, or a loaded score file)."""

    calibrated = False

    def __init__(
        self, model: nn.Module, table: dict[str, torch.Tensor], scope: str = "row", **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)
        self.default_scope = scope
        self._metric = table_metric(model, table)

    def compute_pruning_metric(
        self, layer: nn.Module, activation_stats: ActivationStats | None
    ) -> torch.Tensor:
        return self._metric(layer, activation_stats)


def prune_set_difference(
    model: nn.Module,
    safety: dict[str, torch.Tensor],
    utility: dict[str, torch.Tensor],
    p: float,
    q: float,
    progress: bool = True,
) -> PruneReport:
    """Prune, per weight matrix, the top-``q`` safety weights outside the top-``p`` utility."""
    stacked = {name: torch.stack([safety[name], utility[name].to(safety[name])]) for name in safety}
    report = prune_with_pattern(model, stacked, SetDifference(p, q), progress)
    pruned = sum(r.pruned for r in report.layers)
    total = sum(r.shape[0] * r.shape[1] for r in report.layers)
    if total and pruned / total > LARGE_SET_DIFFERENCE:
        warnings.warn(
            f"the set difference pruned {pruned / total:.1%} of the weights; the published effect "
            "comes from a few percent, and this many usually costs perplexity too. Lower --q "
            "or raise --p",
            stacklevel=2,
        )
    return report


def prune_with_pattern(
    model: nn.Module,
    table: dict[str, torch.Tensor],
    pattern: SparsityPattern,
    progress: bool = True,
    ratio: float = 0.0,
) -> PruneReport:
    """Prune from precomputed scores with a pattern object (no calibration)."""
    return prune_sequential(
        model, None, table_metric(model, table), pattern, ratio, calibrated=False, progress=progress
    )


class MethodPruner(BasePruner):
    """A pruner for any method of the registry (:mod:`secateurs.methods`).

    ``options`` are the method's own settings: an instance of its options class (such as
    :class:`secateurs.methods.selectivity.SelectivityOptions`), or a dict of flag values
    (``{"ria_alpha": 0.3}``; flags the method does not read are ignored), or None for the
    defaults. ``base``, the weights of the model this one was fine-tuned from by layer name
    (:func:`secateurs.core.model.base_weights`), makes every score read ``W - W_base`` in
    place of ``W`` (Wei et al.'s ``--use_diff``); the mask still zeroes ``W``.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method = "wanda",
        options: Any = None,
        base: Mapping[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.method = method if isinstance(method, Method) else get_method(method)
        self.default_scope = self.method.scope
        self.calibrated = self.method.calibrated
        if options is None or isinstance(options, dict):
            options = self.method.make_options(options)
        elif self.method.options is None or not isinstance(options, self.method.options):
            expected = "no options" if self.method.options is None else self.method.options.__name__
            raise TypeError(f"{self.method.name} takes {expected}, not {type(options).__name__}")
        self.options = options
        self.solver = self.method.bound_solver(options)
        if base is not None and self.solver is not None:
            raise SecateursError(
                f"{self.method.name} chooses masks from its own solver, not from a score of the "
                "weights; --use_diff needs a score method such as wanda, wanda_v2 or wandg"
            )
        self.base = base
        self._names = {id(layer): name for name, layer in iter_prunable(model)}

    def scored_weight(self, layer: nn.Module, name: str) -> torch.Tensor:
        """The weight the score reads: the layer's, or its change from the base model."""
        weight = weight_matrix(layer)
        if self.base is None:
            return weight
        return weight - self.base[name].to(weight.device, weight.dtype)

    def stats_request(self) -> StatsRequest:
        return self.method.request(self.options)

    def compute_pruning_metric(
        self, layer: nn.Module, activation_stats: ActivationStats | None
    ) -> torch.Tensor:
        name = self._names.get(id(layer), "")
        weight = self.scored_weight(layer, name)
        return self.method.compute(weight, activation_stats, self.options, name)

    def scores(
        self, dataloader: Any = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Raw scores of every prunable layer, keyed by full name; the model is left unchanged.

        Methods with a whole-model pass (gradients, activation norms) run it; the others run
        the engine at ratio 0, so each block is scored on the dense outputs of the blocks
        before it.
        """
        prompt_batch = dataloader if isinstance(dataloader, PromptBatch) else None
        if prompt_batch is not None:
            dataloader, token_mask = prompt_batch.input_ids, prompt_batch.token_mask
        windows = as_windows(dataloader)
        whole_model = self.method.whole_model
        if whole_model is not None:
            if windows is None:
                raise ValueError(
                    f"{self.method.name} needs prompt/response data or text windows to score"
                )
            batch = prompt_batch or (
                text_batch(windows) if token_mask is None else _as_batch(windows, token_mask)
            )
            stats = whole_model(self.model, batch, self.device, self.progress, self.batch_size)
            return {
                name: self.method.compute(
                    self.scored_weight(layer, name), stats[name], self.options, name
                )
                for name, layer in iter_prunable(self.model)
            }
        names = {id(layer): name for name, layer in iter_prunable(self.model)}
        table: dict[str, torch.Tensor] = {}

        def record(layer: nn.Module, stats: ActivationStats | None) -> torch.Tensor:
            score = self.compute_pruning_metric(layer, stats)
            table[names[id(layer)]] = score.detach().float().cpu()
            return score

        prune_sequential(
            self.model,
            windows if self.calibrated else None,
            record,
            Unstructured("row"),
            0.0,
            device=self.device,
            batch_size=self.batch_size,
            calibrated=self.calibrated,
            progress=self.progress,
            request=self.stats_request(),
            token_mask=token_mask if self.calibrated else None,
        )
        return table

    def prune(
        self,
        dataloader: Any = None,
        sparsity_ratio: float = 0.5,
        sparsity_type: str = "unstructured",
        scope: str | None = None,
        use_variant: bool = False,
        block_ratios: Sequence[float] | None = None,
        token_mask: torch.Tensor | None = None,
        negate: bool = False,
    ) -> PruneReport:
        if self.method.whole_model is None:
            return super().prune(
                dataloader,
                sparsity_ratio,
                sparsity_type,
                scope,
                use_variant,
                block_ratios,
                token_mask=token_mask,
                negate=negate,
            )
        table = self.scores(dataloader, token_mask)
        pruner = TablePruner(self.model, table, scope or self.default_scope, progress=self.progress)
        return pruner.prune(
            None, sparsity_ratio, sparsity_type, scope, use_variant, block_ratios, negate=negate
        )


def _as_batch(windows: torch.Tensor, token_mask: torch.Tensor) -> PromptBatch:
    """Windows with a token mask; a sample's length runs to its last marked token."""
    positions = torch.arange(windows.shape[1]).expand_as(windows)
    lengths = torch.where(token_mask, positions + 1, 0).amax(dim=1)
    return PromptBatch(windows, token_mask, lengths)


class WandaPruner(MethodPruner):
    """Wanda: ``|W| * ||X||``, pruned per output row."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, "wanda", **kwargs)


class MagnitudePruner(MethodPruner):
    """Magnitude: ``|W|``, one threshold per layer, no calibration."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, "magnitude", **kwargs)


@dataclass
class Pruned:
    """A pruned model, its tokenizer and what the engine reported."""

    model: nn.Module
    tokenizer: Any
    report: PruneReport


def prune(
    model: str | nn.Module,
    tokenizer: Any = None,
    method: str = "wanda",
    sparsity_ratio: float = 0.5,
    sparsity_type: str = "unstructured",
    dataset: str = "wiki-sample",
    nsamples: int = 128,
    seqlen: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    redistributor: WeightRedistributor | None = None,
    sparsity_allocation: str = "uniform",
    owl_threshold: float = 5.0,
    owl_lambda: float = 0.08,
    options: Any = None,
    window_bos: str = "auto",
) -> Pruned:
    """Load (if given a name), calibrate and prune a model in one call.

    ``window_bos`` says whether calibration windows start with BOS (see
    :func:`secateurs.data.text.window_bos_token`).

    ``sparsity_allocation`` is ``uniform``, ``owl`` (per-block ratios from outlier ratios,
    ``owl_threshold`` and ``owl_lambda``) or a file of per-block ratios. ``options`` are the
    method's own settings (see :class:`MethodPruner`).
    """
    pattern = parse_pattern(sparsity_type, get_method(method).scope)
    check_allocation(sparsity_allocation, pattern, owl_threshold, owl_lambda)
    if isinstance(model, str):
        model, tokenizer = load_model(model)
    if tokenizer is None:
        raise ValueError("pass the tokenizer along with a model object")
    pruner = MethodPruner(
        model,
        method,
        tokenizer=tokenizer,
        device=device,
        batch_size=batch_size,
        progress=progress,
        redistributor=redistributor,
        options=options,
    )
    windows = None
    if pruner.calibrated or redistributor is not None or sparsity_allocation == "owl":
        length = choose_seqlen(model.config, seqlen)
        source = data.resolve_source(dataset)
        bos = data.window_bos_token(window_bos, model.config, tokenizer)
        windows = data.calibration_windows(tokenizer, source, nsamples, length, seed, bos)
    target = effective_ratio(pattern, sparsity_ratio)
    plan = allocate(
        model,
        windows,
        sparsity_allocation,
        target,
        owl_threshold,
        owl_lambda,
        device,
        batch_size,
        progress,
    )
    report = pruner.prune(windows, sparsity_ratio, sparsity_type, block_ratios=plan.ratios)
    return Pruned(model, tokenizer, report)
