"""``dense``: the exact Gauss–Newton matrix of one ODE block's field parameters.

``refresh`` takes the normalised ``(P, P)`` matrix ``G = Σ_{i,b} p_{i,b} p_{i,b}ᵀ / n`` from
the backward solve (tiny fields only) and eigendecomposes it once, ``G = Q diag(λ) Qᵀ``;
the direction is ``Q [(Qᵀ g) / (λ + damping)]``, so a damping that changes every step costs
no new factorisation.
"""

from __future__ import annotations

import torch

from .base import CurvatureUnit, Damping
from .kronecker import symmetric_eigh


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class DenseUnit(CurvatureUnit):
    """All parameters of one block's field with their exact damped Gauss–Newton matrix."""

    scope = "block"
    needs = "dense"

    @property
    def ready(self) -> bool:
        return "dense_Q" in self.state

    def refresh(self, stats) -> None:
        evals, evecs = symmetric_eigh(stats.G)
        self.set_decomposition([evecs, evals], stats.samples)

    def decomposition(self) -> list[torch.Tensor]:
        return [self.state["dense_Q"], self.state["dense_e"]]

    def set_decomposition(self, tensors, samples: float) -> None:
        self.state["dense_Q"], self.state["dense_e"] = tensors

    def scale(self) -> float:
        if not self.ready:
            return 1.0
        mean = float(self.state["dense_e"].mean())
        return mean if mean > 0 else 1.0

    def _unflat(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for p in self.params:
            out.append(flat[i : i + p.numel()].reshape(p.shape))
            i += p.numel()
        return out

    def direction(self, grads, damping: Damping, samples: float) -> list[torch.Tensor]:
        if not self.ready:
            return list(grads)
        g = _flat(grads)
        q = self.state["dense_Q"].to(g.dtype)
        e = self.state["dense_e"].to(g.dtype) + damping.of(self.scale())
        return self._unflat(q @ ((q.T @ g) / e))

    def quadratic(self, v, damping: Damping) -> torch.Tensor:
        x = _flat(v)
        if not self.ready:
            return x @ x
        q = self.state["dense_Q"].to(x.dtype)
        proj = q.T @ x
        e = self.state["dense_e"].to(x.dtype) + damping.of(self.scale())
        return (e * proj * proj).sum()
