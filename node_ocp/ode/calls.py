"""``FieldCall``: the vector field as the solvers call it, counted and checked."""

from __future__ import annotations

import torch
from torch import nn

from .._errors import bad_type
from .counters import SolveCounters


class FieldCall:
    """Wraps ``field(t, x)`` for one solve: counts evaluations, checks output, keeps last t.

    The output's type, shape and dtype are checked on the first call only: within one
    solve every call gets a state of the same shape and dtype.

    Args:
        field: the vector field, ``field(t, x)`` with ``x`` ``(B, *feat)`` returning a
            tensor of the same shape and dtype.
        counters: the block's counters; each call adds one to ``counters.forward``, or to
            ``counters.backward`` when :attr:`backward` is True.
        name: the block's name, for error messages.
        backward: count as backward evaluations (may be switched later, see
            :class:`~node_ocp.ode.reference.CountedField`).
    """

    def __init__(
        self, field: nn.Module, counters: SolveCounters, name: str, backward: bool = False
    ):
        self.field = field
        self.counters = counters
        self.name = name
        self.backward = backward
        self.last_t: float | None = None
        self.checked = False

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.backward:
            self.counters.backward += 1
        else:
            self.counters.forward += 1
        self.last_t = t
        dx = self.field(t, x)
        if self.checked:
            return dx
        if not isinstance(dx, torch.Tensor):
            raise bad_type(f"field of {self.name}", dx, "a tensor f(t, x) shaped like x")
        if dx.shape != x.shape or dx.dtype != x.dtype:
            raise ValueError(
                f"field of {self.name}: f(t, x) returned shape {tuple(dx.shape)} and dtype "
                f"{dx.dtype} for a state of shape {tuple(x.shape)} and dtype {x.dtype}; "
                "accepted: an output with exactly the shape and dtype of the state x."
            )
        self.checked = True
        return dx
