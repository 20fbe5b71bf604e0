"""Structured pruning methods: which attention heads, MLP neurons or whole blocks go.

One file per method; each calls :func:`register_unit` when imported (this package imports all
of its modules). A *width* method scores the units of one consumer layer from its weight and
its input statistics, ``score(weight, stats, units, remove)``: ``units`` holds each unit's
consumer columns, one row per unit, ``remove`` how many will go; the lowest scores go first.
A *depth* method picks the blocks to drop from the band of hidden-state cosines,
``choose(similarity, blocks, remove)``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError

KINDS = ("width", "depth")


@dataclass(frozen=True)
class UnitMethod:
    """A registered structured method: a width score or a depth choice, and its paper."""

    name: str
    kind: str
    summary: str
    fn: Callable
    paper: str = ""
    statistics: StatsRequest | None = None


UNIT_METHODS: dict[str, UnitMethod] = {}


def register_unit(method: UnitMethod) -> UnitMethod:
    """Add a structured method (each method file calls this once)."""
    if method.kind not in KINDS or method.name in UNIT_METHODS:
        raise ValueError(f"bad or repeated structured method '{method.name}'")
    UNIT_METHODS[method.name] = method
    return method


def unit_method(name: str, kind: str) -> UnitMethod:
    """The registered ``kind`` method called ``name``; a clear error listing the others."""
    method = UNIT_METHODS.get(name)
    if method is None or method.kind != kind:
        names = sorted(m.name for m in UNIT_METHODS.values() if m.kind == kind)
        flag = "--score" if kind == "width" else "--depth_score"
        raise SecateursError(f"unknown {flag} '{name}'; choose one of: {', '.join(names)}")
    return method


def column_sums(values: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Per-column ``values`` summed over each unit's columns."""
    return values[units].sum(dim=1)


def variance(stats: ActivationStats) -> torch.Tensor:
    """Per-channel variance of the input over every token seen."""
    second = stats.gram.diagonal().double() / max(stats.tokens, 1)
    return (second - stats.mean.double().square()).clamp_min(0)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
