"""``FieldCall``: the vector field as the solvers call it, counted and checked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .._errors import bad_type

if TYPE_CHECKING:  # pragma: no cover
    from .block import ODEBlock


class FieldCall:
    """Wraps ``field(t, x)`` for one solve: counts evaluations, checks output, keeps last t.

    The output's type, shape and dtype are checked on the first call only: within one
    solve every call gets a state of the same shape and dtype.

    Args:
        block: the block whose field is called (its counter ``counter`` is incremented).
        counter: ``"nfe_forward"`` or ``"nfe_backward"``.
    """

    def __init__(self, block: ODEBlock, counter: str):
        self.block = block
        self.counter = counter
        self.last_t: float | None = None
        self.checked = False

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        setattr(block, self.counter, getattr(block, self.counter) + 1)
        self.last_t = t
        dx = block.field(t, x)
        if self.checked:
            return dx
        if not isinstance(dx, torch.Tensor):
            raise bad_type(f"field of {block.name}", dx, "a tensor f(t, x) shaped like x")
        if dx.shape != x.shape or dx.dtype != x.dtype:
            raise ValueError(
                f"field of {block.name}: f(t, x) returned shape {tuple(dx.shape)} and dtype "
                f"{dx.dtype} for a state of shape {tuple(x.shape)} and dtype {x.dtype}; "
                "accepted: an output with exactly the shape and dtype of the state x."
            )
        self.checked = True
        return dx
