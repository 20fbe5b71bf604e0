"""Sparsity allocation: how much of each decoder block to prune, for a target over the model.

``uniform`` prunes every block at the target. ``owl`` (Yin et al., "Outlier Weighed Layerwise
Sparsity", ICML 2024) prunes blocks with more outlier scores less: a block's outlier ratio
``D`` is its share of Wanda scores above ``M`` times its mean score; the ratios are
normalised to ``[0, 2 lambda]`` and subtracted from the target, then shifted so their
parameter-weighted mean is the target again. A file gives the per-block ratios explicitly.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateurs.core.engine import block_outlier_ratios
from secateurs.core.model import find_blocks, find_linears, weight_matrix
from secateurs.core.patterns import NMSparsity, SparsityPattern
from secateurs.errors import SecateursError
from secateurs.methods.wanda import wanda_score

NAMED = ("uniform", "owl")


@dataclass
class Allocation:
    """Per-block sparsity ratios and, for OWL, the outlier ratios and the pass's cost."""

    kind: str
    ratios: list[float] | None
    outlier_ratios: list[float] | None = None
    seconds: float = 0.0
    mean: float | None = None  # the ratios' mean weighted by block size: the model's sparsity

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "block_ratios": self.ratios,
            "mean_ratio": self.mean,
            "outlier_ratios": self.outlier_ratios,
            "outlier_pass_s": self.seconds,
        }


def owl_ratios(
    outlier_ratios: list[float], parameters: list[int], target: float, lam: float
) -> list[float]:
    """Per-block sparsity from outlier ratios: ``target - lam * normalised(D)``, re-centred.

    ``normalised(D)`` maps the ratios linearly onto ``[0, 2]``, so before re-centring the
    ratios span ``[target - 2 lam, target]``; the shift restores the parameter-weighted mean,
    leaving a span of ``2 lam`` around the target. Equal ratios give the uniform allocation.
    """
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    weights = torch.tensor(parameters, dtype=torch.float64)
    spread = float(d.max() - d.min())
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    centre = float((scaled * weights).sum() / weights.sum())
    ratios = [target - float(s) + centre for s in scaled]
    check_block_ratios(ratios, f"OWL with --owl_lambda {lam} around {target}")
    return ratios


def check_block_ratios(ratios: list[float], source: str) -> list[float]:
    """Every ratio must lie in [0, 1)."""
    bad = [f"{i}: {r:g}" for i, r in enumerate(ratios) if not (0.0 <= r < 1.0)]
    if bad:
        raise SecateursError(
            f"{source} gives block sparsity outside [0, 1) (block {', '.join(bad[:3])}); "
            "lower --owl_lambda or the target, or fix the ratios"
        )
    return ratios


def read_ratios(path: str) -> list[float]:
    """Per-block ratios from a file: a JSON list, or numbers separated by commas or spaces."""
    file = Path(path)
    if not file.is_file():
        raise SecateursError(
            f"--sparsity_allocation '{path}' is neither {' nor '.join(NAMED)} nor a file; give "
            "uniform, owl, or a file with one sparsity ratio per decoder block"
        )
    text = file.read_text()
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = [part for part in re.split(r"[\s,]+", text) if part]
    try:
        ratios = [float(v) for v in values] if isinstance(values, list) else None
    except (TypeError, ValueError):
        ratios = None
    if not ratios or not all(math.isfinite(r) for r in ratios):
        raise SecateursError(
            f"could not read per-block sparsity ratios from {path}: write a JSON list such as "
            "[0.45, 0.5, 0.55] or one number per line"
        )
    return check_block_ratios(ratios, path)


def check_allocation(
    allocation: str, pattern: SparsityPattern, threshold: float, lam: float
) -> list[float] | None:
    """Check the options before any work; the ratios of an allocation file, else None."""
    if allocation == "uniform":
        return None
    if isinstance(pattern, NMSparsity) or pattern.structured:
        raise SecateursError(
            f"--sparsity_allocation {allocation} varies the sparsity per block, but "
            f"{pattern.describe()} fixes it; use --sparsity_type unstructured or "
            "--sparsity_allocation uniform"
        )
    if allocation == "owl":
        if not (math.isfinite(threshold) and threshold > 0):
            raise SecateursError(f"--owl_threshold must be > 0, got {threshold}; 5 is usual")
        if not (math.isfinite(lam) and 0 <= lam < 0.5):
            raise SecateursError(f"--owl_lambda must be in [0, 0.5), got {lam}; 0.08 is usual")
        return None
    return read_ratios(allocation)


def weighted_mean(ratios: list[float], parameters: list[int]) -> float:
    """The share of the blocks' weights that per-block ``ratios`` prune."""
    return sum(r * p for r, p in zip(ratios, parameters, strict=True)) / sum(parameters)


def block_parameters(model: nn.Module) -> list[int]:
    """Weights of the prunable linear layers of every decoder block."""
    _, blocks = find_blocks(model)
    return [
        sum(weight_matrix(layer).numel() for layer in find_linears(block).values())
        for block in blocks
    ]


def allocate(
    model: nn.Module,
    windows: torch.Tensor | None,
    allocation: str,
    target: float,
    threshold: float = 5.0,
    lam: float = 0.08,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    token_mask: torch.Tensor | None = None,
) -> Allocation:
    """The per-block ratios an allocation gives this model (None for uniform).

    ``token_mask`` limits OWL's statistics to the tokens the pruning pass counts.
    """
    if allocation == "uniform":
        return Allocation("uniform", None)
    parameters = block_parameters(model)
    if allocation != "owl":
        explicit = read_ratios(allocation)
        if len(explicit) != len(parameters):
            raise SecateursError(
                f"{allocation} holds {len(explicit)} ratios but the model has "
                f"{len(parameters)} decoder blocks; give one ratio per block"
            )
        mean = weighted_mean(explicit, parameters)
        if abs(mean - target) > 0.0005:
            warnings.warn(
                f"the ratios in {allocation} prune {mean:.4f} of the blocks' weights, not "
                f"--sparsity_ratio {target:g}: the file's ratios are used as they are",
                stacklevel=2,
            )
        return Allocation("file", explicit, mean=mean)
    if windows is None:
        raise SecateursError("OWL needs calibration windows for its outlier ratios")
    start = time.perf_counter()
    outliers = block_outlier_ratios(
        model, windows, threshold, wanda_score, device, batch_size, progress, token_mask
    )
    seconds = time.perf_counter() - start
    ratios = owl_ratios(outliers, parameters, target, lam)
    return Allocation("owl", ratios, outliers, seconds, weighted_mean(ratios, parameters))
