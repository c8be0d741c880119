"""Range checks shared by the losses' constructors.  Each raises ValueError("field: what is wrong"),
which the config reader turns into "section.field: ..." (one line naming the key)."""

from __future__ import annotations

import math
from numbers import Real


def number(name: str, value: object) -> float:
    """`value` as a float; ValueError naming `name` unless it is a finite real number."""
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def positive(name: str, value: object) -> None:
    """ValueError naming `name` unless `value` is a finite number > 0."""
    if number(name, value) <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")


def non_negative(name: str, value: object) -> None:
    """ValueError naming `name` unless `value` is a finite number >= 0."""
    if number(name, value) < 0:
        raise ValueError(f"{name}: must be 0 or more, got {value}")


def in_unit_interval(name: str, value: object, why: str = "") -> None:
    """ValueError naming `name` unless `value` lies in [0, 1] (`why` is added to the message)."""
    if not 0 <= number(name, value) <= 1:
        raise ValueError(f"{name}: must lie in [0, 1]{why}, got {value}")


def numbers(name: str, value: object, count: int, what: str) -> tuple:
    """A sequence of `count` finite numbers as a tuple (YAML gives lists)."""
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{name}: expected {count} numbers [{what}], got {value!r}")
    for v in value:
        number(name, v)
    return tuple(float(v) for v in value)
