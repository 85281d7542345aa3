"""The own adjoint's backward solve with per-sample step control.

The augmented state of :mod:`node_ocp.ode.adjoint` splits in two: the parts with one row per
sample, ``x``, ``a`` and the factors ``q`` (laid out here per sample: row ``b`` is
``[x_b, a_b, q_{1,b}..q_{R,b}]``), which the per-sample loop (:mod:`node_ocp.ode.per_sample`)
steps with each sample's own step, and the parameter accumulators ``∫(∂f/∂θ)ᵀa dt``, a sum
over samples, which have no row of their own. They are integrated as a shared integral: each
stage's evaluation keeps its graph and signed cotangent (a token), and after each decision
one backward through the stages' graphs with the cotangent of sample ``b`` at stage ``i``
weighted by that sample's own step weight ``W[i, b]`` (``dt_b`` times the solution row for
an accepted step, the dense-output weights for the step that passes its last output time,
zero for a rejected or finished sample) adds ``Σ_i Σ_b W[i, b] (∂f_b/∂θ)ᵀ a_b`` — the sum of
each sample's own parameter integral. This costs a second backward pass through the stages
of each step for the parameters (the stage's own pass gives ``(∂f/∂x)ᵀ[a, q]``).

The error norm of each sample is the mixed RMS norm (the max over parts of each part's RMS)
over ``x, a, q`` (``adjoint_norm="seminorm"``) or ``x, a`` (``"state"``). The curvature
capture's sample times are output times of the per-sample solve: every sample passes through
each of them by its step's dense output (steps unchanged). Dense curvature capture (per-sample
parameter integrals) is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .._errors import bad_value
from .calls import FieldCall
from .checked import check_solution, solver_error
from .counters import SolveCounters
from .settings import SolveSettings

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .factors import SolveRecord


class PerSampleDynamics:
    """The backward dynamics on the per-sample state ``(B, (2 + R)·F)`` (``F`` the features
    of one sample), called with one time per row; returns the derivative and the token of
    the parameter integrand (see the module's docstring). ``reverse``: as
    :class:`~node_ocp.ode.adjoint.AugmentedDynamics` (called with ``s = -t``)."""

    def __init__(self, call: FieldCall, params: tuple, x_shape, rank: int, reverse: bool):
        self.call = call
        self.params = params
        self.x_shape = torch.Size(x_shape)
        self.rank = rank
        self.reverse = reverse
        self.n_feat = self.x_shape[1:].numel()

    @property
    def last_t(self):
        return self.call.last_t

    def pack(self, x, a, q) -> torch.Tensor:
        """``x``, ``a`` ``(B, *feat)``, ``q`` ``(R, B, *feat)`` or None -> ``(B, M)``."""
        b = self.x_shape[0]
        parts = [x.reshape(b, -1), a.reshape(b, -1)]
        if self.rank:
            parts.append(q.reshape(self.rank, b, -1).transpose(0, 1).reshape(b, -1))
        return torch.cat(parts, dim=1)

    def unpack(self, y: torch.Tensor):
        """``(..., B, M)`` -> ``x``, ``a`` ``(..., B, *feat)``, ``q`` ``(..., R, B, *feat)``."""
        lead = y.shape[:-2]
        b, n = self.x_shape[0], self.n_feat
        feat = self.x_shape[1:]
        x = y[..., :n].reshape(*lead, b, *feat)
        a = y[..., n : 2 * n].reshape(*lead, b, *feat)
        q = None
        if self.rank:
            q = y[..., 2 * n :].reshape(*lead, b, self.rank, *feat)
            q = q.transpose(-2 - len(feat), -1 - len(feat))
        return x, a, q

    def norm(self, kind: str):
        """Per-sample mixed RMS norm over ``x, a, q`` (``seminorm``) or ``x, a``."""
        n, rank = self.n_feat, self.rank
        bounds = [(0, n), (n, 2 * n)]
        if kind == "seminorm" and rank:
            bounds.append((2 * n, (2 + rank) * n))
        bounds = [(lo, hi) for lo, hi in bounds if hi > lo]

        def norm(v: torch.Tensor) -> torch.Tensor:
            out = None
            for lo, hi in bounds:
                r = v[:, lo:hi].pow(2).mean(dim=1).sqrt()
                out = r if out is None else torch.maximum(out, r)
            return v.new_zeros(v.shape[0]) if out is None else out

        return norm

    def __call__(self, t: torch.Tensor, y: torch.Tensor):
        x, a, q = self.unpack(y)
        reverse = self.reverse
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            f = self.call(-t if reverse else t, xg)
            signed_a = a if reverse else -a
            if not f.requires_grad:
                vx = None
            elif self.rank:
                cot = torch.cat([a.unsqueeze(0), q])
                (vx,) = torch.autograd.grad(
                    f, xg, cot if reverse else -cot, retain_graph=True, is_grads_batched=True
                )
            else:
                (vx,) = torch.autograd.grad(f, xg, signed_a, retain_graph=True)
        dx = -f if reverse else f
        if vx is None:
            dv = y.new_zeros(y.shape[0], (1 + self.rank) * self.n_feat)
            vx = dv.view(-1)
            parts = [dx.detach().reshape(y.shape[0], -1), dv]
        elif self.rank:
            b = y.shape[0]
            parts = [
                dx.detach().reshape(b, -1),
                vx[0].reshape(b, -1),
                vx[1:].reshape(self.rank, b, -1).transpose(0, 1).reshape(b, -1),
            ]
        else:
            parts = [dx.detach().reshape(y.shape[0], -1), vx.reshape(y.shape[0], -1)]
        token = (f, signed_a.detach()) if f.requires_grad and self.params else None
        return torch.cat(parts, dim=1), token

    def accumulator(self, acc: list):
        """The ``shared`` callback of the per-sample solve: adds the weighted parameter
        integrands of each step's stages to ``acc`` (in place)."""
        params = self.params
        shape = (-1,) + (1,) * (len(self.x_shape) - 1)

        def add(slots: list, weights: torch.Tensor) -> None:
            outs, cots = [], []
            for i, pieces in enumerate(slots):
                for token, rows in pieces:
                    if token is None:
                        continue
                    f, signed_a = token
                    w = torch.where(rows, weights[i], 0.0).to(f.dtype)
                    outs.append(f)
                    cots.append(signed_a * w.view(shape))
            if not outs or not params:
                return
            grads = torch.autograd.grad(outs, params, cots, retain_graph=True, allow_unused=True)
            for buf, g in zip(acc, grads):
                if g is not None:
                    buf.add_(g)

        return add


def adjoint_backward_per_sample(
    field: nn.Module,
    settings: SolveSettings,
    counters: SolveCounters,
    record: SolveRecord,
    grid: torch.Tensor,
    ys: torch.Tensor,
    params: tuple,
    grad_ys: torch.Tensor,
    need_t: bool,
):
    """:func:`~node_ocp.ode.adjoint.adjoint_backward` with per-sample step control in the
    backward solve (same arguments and returns)."""
    capture = record.capture
    if capture is not None and capture.dense_enabled:
        raise bad_value(
            f"{settings.name}.step_control",
            "per_sample",
            "step_control='batch' with dense curvature capture (per-sample parameter "
            "integrals are not integrated with per-sample steps)",
            "Use step_control='batch' for curvature='dense', or a Kronecker curvature.",
        )
    n_times = grid.numel()
    factors = record.factors_per_time(n_times)
    rank = record.rank
    kron = capture is not None and capture.kronecker_enabled
    call = FieldCall(field, counters, settings.name, backward=True)
    spec = settings.backward
    reverse = bool(grid[0] < grid[-1])
    dyn = PerSampleDynamics(call, params, ys.shape[1:], rank, reverse)
    norm = dyn.norm(settings.adjoint_norm)
    acc = [torch.zeros_like(p) for p in params]
    add = dyn.accumulator(acc)

    grad_ys = grad_ys.to(ys.dtype)
    a = grad_ys[-1]
    q = factors[:, -1] if rank else None
    grad_t = torch.zeros_like(grid) if need_t else None
    for k in range(n_times - 1, 0, -1):
        if need_t:
            with torch.no_grad():
                grad_t[k] = (grad_ys[k] * call(grid[k], ys[k])).sum()
        if kron:
            samples, weight = capture.sample_grid(grid[k], grid[k - 1], like=grid)
            times = torch.cat([grid[k : k + 1], samples, grid[k - 1 : k]])
        else:
            times = grid[[k, k - 1]]
        state = dyn.pack(ys[k], a, q)
        try:
            with torch.no_grad():
                sol = spec.integrate_per_sample(
                    dyn, state, -times if reverse else times, norm=norm, shared=add
                )
        except AssertionError as err:
            raise solver_error(settings, err, dyn, times, spec, "backward") from err
        if settings.check_finite:
            check_solution(settings, sol, times, spec, "backward")
        if kron:
            xs, a_s, q_s = dyn.unpack(sol[1:-1])
            qs = q_s if rank else a_s.unsqueeze(1)
            counters.capture += capture.accumulate_kronecker(field, samples, weight, xs, qs)
        _, a, q = dyn.unpack(sol[-1])
        if need_t and k == 1:
            with torch.no_grad():
                grad_t[0] = -(a * call(grid[0], ys[0])).sum()
        a = a + grad_ys[k - 1]
        if rank:
            q = q + factors[:, k - 1]
    if settings.check_finite:
        for g in acc:
            if not torch.isfinite(g).all():
                check_solution(settings, g.reshape(1, -1), grid[:1], spec, "backward")
    record.input_factors = q if rank else a.unsqueeze(0)
    return (a, grad_t, *acc)
