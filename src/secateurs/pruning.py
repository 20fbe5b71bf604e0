"""The Python API: pruner classes over the engine, and a one-call :func:`prune`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateurs import data
from secateurs.allocation import allocate, check_allocation
from secateurs.engine import PruneReport, prune_sequential
from secateurs.errors import SecateursError
from secateurs.model import choose_seqlen, load_model, weight_matrix
from secateurs.patterns import NMSparsity, effective_ratio, parse_pattern
from secateurs.recovery import WeightRedistributor
from secateurs.scores import Method, Solver, check_classes, check_ria_alpha, get_method
from secateurs.stats import ActivationStats, SelectivityOptions, StatsRequest


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


class BasePruner(ABC):
    """A pruning method: subclass it and implement :meth:`compute_pruning_metric`.

    ``default_scope`` is how unstructured pruning compares scores (``row`` or ``layer``),
    ``calibrated`` whether the method needs calibration activations. A ``redistributor``
    (see :mod:`secateurs.recovery`) updates each layer's survivors right after it is pruned.
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
    ) -> None:
        self.model = model
        self.redistributor = redistributor
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
    ) -> PruneReport:
        """Prune the model in place, block by block.

        ``block_ratios`` (one per decoder block, see :mod:`secateurs.allocation`) replace
        ``sparsity_ratio`` for unstructured sparsity.
        """
        pattern = parse_pattern(sparsity_type, scope or self.default_scope, use_variant)
        ratio: float | Sequence[float] = effective_ratio(pattern, sparsity_ratio)
        if block_ratios is not None:
            if isinstance(pattern, NMSparsity) or pattern.structured:
                raise SecateursError(
                    f"per-block sparsity ratios need unstructured sparsity, not "
                    f"{pattern.describe()}"
                )
            ratio = block_ratios
        needs_data = self.calibrated or self.redistributor is not None
        return prune_sequential(
            self.model,
            as_windows(dataloader) if needs_data else None,
            self.compute_pruning_metric,
            pattern,
            ratio,
            device=self.device,
            batch_size=self.batch_size,
            calibrated=self.calibrated,
            progress=self.progress,
            redistributor=self.redistributor,
            request=self.stats_request(),
            solver=self.solver,
        )


class MethodPruner(BasePruner):
    """A pruner for any method of the registry in :mod:`secateurs.scores`.

    ``selectivity`` tunes the IDF and spikiness statistics; ``classes`` is how many of the
    most frequent calibration tokens serve as classes for the Fisher ratio; ``ria_alpha`` is
    RIA's activation exponent.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method = "wanda",
        selectivity: SelectivityOptions | None = None,
        classes: int = 128,
        ria_alpha: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.method = method if isinstance(method, Method) else get_method(method)
        self.default_scope = self.method.scope
        self.calibrated = self.method.calibrated
        self.solver = self.method.solver
        options = {"alpha": check_ria_alpha(ria_alpha)}
        self.score_options = {k: v for k, v in options.items() if k in self.method.options}
        self.selectivity = selectivity or SelectivityOptions()
        self.classes = check_classes(classes)

    def stats_request(self) -> StatsRequest:
        needs = self.method.needs
        return StatsRequest(
            selectivity=self.selectivity if "selectivity" in needs else None,
            classes=self.classes if "classes" in needs else 0,
            gram="gram" in needs,
        )

    def compute_pruning_metric(
        self, layer: nn.Module, activation_stats: ActivationStats | None
    ) -> torch.Tensor:
        return self.method.score(weight_matrix(layer), activation_stats, **self.score_options)


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
    ria_alpha: float = 0.5,
    window_bos: str = "auto",
) -> Pruned:
    """Load (if given a name), calibrate and prune a model in one call.

    ``window_bos`` says whether calibration windows start with BOS (see
    :func:`secateurs.data.window_bos_token`).

    ``sparsity_allocation`` is ``uniform``, ``owl`` (per-block ratios from outlier ratios,
    ``owl_threshold`` and ``owl_lambda``) or a file of per-block ratios.
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
        ria_alpha=ria_alpha,
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
