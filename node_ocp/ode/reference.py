"""``gradient="torchdiffeq"``: the forward and backward of an ODE block through
``torchdiffeq.odeint_adjoint`` (public API, unpatched), as a reference and a baseline.

The block's field is wrapped in :class:`CountedField`, an ``nn.Module`` whose parameters are
the field's, so that torchdiffeq's evaluations are counted like the own adjoint's: every
call made while ``odeint_adjoint`` runs its forward solve goes to ``nfe_forward``, every
later call of the same wrapper (torchdiffeq's backward solve and its time-gradient
evaluations, which run during ``loss.backward()``) to ``nfe_backward``. One wrapper is made
per block call, so several calls awaiting one backward are counted apart.

Not supported in this mode: curvature capture and second-order factors (the backward is
torchdiffeq's), the finiteness check of the backward solve (only ``x0`` and the forward
solution are checked), and :class:`~node_ocp.ode.block.SolverError` for a failing backward
solve (torchdiffeq's own ``AssertionError`` comes out of ``loss.backward()``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchdiffeq import odeint_adjoint

from .calls import FieldCall
from .checked import solver_error
from .counters import SolveCounters
from .settings import SolveSettings


class CountedField(nn.Module):
    """``field(t, x)`` as torchdiffeq calls it, counted by phase.

    Args:
        field: the block's field (registered as this module's only child, so
            ``parameters()`` are exactly the field's).
        counters: the block's counters (``forward``, then ``backward`` after
            :meth:`backward_phase`).
        name: the block's name, for error messages.
    """

    def __init__(self, field: nn.Module, counters: SolveCounters, name: str):
        super().__init__()
        self.field = field
        self.call = FieldCall(field, counters, name)

    @property
    def last_t(self):
        return self.call.last_t

    def backward_phase(self) -> None:
        """Count every later evaluation as a backward one."""
        self.call.backward = True

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(B, *feat) -> (B, *feat)``, checked and counted by :class:`FieldCall`."""
        return self.call(t, x)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


def _state_norm(aug: tuple) -> torch.Tensor:
    """Error norm over torchdiffeq's ``(vjp_t, y, adj_y, *adj_params)``: ``y`` and ``adj_y``."""
    return torch.maximum(_rms(aug[1]), _rms(aug[2]))


def _full_norm(aug: tuple) -> torch.Tensor:
    """Error norm over everything but torchdiffeq's time-gradient accumulator ``vjp_t``."""
    return torch.stack([_rms(p) for p in aug[1:] if p.numel()]).max()


def adjoint_options(settings: SolveSettings) -> dict:
    """torchdiffeq ``adjoint_options`` for ``settings.backward`` with ``settings.adjoint_norm``.

    The norm is the own adjoint's over the same parts of the augmented state:
    ``"seminorm"`` and ``"state"`` (the same without factors) take ``y`` and ``adj_y``,
    ``"full"`` the parameter accumulators too. torchdiffeq's time-gradient accumulator is
    left out: torchdiffeq integrates it even when no time needs a gradient, and its own
    ``"seminorm"`` keeps it, which costs it extra backward steps for no accuracy asked.
    A ``norm`` the user put in ``adjoint_options`` is passed on unchanged (torchdiffeq calls
    it on its own tuple ``(vjp_t, y, adj_y, *adj_params)``).
    """
    spec = settings.backward
    opts = spec.odeint_options()
    if spec.adaptive and "norm" not in opts:
        opts["norm"] = _full_norm if settings.adjoint_norm == "full" else _state_norm
    return opts


def torchdiffeq_solve(
    field: nn.Module,
    settings: SolveSettings,
    counters: SolveCounters,
    x0: torch.Tensor,
    grid: torch.Tensor,
) -> torch.Tensor:
    """``odeint_adjoint`` of ``field`` from ``x0`` ``(B, *feat)`` over ``grid`` ``(T,)`` with
    ``settings``, evaluations counted in ``counters``.

    Returns ``(T, B, *feat)``. Gradients reach ``x0``, the field's parameters that require
    grad and ``grid`` if it requires grad (torchdiffeq's own time gradients).
    """
    func = CountedField(field, counters, settings.name)
    params = tuple(p for p in field.parameters() if p.requires_grad)
    spec, adj = settings.forward, settings.backward
    try:
        ys = odeint_adjoint(
            func,
            x0,
            grid,
            rtol=spec.rtol,
            atol=spec.atol,
            method=spec.method,
            options=spec.odeint_options(),
            adjoint_rtol=adj.rtol,
            adjoint_atol=adj.atol,
            adjoint_method=adj.method,
            adjoint_options=adjoint_options(settings),
            adjoint_params=params,
        )
    except AssertionError as err:
        raise solver_error(settings, err, func, grid, spec, "forward") from err
    func.backward_phase()
    return ys
