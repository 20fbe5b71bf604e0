"""The method registry: every pruning method is one :class:`Method`, registered by its own file.

A method file in :mod:`secateurs.methods` calls :func:`register` when it is imported (the
package imports all of its modules), so adding a method is that file and its tests. A method
declares what it is able to do (its patterns, whether it streams from disk, runs data-parallel,
updates weights, needs gradients); the run configuration checks those declarations in one place
(:func:`secateurs.config.resolve`) instead of asking method names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from secateurs.core.engine import Solver
from secateurs.core.spec import from_flags
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError

ScoreFn = Callable[..., torch.Tensor]
# model, PromptBatch, device, progress, batch_size -> per-layer statistics keyed by full name
WholeModelPass = Callable[..., dict[str, torch.Tensor]]
# Pattern kinds, as SparsityPattern.kind names them.
ALL_PATTERNS = frozenset({"unstructured", "nm", "variant", "neuron"})


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    ``score(weight, stats)`` scores one weight matrix (low scores are pruned first); it may also
    take ``options`` (an instance of the method's ``options`` class, a frozen dataclass of
    :func:`secateurs.core.spec.setting` fields) and ``name`` (the layer's full module name).
    ``scope`` is how unstructured pruning compares scores by default: ``row`` (each output row on
    its own, as reference Wanda) or ``layer`` (one threshold per matrix, as reference
    magnitude). ``statistics(options)`` says which statistics beyond Wanda's norms the score
    reads. A ``solver`` chooses each layer's mask and updates its survivors itself (SparseGPT);
    it takes ``options`` as a keyword.

    ``whole_model`` is a pass over the whole unpruned model (:mod:`secateurs.core.passes`:
    gradients, activation norms) whose per-layer result the score reads in place of the
    block engine's statistics; such a method scores every layer first, then prunes from that
    table.

    The capabilities: ``calibrated`` (needs calibration activations), ``set_difference`` (two score
    tables, safety minus utility), ``streamable`` (works block by block on a model streamed from
    disk), ``serial_only`` (why a data-parallel run would not give the same masks; empty where it
    does), ``patterns`` (the pattern kinds it prunes, as :attr:`SparsityPattern.kind` names
    them).
    """

    name: str
    summary: str
    score: ScoreFn
    scope: str = "row"
    options: type | None = None
    statistics: Callable[[Any], StatsRequest] | None = None
    solver: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    calibrated: bool = True
    whole_model: WholeModelPass | None = None
    set_difference: bool = False
    streamable: bool = True
    serial_only: str = ""
    patterns: frozenset[str] = ALL_PATTERNS
    _takes: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.score).parameters
        object.__setattr__(self, "_takes", frozenset({"options", "name"} & set(params)))

    @property
    def parallel_safe(self) -> bool:
        """Processes that share the calibration windows give the masks of one process."""
        return self.calibrated and not self.serial_only

    @property
    def updates_weights(self) -> bool:
        """The method changes surviving weights itself (so no recovery follows it)."""
        return self.solver is not None

    @property
    def reads_score_table(self) -> bool:
        """The method scores the whole model first and prunes from that table."""
        return self.whole_model is not None or self.set_difference

    def make_options(self, values: dict[str, Any] | None = None) -> Any:
        """The method's options from flag values (defaults for flags not given), or None."""
        if self.options is None:
            return None
        return from_flags(self.options, values or {})

    def request(self, options: Any) -> StatsRequest:
        """The statistics the score reads, beyond Wanda's norms."""
        return StatsRequest() if self.statistics is None else self.statistics(options)

    def compute(
        self, weight: torch.Tensor, stats: ActivationStats | Any, options: Any, name: str = ""
    ) -> torch.Tensor:
        """The score of one layer, passing the options and name where the score takes them."""
        extra = {"options": options, "name": name}
        return self.score(weight, stats, **{k: v for k, v in extra.items() if k in self._takes})

    def bound_solver(self, options: Any) -> Solver | None:
        """The solver with this run's options bound, as the engine calls it."""
        return None if self.solver is None else partial(self.solver, options=options)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (each method file calls this once)."""
    if method.name in METHODS:
        raise ValueError(f"a method named '{method.name}' is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SecateursError(
            f"unknown pruning method '{name}'; choose one of: {', '.join(sorted(METHODS))}"
        ) from None


def option_classes() -> list[type]:
    """Every registered method's options class, once each, in registration order."""
    seen: list[type] = []
    for method in METHODS.values():
        if method.options is not None and method.options not in seen:
            seen.append(method.options)
    return seen
