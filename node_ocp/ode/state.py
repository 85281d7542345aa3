"""``StateLayout``: the parts of an augmented state laid end to end in one flat tensor.

The backward solve hands ``torchdiffeq.odeint`` one flat tensor ``(N,)`` rather than a tuple
of parts: with a tuple, torchdiffeq slices the flat state into the parts and concatenates
the parts of the derivative at every evaluation, and the tuple error norm slices it again at
every error estimate. With the layout the dynamics take views of the two or three parts they
read, write their derivative with one ``torch.cat``, and the error norm reads slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class StateLayout:
    """Shapes and offsets of the parts ``(shape_0, shape_1, ...)`` of a flat state.

    Args:
        shapes: the shape of each part, in the order they lie in the flat tensor.
    """

    def __init__(self, shapes: Sequence[Sequence[int]]):
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [s.numel() for s in self.shapes]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets[-1]

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parts shaped like :attr:`shapes` -> one flat ``(N,)`` tensor (a copy)."""
        return torch.cat([p.reshape(-1) for p in parts])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``(..., N)`` -> the parts as views, each ``(..., *shape_i)``."""
        lead = flat.shape[:-1]
        chunks = flat.split(self.sizes, dim=-1)
        return [c.view((*lead, *s)) for c, s in zip(chunks, self.shapes)]

    def part(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """``(..., N)`` -> a view of part ``i``, ``(..., *shape_i)``."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return flat[..., lo:hi].view((*flat.shape[:-1], *self.shapes[i]))

    def rms_norm(self, n_parts: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The max over the first ``n_parts`` parts of each part's root mean square: the
        mixed norm torchdiffeq uses for tuple states, on the flat tensor ``(N,)``."""
        bounds = [
            (lo, hi)
            for lo, hi in zip(self.offsets[:n_parts], self.offsets[1 : n_parts + 1])
            if hi > lo
        ]

        def norm(flat: torch.Tensor) -> torch.Tensor:
            out = None
            for lo, hi in bounds:
                r = flat[lo:hi].pow(2).mean().sqrt()
                out = r if out is None else torch.maximum(out, r)
            return flat.new_zeros(()) if out is None else out

        return norm

    def tuple_norm(self, norm: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        """A user's norm of the tuple of parts, called on the flat tensor."""

        def wrapped(flat: torch.Tensor) -> torch.Tensor:
            return norm(tuple(self.split(flat)))

        return wrapped
