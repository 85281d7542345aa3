"""Error construction shared by the package.

Every user-facing check raises ``ValueError`` or ``TypeError`` whose message names the
argument, shows what was received and what is accepted, and, where one exists, how to fix it.
"""

from __future__ import annotations

from typing import Any

import torch


def describe(value: Any) -> str:
    """A short, readable rendering of ``value`` for an error message."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= 6:
            vals = value.detach().cpu().flatten().tolist()
            return f"tensor({vals}, shape={tuple(value.shape)}, dtype={value.dtype})"
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def bad_value(name: str, received: Any, accepted: str, fix: str | None = None) -> ValueError:
    """A ``ValueError`` for argument ``name``."""
    msg = f"{name}: received {describe(received)}; accepted: {accepted}."
    if fix:
        msg += f" {fix}"
    return ValueError(msg)


def bad_type(name: str, received: Any, accepted: str, fix: str | None = None) -> TypeError:
    """A ``TypeError`` for argument ``name``."""
    msg = f"{name}: received an object of type {type(received).__name__}; accepted: {accepted}."
    if fix:
        msg += f" {fix}"
    return TypeError(msg)


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_type(name, value, "a positive float")
    value = float(value)
    if not (value > 0.0 and value < float("inf")):
        raise bad_value(name, value, "a finite float > 0")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        accepted = "one of " + ", ".join(repr(c) for c in choices)
        raise bad_value(name, value, accepted)
    return value
