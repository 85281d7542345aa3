"""Continuous normalizing flows (FFJORD-style) on ODE blocks.

State of every block: ``s = [z, Δlogp, (kinetic), (jacobian)]``, shape ``(N, D + 1 + r)``,
integrated from data (t0) to latent (t1):

    dz/dt = f(t, z),   dΔlogp/dt = −tr(∂f/∂z),   dk/dt = ‖f‖²,   dj/dt = ‖εᵀ ∂f/∂z‖²

so that ``log p(x) = log N(z; 0, I) − Δlogp``. The divergence is exact (D backward passes)
or Hutchinson's estimate ``εᵀ (∂f/∂z) ε`` with a probe ε (Rademacher or Gaussian) drawn once
per forward pass and kept for the whole solve and its backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._errors import bad_value, check_choice, check_positive
from ..ode.block import ODEBlock
from .fields import time_mlp

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


class CNFDynamics(nn.Module):
    """The augmented dynamics of one flow block around a field ``net(t, z)``.

    Args:
        net: the vector field on ``z`` (``(N, D) -> (N, D)``).
        dim: D.
        divergence: ``"exact"`` or ``"hutchinson"``.
        regularizers: number of extra channels (0, 1 or 2): kinetic energy, Jacobian norm.
    """

    def __init__(self, net: nn.Module, dim: int, divergence: str = "exact", extra: int = 0):
        super().__init__()
        self.net = net
        self.dim = dim
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        self.extra = extra
        self.probe: torch.Tensor | None = None
        self.accepts_batched_time = bool(getattr(net, "accepts_batched_time", False))

    def _probe_for(self, n: int) -> torch.Tensor:
        probe = self.probe
        if probe is None:
            raise RuntimeError("CNFDynamics: no probe set; call the CNF, not its block directly")
        if n != probe.shape[0]:  # batched capture evaluations stack several copies
            probe = probe.repeat(n // probe.shape[0], 1)
        return probe

    def forward(self, t, s: torch.Tensor) -> torch.Tensor:
        d = self.dim
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            z = s[:, :d]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f = self.net(t, z)
            probe = None
            if self.divergence == "exact":
                div = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
                for i in range(d):
                    (gi,) = torch.autograd.grad(f[:, i].sum(), z, create_graph=True)
                    div = div + gi[:, i]
            else:
                probe = self._probe_for(f.shape[0])
                (vjp,) = torch.autograd.grad(f, z, probe, create_graph=True)
                div = (vjp * probe).sum(1)
            parts = [f, -div[:, None]]
            if self.extra >= 1:
                parts.append(f.pow(2).sum(1, keepdim=True))
            if self.extra >= 2:
                if probe is None:
                    probe = self._probe_for(f.shape[0])
                    (vjp,) = torch.autograd.grad(f, z, probe, create_graph=True)
                parts.append(vjp.pow(2).sum(1, keepdim=True))
            out = torch.cat(parts, 1)
        return out if create else out.detach()


class CNF(nn.Module):
    """A continuous normalizing flow with a standard-normal base.

    Args:
        dim: data dimension D.
        hidden: hidden widths of each block's concat-squash MLP field.
        activation: field activation (softplus, tanh, elu, relu, silu).
        blocks: number of chained ODE blocks.
        horizon: integration time T of each block (t from 0 to T).
        divergence: ``"exact"`` or ``"hutchinson"``; ``probe``: ``"rademacher"``/``"gaussian"``.
        kinetic, jacobian: weights of the kinetic-energy and Jacobian-norm regularisers
            (0 disables; a positive weight adds an integrated channel).
        method, rtol, atol, gradient, backend, step_control: ODE block settings.

    ``forward(x)`` returns ``(z, delta_logp, reg)``: latent ``(N, D)``, ``(N,)`` and the
    weighted regulariser per sample ``(N,)``. ``log_prob(x)`` is ``(N,)`` in nats.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "softplus",
        blocks: int = 1,
        horizon: float = 1.0,
        divergence: str = "exact",
        probe: str = "rademacher",
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        gradient: str = "adjoint",
        backend: str = "torchdiffeq",
        step_control: str = "batch",
    ):
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise bad_value("blocks", blocks, "an int >= 1")
        self.dim = dim
        self.probe_kind = check_choice("probe", probe, PROBES)
        check_choice("divergence", divergence, DIVERGENCES)
        horizon = check_positive("horizon", horizon)
        self.reg_weights = regulariser_weights(kinetic, jacobian)
        extra = len(self.reg_weights)
        solver = dict(
            method=method,
            rtol=rtol,
            atol=atol,
            gradient=gradient,
            backend=backend,
            step_control=step_control,
        )
        self.blocks = nn.ModuleList(
            cnf_block(
                CNFDynamics(time_mlp(dim, hidden, activation), dim, divergence, extra),
                horizon,
                f"CNF block {i}",
                solver,
            )
            for i in range(blocks)
        )

    @property
    def state_dim(self) -> int:
        return self.dim + 1 + len(self.reg_weights)

    def _set_probes(self, x: torch.Tensor) -> None:
        for block in self.blocks:
            if block.field.divergence == "hutchinson" or block.field.extra >= 2:
                if self.probe_kind == "rademacher":
                    e = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
                else:
                    e = torch.randn_like(x)
                block.field.probe = e

    def feedback_stages(self) -> list[nn.Module]:
        """The stages of OCNOpt's feedback policies: the chained ODE blocks."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor):
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise bad_value("x", x, f"a batch of shape (N, {self.dim})")
        self._set_probes(x)
        s = torch.cat([x, x.new_zeros(x.shape[0], 1 + len(self.reg_weights))], 1)
        for block in self.blocks:
            s = block(s)
        z, dlogp = s[:, : self.dim], s[:, self.dim]
        reg = x.new_zeros(x.shape[0])
        for i, w in enumerate(self.reg_weights):
            reg = reg + w * s[:, self.dim + 1 + i]
        return z, dlogp, reg

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, dlogp, _ = self(x)
        return standard_normal_logprob(z) - dlogp

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood in nats."""
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``(n, D)``: base draws integrated from t1 back to t0."""
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype).to(p.device)
        s = torch.cat([z, z.new_zeros(n, 1 + len(self.reg_weights))], 1)
        self._set_probes(z)
        for block in reversed(self.blocks):
            s = block(s, t=block.t.flip(0))
        return s[:, : self.dim]


def cnf_block(dynamics: CNFDynamics, horizon: float, name: str, solver: dict) -> ODEBlock:
    """One CNF block: ``dynamics`` integrated over ``(0, horizon)`` with the ``solver``
    settings (``method``, ``rtol``, ``atol``, ``gradient``, ``backend``)."""
    return ODEBlock(dynamics, (0.0, horizon), name=name, **solver)


def regulariser_weights(kinetic, jacobian) -> list[float]:
    """The weights of the RNODE regularisers a CNF integrates beside its state (Finlay et al.,
    2020): ``[kinetic]``, ``[kinetic, jacobian]``, ``[0, jacobian]`` (the kinetic slot kept so
    that the Jacobian term has its place) or ``[]``; each weight checked to be a float >= 0."""
    for name, w in (("kinetic", kinetic), ("jacobian", jacobian)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise bad_value(name, w, "a float >= 0")
    if jacobian > 0 and kinetic == 0:
        return [0.0, float(jacobian)]
    return [float(w) for w in (kinetic, jacobian) if w > 0]


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per row, ``(N, D) -> (N,)``."""
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi))


def bits_per_dim(nll_nats, dim: int):
    """A per-sample NLL in nats (a tensor or a float) as bits per dimension: ``nll / (D ln 2)``."""
    return nll_nats / (dim * math.log(2.0))
