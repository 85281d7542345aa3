"""Latent ODE for irregularly sampled series (Chen et al., 2018; Rubanova, Chen & Duvenaud,
2019).

Generative model: a latent state ``z0 ~ N(0, I)`` at ``t = 0`` follows ``dz/dt = f(t, z)``
(one :class:`~node_ocp.ode.block.ODEBlock`); an observation at time ``t`` is
``x(t) ~ N(g(z(t)), σ² I)`` on its observed channels, ``g`` an MLP decoder and ``σ``
``obs_std``.

Recognition: an ODE-RNN (:class:`~node_ocp.models.timeseries.ODERNN`) reads the observed
points backward in time — from each series' last observation to ``t = 0`` — and its head
gives ``q(z0 | x) = N(μ, diag s²)``.

Training maximises the evidence lower bound over the points the model is asked to explain
(a forecast's observed past and its future; an interpolation's kept and held-out points):

- ``samples = 1``: ``E_q[log p(x | z0)] − w · KL(q || N(0, I))`` with the KL in closed form
  and one reparameterised draw, ``w`` the KL weight (annealed from 0 to 1 when asked);
- ``samples = K > 1``: the importance-weighted bound (IWAE, Burda et al., 2016)
  ``log (1/K) Σ_k exp(log p(x | z_k) + w · (log p(z_k) − log q(z_k | x)))``.

Times are those of the data (``>= 0``; every bundled and file series starts at 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .._errors import bad_type, bad_value
from ..data.irregular import IrregularBatch
from ..ode.block import ODEBlock
from .fields import time_mlp
from .timeseries import ODERNN

#: the smallest posterior standard deviation (keeps ``log s`` finite)
MIN_STD = 1e-4


class ELBOTerms(NamedTuple):
    """What one training forward returns.

    outputs: ``(K·B, P, C)`` the decoded means at the bound's points (sample-major), what
        OCNOpt's ``gaussian`` likelihood reads.
    neg_elbo: scalar, ``−Σ_b bound_b`` summed over the batch's series.
    count: scalar, the number of observed values the bound explains (for per-value figures).
    loss_inputs: ``(K·B·P·C + 2·B·L,)`` for ``samples = 1``: the decoded means, ``mu`` and
        ``std`` flattened and concatenated, the bound computed from them alone (the draw
        fixed), so its Hessian in them is the bound's own (OCNOpt's subspace step reads the
        exact Gauss–Newton model of the whole bound through it); None for ``K > 1`` (the
        importance weights depend on the draws themselves).
    """

    outputs: torch.Tensor
    neg_elbo: torch.Tensor
    count: torch.Tensor
    loss_inputs: torch.Tensor | None = None


def gaussian_kl(mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag std²) || N(0, I))`` per row: ``(B, L), (B, L) -> (B,)``."""
    return (0.5 * (std**2 + mu**2) - torch.log(std) - 0.5).sum(-1)


