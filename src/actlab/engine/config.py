"""The base of every options / config dataclass: keyword overrides, validation, a JSON-able record.

Trainers and fitters take one config object (so a run is described by one value that is saved
into what it produces) while keeping the keyword call style: ``fit(..., config=None, **overrides)``
does ``config = MyConfig.with_overrides(config, overrides)``, which refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from actlab.errors import ActlabError

C = TypeVar("C", bound="Config")


@dataclasses.dataclass
class Config:
    """Subclasses are dataclasses; ``validate`` (run by ``__post_init__``) raises ActlabError on bad values."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the values; subclasses extend it."""

    @classmethod
    def with_overrides(cls: type[C], config: C | None, overrides: dict[str, Any]) -> C:
        """``config`` (or the defaults) with ``overrides`` applied; an unknown key is an ActlabError."""
        if config is not None and not isinstance(config, cls):
            raise ActlabError(f"config must be a {cls.__name__}, not {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ActlabError(f"unknown {cls.__name__} option(s) {', '.join(unknown)}; "
                              f"the options are: {', '.join(sorted(names))}")
        base = config if config is not None else cls()
        return dataclasses.replace(base, **overrides) if overrides else base

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict (what the produced file records)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Back from ``to_dict``; keys this version does not know are ignored (older / newer files)."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})


# ------------------------------------------------------------------------- shared checks
def positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ActlabError(f"{name} must be a positive integer, not {value!r}")


def positive_number(value, name: str) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ActlabError(f"{name} must be a positive number, not {value!r}")


def fraction(value, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ActlabError(f"{name} must be in [0, 1), not {value}")


def check_fields(config, *, positive_ints: tuple[str, ...] = (), positive_numbers: tuple[str, ...] = (),
                 fractions: tuple[str, ...] = (), choices: dict[str, tuple] | None = None) -> None:
    """The common checks of a config's fields, each named in the error it raises."""
    for name in positive_ints:
        positive_int(getattr(config, name), name)
    for name in positive_numbers:
        positive_number(getattr(config, name), name)
    for name in fractions:
        fraction(getattr(config, name), name)
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise ActlabError(f"{name} must be one of {allowed}, not {getattr(config, name)!r}")
