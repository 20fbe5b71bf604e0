"""Settings as typed, frozen dataclass fields that carry their own command-line flag.

A field made with :func:`setting` names its flag (the reference scripts' spelling, such as
``sparsity_ratio``), its help line and its help panel; the command line is generated from
these fields, so a default and a help text are written once, beside the code that reads them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import Field
from typing import Any

from secateurs.errors import SecateursError

PANEL_KEY = "secateurs"


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a setting appears on the command line."""

    name: str
    help: str
    panel: str = "Method"
    hidden: bool = False


def setting(default: Any, help: str, flag: str | None = None, panel: str = "Method") -> Any:
    """A dataclass field with its flag; ``flag`` defaults to the field's own name."""
    return dataclasses.field(default=default, metadata={PANEL_KEY: (flag, help, panel)})


def flag_of(field: Field) -> Flag | None:
    """The flag of a field made with :func:`setting`, or None for an internal field."""
    meta = field.metadata.get(PANEL_KEY)
    if meta is None:
        return None
    name, help_text, panel = meta
    return Flag(name or field.name, help_text, panel)


def flagged_fields(cls: type) -> list[tuple[Field, Flag]]:
    """The fields of a settings class that appear on the command line, in order."""
    return [(f, flag) for f in dataclasses.fields(cls) if (flag := flag_of(f)) is not None]


def from_flags(cls: type, values: dict[str, Any]) -> Any:
    """An instance of ``cls`` from flag values (missing flags keep the field defaults)."""
    chosen = {f.name: values[flag.name] for f, flag in flagged_fields(cls) if flag.name in values}
    return cls(**chosen)


def to_flags(obj: Any) -> dict[str, Any]:
    """The flag values of a settings instance, keyed by flag name."""
    return {flag.name: getattr(obj, f.name) for f, flag in flagged_fields(type(obj))}


def require_positive(value: int | None, flag: str) -> None:
    """A count flag must be at least 1 where it is given."""
    if value is not None and value <= 0:
        raise SecateursError(f"--{flag} must be at least 1, got {value}")


def require_range(value: float, flag: str, low: float, high: float, hint: str = "") -> None:
    """A float flag must lie in the closed range [low, high] (NaN never does)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise SecateursError(f"--{flag} must be in [{low}, {high}], got {value}" + hint)