def gaussian_log_density(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(x; mu, diag std²)`` summed over the last dimension (broadcasting)."""
    z = (x - mu) / std
    return (-0.5 * z**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


def observation_log_likelihood(
    preds: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, obs_std: float
) -> torch.Tensor:
    """``Σ`` over observed entries of ``log N(values; preds, obs_std²)``.

    ``preds (K, B, P, C)``, ``values``/``mask (B, P, C)`` -> ``(K, B)``.
    """
    m = mask.to(preds.dtype)
    per = -0.5 * ((preds - values) / obs_std) ** 2 - math.log(obs_std) - 0.5 * math.log(2 * math.pi)
    return (per * m).sum((-1, -2))


def bound_per_series(
    log_lik: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    std: torch.Tensor,
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """The evidence lower bound of each series.

    ``log_lik (K, B)`` the observation log-likelihood of each draw ``z (K, B, L)`` of
    ``q = N(mu, diag std²)`` (``mu``, ``std`` ``(B, L)``) -> ``(B,)``: the ELBO with the
    closed-form KL for ``K = 1``, the importance-weighted bound for ``K > 1``; the prior
    term weighted by ``kl_weight``.
    """
    if log_lik.shape[0] == 1:
        return log_lik[0] - kl_weight * gaussian_kl(mu, std)
    log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.ones_like(z))
    log_q = gaussian_log_density(z, mu, std)
    log_w = log_lik + kl_weight * (log_prior - log_q)
    return torch.logsumexp(log_w, 0) - math.log(log_lik.shape[0])


def _reversed(batch: IrregularBatch) -> IrregularBatch:
    """The batch in reversed time ``s = −t`` (each series' points in reverse order)."""
    return IrregularBatch(-batch.times.flip(1), batch.values.flip(1), batch.mask.flip(1))


class LatentODE(nn.Module):
    """Latent ODE with an ODE-RNN recognition network run backward in time.

    Args:
        channels: C, observed channels (predicted at every time of interest).
        latent: L, size of the latent state z.
        hidden: size of the recognition ODE-RNN's hidden state.
        encoder_hidden: hidden widths of the recognition ODE-RNN's field.
        field_hidden: hidden widths of the latent field ``f`` (a tanh concat-squash MLP).
        decoder_hidden: hidden widths of the decoder MLP ``g`` (tanh).
        obs_std: σ of the Gaussian observation model.
        samples: K, posterior draws per series in training (``> 1``: the IWAE bound).
        method, rtol, atol, gradient, backend, step_control: the ODE blocks' settings.

    ``forward(batch, query_times (B, Q))`` -> ``(B, Q, C)``: the decoded mean from the
    posterior mean of ``z0`` (deterministic; what MSE figures use).
    ``forward(batch, query_times, targets=y)`` -> :class:`ELBOTerms` of the bound over
    ``batch``'s observed points and ``y``'s (``query_times`` is then ``y.times``).
    :meth:`sample_forecasts` draws decoded trajectories from the posterior (bands).
    """

    #: training calls ``forward(..., targets=y)`` for the bound (see ForecastTask)
    owns_objective = True

    def __init__(
        self,
        channels: int,
        latent: int = 6,
        hidden: int = 32,
        encoder_hidden=(32,),
        field_hidden=(32,),
        decoder_hidden=(32,),
        obs_std: float = 0.1,
        samples: int = 1,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        gradient: str = "adjoint",
        backend: str = "torchdiffeq",
        step_control: str = "batch",
    ):
        super().__init__()
        for name, v in (("channels", channels), ("latent", latent), ("samples", samples)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_value(name, v, "an int >= 1")
        if not (isinstance(obs_std, (int, float)) and obs_std > 0 and math.isfinite(obs_std)):
            raise bad_value("obs_std", obs_std, "a finite float > 0")
        solver = {
            "method": method,
            "rtol": rtol,
            "atol": atol,
            "gradient": gradient,
            "backend": backend,
            "step_control": step_control,
        }
        self.channels, self.latent = channels, latent
        self.obs_std, self.samples = float(obs_std), samples
        #: the prior term's weight in training (set per step by KL annealing)
        self.kl_weight = 1.0
        self.encoder = ODERNN(
            channels, 2 * latent, hidden, tuple(encoder_hidden), task="forecast", **solver
        )
        self.encoder.ode.name = "recognition ODE-RNN block"
        self.ode = ODEBlock(
            time_mlp(latent, tuple(field_hidden), "tanh"), (0.0, 1.0), **solver, name="latent ODE"
        )
        widths = [latent, *decoder_hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        layers.append(nn.Linear(widths[-1], channels))
        self.decoder = nn.Sequential(*layers)

    def feedback_stages(self) -> list[nn.Module]:
        """The stages of OCNOpt's feedback policies: the recognition network's cell, block
        and head, the latent ODE block, the decoder (cell and block are called once per
        observation interval and take the open-loop step)."""
        e = self.encoder
        return [e.gru, e.ode, e.head, self.ode, self.decoder]

    # ------------------------------------------------------------------ parts
    def posterior(self, batch: IrregularBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z0 | batch)``: ``(mu (B, L), std (B, L))``."""
        self._check(batch, "batch")
        zero = batch.times.new_zeros(len(batch), 1)
        out = self.encoder(_reversed(batch), zero)[:, 0]  # (B, 2L) at s = 0, i.e. t = 0
        mu, raw = out.split(self.latent, dim=-1)
        return mu, F.softplus(raw) + MIN_STD

    def decode(self, z0: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Decoded means at ``times (B, P)`` (any order, ``>= 0``) from ``z0 (K, B, L)`` at
        ``t = 0`` -> ``(K, B, P, C)``: one solve of the latent ODE over the union of the
        times, for all draws and series at once."""
        k, b, n = z0.shape
        grid = torch.unique(torch.cat([times.new_zeros(1), times.reshape(-1)]).to(z0.dtype))
        flat = z0.reshape(k * b, n)
        if grid.numel() == 1:
            path = flat[None]
        else:
            path = self.ode(flat, t=grid)
            if grid.numel() == 2:  # a pair returns the end state only
                path = torch.stack([flat, path])
        path = path.reshape(grid.numel(), k, b, n).permute(1, 2, 0, 3)  # (K, B, T, L)
        idx = torch.searchsorted(grid, times.to(z0.dtype).contiguous())  # (B, P)
        idx = idx.clamp_max(grid.numel() - 1)[None, :, :, None].expand(k, b, -1, n)
        return self.decoder(torch.gather(path, 2, idx))

    def sample_forecasts(
        self, batch: IrregularBatch, query_times: torch.Tensor, samples: int = 20
    ) -> torch.Tensor:
        """Decoded means at ``query_times (B, Q)`` for ``samples`` posterior draws of z0:
        ``(S, B, Q, C)`` (the model's uncertainty about the trajectory)."""
        mu, std = self.posterior(batch)
        z = mu + std * torch.randn(samples, *mu.shape, dtype=mu.dtype, device=mu.device)
        return self._forecast(z, batch, query_times)

    def _forecast(self, z0: torch.Tensor, batch: IrregularBatch, query_times) -> torch.Tensor:
        """Decoded means at ``query_times (B, Q)`` from ``z0 (K, B, L)`` -> ``(K, B, Q, C)``,
        solved over the batch's own times with the query times, as the bound is in
        training: a fixed-grid solver (rk4, ...) steps on the union of the times it is
        given, and the query times alone (a forecast's future) would give it one long
        first step from ``t = 0`` that the trained model never saw."""
        query = self._query(query_times, batch)
        times = torch.cat([batch.times, query.to(batch.times.dtype)], 1)
        return self.decode(z0, times)[:, :, batch.times.shape[1] :]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        batch: IrregularBatch,
        query_times: torch.Tensor | None = None,
        targets: IrregularBatch | None = None,
        kl_weight: float | None = None,
    ):
        mu, std = self.posterior(batch)
        if targets is None:
            if query_times is None:
                raise bad_value("query_times", None, "a (B, Q) tensor of times")
            return self._forecast(mu[None], batch, query_times)[0]
        self._check(targets, "targets")
        if len(targets) != len(batch):
            raise bad_value("targets", targets, f"an IrregularBatch of {len(batch)} series")
        times = torch.cat([batch.times, targets.times], 1)
        values = torch.cat([batch.values, targets.values], 1)
        mask = torch.cat([batch.mask, targets.mask], 1)
        eps = torch.randn(self.samples, *mu.shape, dtype=mu.dtype, device=mu.device)
        z = mu + std * eps  # (K, B, L), reparameterised
        preds = self.decode(z, times)
        # the outputs the bound is read from (a likelihood's Hessian is taken through them)
        outputs = preds.reshape(-1, *preds.shape[2:])
        w = self.kl_weight if kl_weight is None else float(kl_weight)
        means, mu_, std_, loss_inputs = outputs, mu, std, None
        if self.samples == 1:  # the bound a function of (means, mu, std) alone
            loss_inputs = torch.cat([outputs.reshape(-1), mu.reshape(-1), std.reshape(-1)])
            means, mu_, std_ = (
                part.view(t.shape)
                for part, t in zip(
                    loss_inputs.split([outputs.numel(), mu.numel(), std.numel()]),
                    (outputs, mu, std),
                )
            )
        log_lik = observation_log_likelihood(means.view(preds.shape), values, mask, self.obs_std)
        bound = bound_per_series(log_lik, z, mu_, std_, w)
        return ELBOTerms(outputs, -bound.sum(), mask.sum().to(preds.dtype), loss_inputs)

    def _check(self, batch, name: str) -> None:
        if not isinstance(batch, IrregularBatch):
            raise bad_type(name, batch, "an IrregularBatch (see node_ocp.data)")
        if batch.values.shape[-1] != self.channels:
            raise bad_value(
                f"{name}.values", batch.values, f"{self.channels} channels in the last dimension"
            )
        if bool((batch.times[batch.valid] < 0).any()):
            raise bad_value(
                f"{name}.times",
                batch.times,
                "times >= 0 (the latent ODE starts at t = 0; shift the series)",
            )

    def _query(self, query_times, batch: IrregularBatch) -> torch.Tensor:
        if not isinstance(query_times, torch.Tensor) or query_times.dim() != 2:
            raise bad_value("query_times", query_times, f"a ({len(batch)}, Q) tensor of times")
        if query_times.shape[0] != len(batch):
            raise bad_value("query_times", query_times, f"shape ({len(batch)}, Q)")
        if bool((query_times < 0).any()):
            raise bad_value("query_times", query_times, "times >= 0")
        return query_times
