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

from typing import TYPE_CHECKING

import torch
from torch import nn
from torchdiffeq import odeint_adjoint

from .calls import FieldCall

if TYPE_CHECKING:  # pragma: no cover
    from .block import ODEBlock


class CountedField(nn.Module):
    """``field(t, x)`` of ``block`` as torchdiffeq calls it, counted by phase.

    Args:
        block: the block whose field is wrapped (registered as this module's only child,
            so ``parameters()`` are exactly the field's).
    """

    def __init__(self, block: ODEBlock):
        super().__init__()
        self.field = block.field
        self.call = FieldCall(block, "nfe_forward")

    @property
    def last_t(self):
        return self.call.last_t

    def backward_phase(self) -> None:
        """Count every later evaluation as a backward one."""
        self.call.counter = "nfe_backward"

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


def adjoint_options(block: ODEBlock) -> dict:
    """torchdiffeq ``adjoint_options`` with the block's ``adjoint_norm``.

    The norm is the own adjoint's over the same parts of the augmented state:
    ``"seminorm"`` and ``"state"`` (the same without factors) take ``y`` and ``adj_y``,
    ``"full"`` the parameter accumulators too. torchdiffeq's time-gradient accumulator is
    left out: torchdiffeq integrates it even when no time needs a gradient, and its own
    ``"seminorm"`` keeps it, which costs it extra backward steps for no accuracy asked.
    A ``norm`` the user put in ``adjoint_options`` is passed on unchanged (torchdiffeq calls
    it on its own tuple ``(vjp_t, y, adj_y, *adj_params)``).
    """
    spec = block.adjoint_solver
    opts = spec.odeint_options()
    if spec.adaptive and "norm" not in opts:
        opts["norm"] = _full_norm if block.adjoint_norm == "full" else _state_norm
    return opts


def torchdiffeq_solve(block: ODEBlock, x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``odeint_adjoint`` of ``block.field`` from ``x0`` ``(B, *feat)`` over ``grid`` ``(T,)``.

    Returns ``(T, B, *feat)``. Gradients reach ``x0``, the field's parameters that require
    grad and ``grid`` if it requires grad (torchdiffeq's own time gradients).
    """
    func = CountedField(block)
    params = tuple(p for p in block.field.parameters() if p.requires_grad)
    spec, adj = block.solver, block.adjoint_solver
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
            adjoint_options=adjoint_options(block),
            adjoint_params=params,
        )
    except AssertionError as err:
        raise block._solver_error(err, func, grid, spec, "forward") from err
    func.backward_phase()
    return ys
