"""Terminal Hessian factors at a model's outputs, per sample, for the factor sources.

For a per-sample loss ``ℓ_b`` whose Hessian with respect to the model output ``o_b`` is
``H_b``, a factor set ``y`` (``(R, *outputs.shape)``) satisfies ``Σ_i y_{i,b} y_{i,b}ᵀ = H_b``
(exact) or does so in expectation (sampled).

Likelihoods (``outputs`` and the loss they stand for):

- ``"categorical"``: logits ``(N, K)``; softmax cross-entropy. Exact: ``K`` factors
  ``y_k = √p_k (e_k − p)``. Sampled: ``y_r = (e_ŷ − p)/√R`` with ``ŷ ~ Cat(p)``.
- ``"gaussian"``: predictions ``(N, *feat)``; ``ℓ_b = ½‖o_b − target_b‖²`` (H = I). Exact:
  one factor per output coordinate, ``y_k = e_k``. Sampled: ``y_r ~ N(0, I)/√R``.
- ``"standard_normal"``: the latent ``z`` ``(N, *feat)`` of a flow with a standard-normal base,
  ``ℓ_b = ½‖z_b‖² + const − log|det|`` (H = I on ``z``; the log-determinant channel is linear
  and adds no curvature). Factors as for ``"gaussian"``.

:func:`sampled_cotangent` draws the same Monte-Carlo Fisher as a cotangent of the batch's
*mean* loss, for a backward pass of its own (models whose graph the factor chain cannot
follow, see :mod:`.fisher_backward`).
"""

from __future__ import annotations

import math

import torch

from .._errors import bad_value, check_choice

LIKELIHOODS: tuple[str, ...] = ("categorical", "gaussian", "standard_normal")


def output_factors(
    outputs: torch.Tensor,
    likelihood: str,
    source: str,
    rank: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Factors ``(R, *outputs.shape)`` for ``source`` in {"exact", "sampled"}."""
    check_choice("likelihood", likelihood, LIKELIHOODS)
    out = outputs.detach()
    if likelihood == "categorical":
        if out.dim() != 2:
            raise bad_value(
                "outputs", outputs, "logits of shape (N, K) for likelihood='categorical'"
            )
        p = torch.softmax(out, dim=1)
        n, k = p.shape
        if source == "exact":
            eye = torch.eye(k, dtype=p.dtype, device=p.device)
            # y[k, n, :] = sqrt(p[n, k]) * (e_k - p[n])
            return p.T.sqrt().unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))
        idx = torch.multinomial(p.cpu(), rank, replacement=True, generator=generator)
        onehot = torch.nn.functional.one_hot(idx.T.to(p.device), k).to(p.dtype)  # (R, N, K)
        return (onehot - p.unsqueeze(0)) / math.sqrt(rank)
    n = out.shape[0]
    feat = out.shape[1:]
    d = int(math.prod(feat))
    if source == "exact":
        eye = torch.eye(d, dtype=out.dtype, device=out.device)  # (D, D): factor k, coord
        return eye.unsqueeze(1).expand(d, n, d).reshape(d, n, *feat).clone()
    noise = torch.randn((rank, *out.shape), generator=generator, dtype=out.dtype)
    return noise.to(out.device) / math.sqrt(rank)


def gauss_newton_quadratic(
    likelihood: str,
    outputs: torch.Tensor,
    delta: torch.Tensor,
    grad_outputs: torch.Tensor | None = None,
    loss_change: float | None = None,
) -> float:
    """``δᵀ H δ``: the curvature of the training loss in the outputs along ``delta``.

    ``H`` is the Hessian of the loss (a mean over the batch) with respect to ``outputs`` at
    ``outputs``; with ``delta = J e`` (or its secant ``o(θ−e) − o(θ)``) this is the
    Gauss–Newton product ``eᵀ G e``.

    - ``"categorical"``: mean softmax cross-entropy on logits ``(N, K)``:
      ``mean_b [Σ_k p_k δ_k² − (Σ_k p_k δ_k)²]``.
    - ``"standard_normal"``: the latent of a flow, loss ``mean_b ½‖z_b‖² + ...``:
      ``mean_b ‖δ_b‖²``.
    - ``"gaussian"``: any loss quadratic in the outputs (masked or weighted MSE under any
      normalisation): from the loss's change ``ΔL`` over ``delta`` and its gradient
      ``∇_o L`` at ``outputs``, ``δᵀHδ = 2 (ΔL − ∇_o L · δ)`` exactly; without them the
      unmasked ``mean_b ‖δ_b‖²`` of ``½‖o − y‖²``.
    """
    check_choice("likelihood", likelihood, LIKELIHOODS)
    d = delta.detach()
    n = max(d.shape[0], 1)
    if likelihood == "categorical":
        p = torch.softmax(outputs.detach(), dim=1)
        pd = (p * d).sum(1)
        return float(((p * d * d).sum(1) - pd * pd).sum() / n)
    if likelihood == "gaussian" and grad_outputs is not None and loss_change is not None:
        return max(0.0, 2.0 * (loss_change - float((grad_outputs.detach() * d).sum())))
    return float(d.pow(2).sum() / n)


def sampled_cotangent(
    loss: torch.Tensor,
    outputs: torch.Tensor,
    likelihood: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A cotangent ``s`` at ``outputs`` (same shape) drawn so that, per sample ``b``,
    ``N E[s_b s_bᵀ] = H_b / N``: backpropagated in place of ``∂L/∂outputs`` it gives the
    statistics of the empirical rule with the Monte-Carlo Fisher (Gauss–Newton) in place of
    the empirical Fisher (``L`` the batch's mean loss, ``N = outputs.shape[0]``, ``H_b`` the
    Hessian of sample ``b``'s own loss).

    - ``"categorical"``: logits ``(N, K)`` of a mean softmax cross-entropy:
      ``s_b = (e_ŷ − p_b)/N`` with ``ŷ ~ Cat(p_b)``.
    - ``"gaussian"`` and ``"standard_normal"``: ``s = ε ⊙ sqrt(diag(∇²_o L) / N)``, ``ε`` standard
      normal, with the diagonal of the loss's own Hessian in the outputs read off one
      Hessian-vector product with a Rademacher vector ``r``: ``r ⊙ (∇²_o L) r``. That is
      exact for losses whose Hessian in the outputs is diagonal (a masked or weighted MSE
      under any normalisation); masked entries get no draw.
    """
    check_choice("likelihood", likelihood, LIKELIHOODS)
    out = outputs.detach()
    n = max(out.shape[0], 1)
    if likelihood == "categorical":
        return output_factors(outputs, likelihood, "sampled", 1, generator)[0] / n
    (g,) = torch.autograd.grad(loss, outputs, create_graph=True)
    if g.grad_fn is None:
        raise bad_value(
            "loss",
            "a loss linear in outputs",
            f"a loss with curvature in the outputs for likelihood={likelihood!r}",
            "Use factors='empirical'.",
        )
    r = torch.randint(0, 2, out.shape, generator=generator).to(out) * 2 - 1
    (hr,) = torch.autograd.grad(g, outputs, r, retain_graph=True, allow_unused=True)
    diag = torch.zeros_like(out) if hr is None else (hr.detach() * r).clamp_min(0.0)
    eps = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
    return eps * (diag / n).sqrt()
