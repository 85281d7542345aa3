"""``identity``: ``C = I``, the direction is the gradient itself (SGD inside OCNOpt)."""

from __future__ import annotations

import torch

from .base import CurvatureUnit, Damping, dot


class IdentityUnit(CurvatureUnit):
    """One tensor with ``C = I`` and no damping: ``direction(g) = g``, ``quadratic = ‖v‖²``."""

    scope = "tensor"

    def scale(self) -> float:
        return 1.0

    def direction(self, grads, damping: Damping, samples: float) -> list[torch.Tensor]:
        return list(grads)

    def quadratic(self, v, damping: Damping) -> torch.Tensor:
        return dot(v, v)
