"""``kfac``: ``(A + δ_A I)⁻¹ ⊗ (B + δ_B I)⁻¹`` with π-balanced Tikhonov damping.

For a damping ``λ`` of the layer's curvature ``A ⊗ B`` (relative: ``λ = r · m_A m_B`` with
``m_A = tr A / dim A``, ``m_B = tr B / dim B``), the damping is split between the factors as
Martens & Grosse (2015, §6.3) do: ``δ_A = π √λ``, ``δ_B = √λ / π`` with
``π = √(m_A / m_B)``. With relative damping this is ``δ_A = √r m_A``, ``δ_B = √r m_B``: each
factor damped on its own scale. Direction ``Q_B [(Q_Bᵀ G Q_A) / ((λ_B + δ_B)(λ_A + δ_A)ᵀ)] Q_Aᵀ``.
"""

from __future__ import annotations

import torch

from .base import Damping
from .kronecker import KroneckerUnit, layer_matrix, split_layer_matrix


def pi_split(mean_a: float, mean_b: float, damping: float) -> tuple[float, float]:
    """``(δ_A, δ_B) = (π √λ, √λ / π)`` with ``π = √(m_A / m_B)`` (π = 1 if a mean is 0)."""
    root = damping**0.5
    if mean_a > 0 and mean_b > 0:
        pi = (mean_a / mean_b) ** 0.5
        return pi * root, root / pi
    return root, root


class KFACUnit(KroneckerUnit):
    """A layer preconditioned by its damped Kronecker factors (see the module docstring)."""

    def _damped_eigenvalues(self, damping: Damping, dtype) -> torch.Tensor:
        st = self.state
        ma, mb = self.factor_means()
        da, db = pi_split(ma, mb, damping.of(self.scale()))
        return (st["kron_eB"].to(dtype) + db)[:, None] * (st["kron_eA"].to(dtype) + da)[None, :]

    def direction(self, grads, damping: Damping, samples: float) -> list[torch.Tensor]:
        if not self.ready:
            return list(grads)
        mat = layer_matrix(self.module, grads)
        proj = self._project(mat) / self._damped_eigenvalues(damping, mat.dtype)
        return split_layer_matrix(self.module, self._unproject(proj))

    def quadratic(self, v, damping: Damping) -> torch.Tensor:
        mat = layer_matrix(self.module, v)
        if not self.ready:
            return (mat * mat).sum()
        proj = self._project(mat)
        return (self._damped_eigenvalues(damping, mat.dtype) * proj * proj).sum()
