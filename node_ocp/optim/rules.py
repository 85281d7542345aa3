"""Preconditioning rules: one object per unit of parameters.

A *unit* is what one curvature block covers:

- :class:`KroneckerRule` — an ``nn.Linear`` / ``nn.Conv2d`` layer (weight and bias together)
  with Kronecker factors ``A`` (inputs, ``K×K``) and ``B`` (output gradients, ``d×d``),
  preconditioned as ``kfac`` or ``ekfac``.
- :class:`DenseRule` — all parameters of one ODE block's field with the exact damped
  Gauss–Newton matrix (tiny fields).
- :func:`diagonal_direction` — the adaptive diagonal (RMSprop/Adam-like) rule for any tensor.

Each rule keeps its state in the optimizer's per-parameter ``state`` dict (keys prefixed
``kron_`` / ``dense_`` / ``diag_``) so that ``state_dict()`` carries it.
"""

from __future__ import annotations

import torch
from torch import nn


def layer_gradient_matrix(module: nn.Module, directions: dict) -> torch.Tensor:
    """The gradient of a layer as a ``(d_out, K)`` matrix: ``[W.reshape(d_out, -1), b]``."""
    w = directions[module.weight]
    mat = w.reshape(w.shape[0], -1)
    if module.bias is not None:
        mat = torch.cat([mat, directions[module.bias].reshape(-1, 1)], dim=1)
    return mat


def split_layer_matrix(module: nn.Module, mat: torch.Tensor) -> dict:
    """Inverse of :func:`layer_gradient_matrix`: ``{weight: ..., bias: ...}``."""
    out = {}
    k_w = module.weight[0].numel()
    out[module.weight] = mat[:, :k_w].reshape(module.weight.shape)
    if module.bias is not None:
        out[module.bias] = mat[:, k_w].reshape(module.bias.shape)
    return out


def _eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sym = 0.5 * (mat + mat.T)
    evals, evecs = torch.linalg.eigh(sym)
    return evals.clamp_min(0.0), evecs


class KroneckerRule:
    """K-FAC / EKFAC preconditioning of one layer.

    ``refresh(A, B)`` takes normalised factors (``A ≈ E[∫ ū ūᵀ dt]``, ``B ≈ E[∫ g gᵀ dt]``)
    and recomputes the eigendecompositions. ``direction(G, damping, alpha)`` maps the
    gradient matrix ``G`` (``(d_out, K)``) to the update direction:

    - ``kfac``:  ``Q_B [(Q_Bᵀ G Q_A) / ((λ_B + √ε)(λ_A + √ε)ᵀ)] Q_Aᵀ``
      = ``(B + √ε I)⁻¹ G (A + √ε I)⁻¹``
    - ``ekfac``: ``G̃ = Q_Bᵀ G Q_A``; the diagonal ``s`` in the eigenbasis starts at each refresh
      from the K-FAC eigenvalues ``λ_B λ_Aᵀ`` (per-sample scale) and is re-estimated every step
      as ``s ← α s + (1 − α) n G̃²`` (the squared projected batch gradient, times the batch
      size ``n`` of the refresh so that it estimates the same per-sample second moment);
      direction ``Q_B [G̃ / (s + ε)] Q_Aᵀ``.

    Before the first refresh the direction is ``G`` itself.
    """

    def __init__(self, module: nn.Module, variant: str, state: dict):
        self.module = module
        self.variant = variant
        self.state = state  # the optimizer's state dict of module.weight

    @property
    def ready(self) -> bool:
        return "kron_QA" in self.state

    def refresh(self, a_mat: torch.Tensor, b_mat: torch.Tensor, batch: float) -> None:
        ea, qa = _eigh(a_mat)
        eb, qb = _eigh(b_mat)
        self.set_eigen(qa, qb, ea, eb, batch)

    def eigen(self) -> list[torch.Tensor]:
        """``[Q_A, Q_B, λ_A, λ_B]`` of the last refresh (what a distributed refresh sends)."""
        st = self.state
        return [st["kron_QA"], st["kron_QB"], st["kron_eA"], st["kron_eB"]]

    def set_eigen(self, qa, qb, ea, eb, batch: float) -> None:
        """Install eigendecompositions (computed here or received from another process)."""
        st = self.state
        st["kron_QA"], st["kron_QB"] = qa, qb
        st["kron_eA"], st["kron_eB"] = ea, eb
        st["kron_n"] = float(batch)
        if self.variant == "ekfac":
            st["kron_s"] = eb[:, None] * ea[None, :]

    def direction(self, grad: torch.Tensor, damping: float, alpha: float) -> torch.Tensor:
        if not self.ready:
            return grad
        st = self.state
        qa, qb = st["kron_QA"].to(grad.dtype), st["kron_QB"].to(grad.dtype)
        proj = qb.T @ grad @ qa
        if self.variant == "kfac":
            root = damping**0.5
            scale = (st["kron_eB"].to(grad.dtype) + root)[:, None] * (
                st["kron_eA"].to(grad.dtype) + root
            )[None, :]
            return qb @ (proj / scale) @ qa.T
        sq = proj * proj
        st["kron_s"] = (
            st["kron_s"].to(grad.dtype).mul(alpha).add_(sq, alpha=(1.0 - alpha) * st["kron_n"])
        )
        return qb @ (proj / (st["kron_s"] + damping)) @ qa.T


class DenseRule:
    """Exact damped Gauss–Newton preconditioning of one block's field parameters.

    ``refresh(G)`` takes the normalised Gauss–Newton matrix ``(P, P)`` (kept, so that the
    damping may follow a schedule); ``direction(g, damping)`` solves ``(G + ε I) u = g``
    with a Cholesky factor computed once per refresh (and per damping value).
    """

    def __init__(self, params: list[torch.Tensor], state: dict):
        self.params = params
        self.state = state  # the optimizer's state dict of params[0]

    @property
    def ready(self) -> bool:
        return "dense_G" in self.state

    def refresh(self, gn: torch.Tensor) -> None:
        self.state["dense_G"] = 0.5 * (gn + gn.T)
        self.state.pop("dense_chol", None)

    def direction(self, directions: dict, damping: float) -> dict:
        flat = torch.cat([directions[p].reshape(-1) for p in self.params])
        if not self.ready:
            return {p: directions[p] for p in self.params}
        if self.state.get("dense_damping") != damping or "dense_chol" not in self.state:
            gn = self.state["dense_G"]
            eye = torch.eye(gn.shape[0], dtype=gn.dtype, device=gn.device)
            self.state["dense_chol"] = torch.linalg.cholesky(gn + damping * eye)
            self.state["dense_damping"] = damping
        chol = self.state["dense_chol"].to(flat.dtype)
        u = torch.cholesky_solve(flat.unsqueeze(1), chol).squeeze(1)
        out, i = {}, 0
        for p in self.params:
            out[p] = u[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return out


def diagonal_direction(grad: torch.Tensor, state: dict, beta: float, eps: float) -> torch.Tensor:
    """RMSprop/Adam-like: ``v ← β v + (1 − β) g²``, direction ``g / (√(v / (1 − βᵗ)) + eps)``."""
    if "diag_v" not in state:
        state["diag_v"] = torch.zeros_like(grad)
        state["diag_t"] = 0
    state["diag_t"] += 1
    v = state["diag_v"]
    v.mul_(beta).addcmul_(grad, grad, value=1.0 - beta)
    corrected = v / (1.0 - beta ** state["diag_t"])
    return grad / (corrected.sqrt() + eps)
