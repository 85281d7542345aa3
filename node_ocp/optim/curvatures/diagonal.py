"""``diagonal``: a diagonal Gauss–Newton (Fisher) estimate per coordinate.

The curvature of a coordinate is the running average of its squared gradient scaled to one
sample, ``s ← β s + (1 − β) n g²`` (``n`` the examples behind one gradient, as EKFAC does in
its eigenbasis), bias-corrected: ``ŝ = s / (1 − βᵗ)``. The direction is ``g / (ŝ + λ)ᵖ``
(``p``: OCNOpt's ``scale_power``, 1 by default) with ``λ`` relative to the mean of ``ŝ`` over
the tensor — EKFAC with the identity as eigenbasis, on the same scale as the Kronecker
layers, so that one step size means the same for both.
"""

from __future__ import annotations

import torch

from .base import CurvatureUnit, Damping


class DiagonalUnit(CurvatureUnit):
    """One tensor with a diagonal curvature (see the module docstring).

    Args:
        beta: running-average coefficient in [0, 1).
    """

    scope = "tensor"

    def __init__(self, params, state, module=None, beta: float = 0.95):
        super().__init__(params, state, module)
        self.beta = beta

    @classmethod
    def from_group(cls, params, state, module, group):
        return cls(params, state, module, beta=float(group["diag_beta"]))

    @property
    def ready(self) -> bool:
        return "diag_s" in self.state

    def _corrected(self) -> torch.Tensor:
        st = self.state
        return st["diag_s"] / (1.0 - self.beta ** st["diag_t"])

    def scale(self) -> float:
        if not self.ready:
            return 1.0
        mean = float(self._corrected().mean())
        return mean if mean > 0 else 1.0

    def observe(self, grads, samples: float) -> None:
        (g,) = grads
        st = self.state
        if "diag_s" not in st:
            st["diag_s"] = torch.zeros_like(g)
            st["diag_t"] = 0
        st["diag_t"] += 1
        st["diag_s"].mul_(self.beta).addcmul_(g, g, value=(1.0 - self.beta) * samples)

    def direction(self, grads, damping: Damping, samples: float) -> list[torch.Tensor]:
        self.observe(grads, samples)
        return self.solve(grads, damping)

    def solve(self, v, damping: Damping) -> list[torch.Tensor]:
        (x,) = v
        if not self.ready:
            return [x]
        return [x / damping.denominator(self._corrected(), self.scale())]

    def quadratic(self, v, damping: Damping) -> torch.Tensor:
        (x,) = v
        if not self.ready:
            return (x * x).sum()
        s = self._corrected()
        return (damping.denominator(s, self.scale()) * x * x).sum()
