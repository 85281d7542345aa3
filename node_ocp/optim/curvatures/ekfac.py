"""``ekfac``: the Kronecker eigenbasis with its diagonal re-estimated every step
(George et al., 2018).

In the eigenbasis of ``A`` and ``B`` the gradient matrix is ``G̃ = Q_Bᵀ G Q_A``. The diagonal
``s`` starts at every refresh from the Kronecker eigenvalues ``λ_B λ_Aᵀ`` and is re-estimated
every step as ``s ← β s + (1 − β) n G̃²`` (``β``: OCNOpt's ``ekfac_decay``; ``n`` the
samples behind the refresh, so that it estimates the same per-sample second moment).
Direction ``Q_B [G̃ / (s + λ)ᵖ] Q_Aᵀ``, with ``λ`` relative to the mean Kronecker eigenvalue
``m_A m_B`` of the last refresh and ``p`` OCNOpt's ``scale_power`` (1 by default; ½ is Adam's
square-root scaling in the Kronecker eigenbasis, as in Shampoo/SOAP).
"""

from __future__ import annotations

import torch

from .base import Damping
from .kronecker import KroneckerUnit, layer_matrix, split_layer_matrix


class EKFACUnit(KroneckerUnit):
    """A layer preconditioned in its Kronecker eigenbasis (see the module docstring).

    Args:
        decay: running-average coefficient β of the diagonal in (0, 1] (1: K-FAC's
            eigenvalues kept until the next refresh); OCNOpt's ``ekfac_decay``.
    """

    def __init__(self, params, state, module=None, decay: float = 0.75):
        super().__init__(params, state, module)
        self.decay = decay

    @classmethod
    def from_group(cls, params, state, module, group):
        return cls(params, state, module, decay=float(group["ekfac_decay"]))

    def set_decomposition(self, tensors, samples: float) -> None:
        super().set_decomposition(tensors, samples)
        st = self.state
        st["kron_s"] = st["kron_eB"][:, None] * st["kron_eA"][None, :]

    def _update(self, proj: torch.Tensor) -> None:
        st = self.state
        s = st["kron_s"].to(proj.dtype)
        st["kron_s"] = s.mul(self.decay).add_(proj * proj, alpha=(1.0 - self.decay) * st["kron_n"])

    def direction(self, grads, damping: Damping, samples: float) -> list[torch.Tensor]:
        if not self.ready:
            return list(grads)
        proj = self._project(layer_matrix(self.module, grads))
        self._update(proj)
        proj = proj / damping.denominator(self.state["kron_s"], self.scale())
        return split_layer_matrix(self.module, self._unproject(proj))

    def observe(self, grads, samples: float) -> None:
        if self.ready:
            self._update(self._project(layer_matrix(self.module, grads)))

    def solve(self, v, damping: Damping) -> list[torch.Tensor]:
        if not self.ready:
            return list(v)
        mat = layer_matrix(self.module, v)
        s = self.state["kron_s"].to(mat.dtype)
        proj = self._project(mat) / damping.denominator(s, self.scale())
        return split_layer_matrix(self.module, self._unproject(proj))

    def quadratic(self, v, damping: Damping) -> torch.Tensor:
        mat = layer_matrix(self.module, v)
        if not self.ready:
            return (mat * mat).sum()
        proj = self._project(mat)
        s = self.state["kron_s"].to(mat.dtype)
        return (damping.denominator(s, self.scale()) * proj * proj).sum()
