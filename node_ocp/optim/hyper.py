"""Hyper-parameter checks and schedules shared by the optimizers.

A hyper-parameter may be a number or a schedule: a callable ``step -> number`` evaluated at
every optimizer step (step counts from 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._errors import bad_type, bad_value

Schedule = float | Callable[[int], float]


def value_at(h: Schedule, step: int) -> float:
    """The value of ``h`` at ``step``."""
    return float(h(step)) if callable(h) else float(h)


def check_hyper(
    name: str, h: Any, low: float, high: float, low_open: bool, high_open: bool, accepted: str
) -> Schedule:
    """Check a number against an interval; callables are accepted as schedules (checked at 0)."""
    if isinstance(h, bool) or not (callable(h) or isinstance(h, (int, float))):
        raise bad_type(name, h, f"{accepted}, or a callable step -> value")
    v = value_at(h, 0)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high) or v != v:
        shown = h if not callable(h) else f"a schedule giving {v} at step 0"
        raise bad_value(name, shown, accepted)
    return h


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_type(name, value, f"an int >= {minimum}")
    if value < minimum:
        raise bad_value(name, value, f"an int >= {minimum}")
    return value
