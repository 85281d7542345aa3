"""What the Kronecker variants (kfac, ekfac) share: a layer's gradient as a matrix and the
eigendecompositions of its factors.

For a tapped layer (``nn.Linear``, ``nn.Conv2d``) the gradient is the ``(d_out, K)`` matrix
``G = [W.reshape(d_out, -1), b]`` and the curvature ``A ⊗ B`` with ``A`` (``K×K``) from the
layer inputs and ``B`` (``d_out×d_out``) from the output gradients, normalised per sample.
``refresh`` eigendecomposes both: ``A = Q_A diag(λ_A) Q_Aᵀ``, ``B = Q_B diag(λ_B) Q_Bᵀ``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import CurvatureUnit


def layer_matrix(module: nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[weight.reshape(d_out, -1), bias]`` as a ``(d_out, K)`` matrix (``tensors`` in the
    order ``[weight, bias]``)."""
    w = tensors[0]
    mat = w.reshape(w.shape[0], -1)
    if len(tensors) > 1:
        mat = torch.cat([mat, tensors[1].reshape(-1, 1)], dim=1)
    return mat


def split_layer_matrix(module: nn.Module, mat: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`layer_matrix`: ``[weight, bias]`` shaped like the layer's."""
    k_w = module.weight[0].numel()
    out = [mat[:, :k_w].reshape(module.weight.shape)]
    if module.bias is not None:
        out.append(mat[:, k_w].reshape(module.bias.shape))
    return out


def symmetric_eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of the symmetric part of ``mat``.

    If LAPACK fails to converge (an ill-conditioned factor, many repeated eigenvalues), the
    decomposition is retried in float64 with a jitter of 1e-10 of the mean eigenvalue.
    """
    sym = 0.5 * (mat + mat.T)
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        wide = sym.double()
        jitter = 1e-10 * float(wide.diagonal().mean().abs()) + 1e-30
        eye = torch.eye(wide.shape[0], dtype=wide.dtype, device=wide.device)
        evals, evecs = torch.linalg.eigh(wide + jitter * eye)
        evals, evecs = evals.to(mat.dtype), evecs.to(mat.dtype)
    return evals.clamp_min(0.0), evecs


class KroneckerUnit(CurvatureUnit):
    """Base of the layer units: eigenbases of ``A`` and ``B`` refreshed from statistics.

    State: ``kron_QA``, ``kron_QB`` (eigenvectors), ``kron_eA``, ``kron_eB`` (eigenvalues),
    ``kron_n`` (samples behind the statistics).
    """

    scope = "layer"
    needs = "kronecker"

    def __init__(self, params, state, module=None):
        super().__init__(params, state, module)
        if module is None:
            raise ValueError(f"{type(self).__name__} needs the layer it preconditions")

    @property
    def ready(self) -> bool:
        return "kron_QA" in self.state

    def refresh(self, stats) -> None:
        ea, qa = symmetric_eigh(stats.A)
        eb, qb = symmetric_eigh(stats.B)
        self.set_decomposition([qa, qb, ea, eb], stats.samples)

    def decomposition(self) -> list[torch.Tensor]:
        """``[Q_A, Q_B, λ_A, λ_B]`` (what a distributed refresh broadcasts)."""
        st = self.state
        return [st["kron_QA"], st["kron_QB"], st["kron_eA"], st["kron_eB"]]

    def set_decomposition(self, tensors: list[torch.Tensor], samples: float) -> None:
        """Install eigendecompositions computed here or received from another process."""
        st = self.state
        st["kron_QA"], st["kron_QB"], st["kron_eA"], st["kron_eB"] = tensors
        st["kron_n"] = float(samples)

    def factor_means(self) -> tuple[float, float]:
        """``(tr A / dim A, tr B / dim B)``."""
        st = self.state
        return float(st["kron_eA"].mean()), float(st["kron_eB"].mean())

    def scale(self) -> float:
        if not self.ready:
            return 1.0
        ma, mb = self.factor_means()
        return ma * mb if ma * mb > 0 else 1.0

    def _project(self, mat: torch.Tensor) -> torch.Tensor:
        st = self.state
        return st["kron_QB"].to(mat.dtype).T @ mat @ st["kron_QA"].to(mat.dtype)

    def _unproject(self, proj: torch.Tensor) -> torch.Tensor:
        st = self.state
        return st["kron_QB"].to(proj.dtype) @ proj @ st["kron_QA"].to(proj.dtype).T
