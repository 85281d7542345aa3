"""``ODEBlock``: a vector field, its horizon, solver settings and a gradient mode."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import bad_type, bad_value, check_choice, describe
from .adjoint import AdjointSolve
from .calls import FieldCall
from .factors import SolveRecord
from .reference import torchdiffeq_solve
from .solvers import SolverSpec, as_time_grid, make_spec

GRADIENT_MODES: tuple[str, ...] = ("adjoint", "direct", "torchdiffeq")
ADJOINT_NORMS: tuple[str, ...] = ("seminorm", "state", "full")


class SolverError(RuntimeError):
    """An integration failed (step-size underflow, too many steps, non-finite state)."""


class ODEBlock(nn.Module):
    """Integrates ``dx/dt = field(t, x)`` from ``x0`` over the time grid ``t``.

    Args:
        field: any ``nn.Module`` with ``forward(t, x)`` returning a tensor shaped like ``x``.
            ``t`` is a 0-dim tensor (a field that sets ``accepts_batched_time = True`` may
            also be called with one time per batch row, shape ``(N,)``, during capture).
        t: the time grid: a pair ``(t0, t1)`` (the block returns the state at ``t1``) or a
            1-D grid of ``T > 2`` strictly monotone times (the block returns the states at
            every grid time, ``(T, *x0.shape)``, first row ``x0``). Increasing or decreasing.
            A tensor that requires grad is registered as a parameter (gradients flow to it);
            anything else becomes a buffer.
        method, rtol, atol, options: passed to ``torchdiffeq.odeint`` for the forward solve.
        gradient: ``"adjoint"`` (own adjoint, O(1) memory in solver steps, supports
            second-order factors and curvature capture), ``"direct"`` (backprop through
            the solver's operations) or ``"torchdiffeq"`` (``torchdiffeq.odeint_adjoint``,
            a reference and baseline; see :mod:`node_ocp.ode.reference`).
        adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options: settings of the
            backward solve (default: those of the forward solve).
        adjoint_norm: error norm of the adaptive backward solve over the augmented state
            ``[x, a, q_1..q_R, ∫∂f/∂θᵀa]``: ``"seminorm"`` (default; parameter
            accumulators left out), ``"state"`` (factors left out too), ``"full"``.
        check_finite: check ``x0`` and the solution for non-finite values.
        name: a name used in error messages.

    Shapes: ``x0`` is ``(B, *feat)``, any number of feature dimensions, float32 or float64,
    any device. ``forward(x0, t=None)`` may override the grid for one call (e.g. the k-th
    observation interval of a time series).

    Counters: ``nfe_forward``, ``nfe_backward`` (solver evaluations of the field) and
    ``nfe_capture`` (batched evaluations made by curvature capture) accumulate over calls
    until :meth:`reset_nfe`.
    """

    def __init__(
        self,
        field: nn.Module,
        t: Any = (0.0, 1.0),
        method: str = "dopri5",
        rtol: float = 1e-4,
        atol: float = 1e-5,
        options: dict | None = None,
        gradient: str = "adjoint",
        *,
        adjoint_method: str | None = None,
        adjoint_rtol: float | None = None,
        adjoint_atol: float | None = None,
        adjoint_options: dict | None = None,
        adjoint_norm: str = "seminorm",
        check_finite: bool = True,
        name: str | None = None,
    ):
        super().__init__()
        if not isinstance(field, nn.Module):
            raise bad_type(
                "field",
                field,
                "an nn.Module with forward(t, x)",
                "Wrap a function in an nn.Module.",
            )
        self.field = field
        grid = as_time_grid(t, "t")
        if isinstance(t, torch.Tensor) and t.requires_grad:
            self.t = nn.Parameter(grid.detach().clone()) if not isinstance(t, nn.Parameter) else t
        else:
            self.register_buffer("t", grid.detach().clone())
        self.gradient = check_choice("gradient", gradient, GRADIENT_MODES)
        self.solver: SolverSpec = make_spec(method, rtol, atol, options)
        self.adjoint_solver: SolverSpec = make_spec(
            method if adjoint_method is None else adjoint_method,
            rtol if adjoint_rtol is None else adjoint_rtol,
            atol if adjoint_atol is None else adjoint_atol,
            options if adjoint_options is None else adjoint_options,
            prefix="adjoint_",
        )
        self.adjoint_norm = check_choice("adjoint_norm", adjoint_norm, ADJOINT_NORMS)
        if not isinstance(check_finite, bool):
            raise bad_type("check_finite", check_finite, "True or False")
        self.check_finite = check_finite
        self.name = name if name is not None else f"ODEBlock({type(field).__name__})"
        self._capture = None  # see attach_capture
        self.nfe_forward = 0
        self.nfe_backward = 0
        self.nfe_capture = 0

    def extra_repr(self) -> str:
        t = self.t.detach().cpu().tolist()
        t = t if len(t) <= 4 else f"[{t[0]}, ..., {t[-1]}] ({len(t)} points)"
        return (
            f"t={t}, method={self.solver.method!r}, rtol={self.solver.rtol}, "
            f"atol={self.solver.atol}, gradient={self.gradient!r}"
        )

    @property
    def capture(self):
        """The :class:`~node_ocp.CurvatureCapture` attached to this block, or None."""
        return self._capture

    def attach_capture(self, capture) -> None:
        """Let ``capture`` record the calls made with grad enabled and gather statistics in
        their backward solves (``CurvatureCapture.attach`` calls this for every block)."""
        if self.gradient != "adjoint":
            raise bad_value(
                f"{self.name}.gradient",
                self.gradient,
                "'adjoint' for curvature capture and second-order factors",
                "Build the block with gradient='adjoint'.",
            )
        self._capture = capture

    def detach_capture(self, capture) -> None:
        """Undo :meth:`attach_capture` (a no-op if another capture has taken over)."""
        if self._capture is capture:
            self._capture = None

    def reset_nfe(self) -> None:
        """Set the evaluation counters to zero."""
        self.nfe_forward = self.nfe_backward = self.nfe_capture = 0

    # ------------------------------------------------------------------ forward
    def forward(self, x0: torch.Tensor, t: Any = None) -> torch.Tensor:
        """Solve from ``x0`` (``(B, *feat)``).

        Returns ``(B, *feat)`` for a pair grid, ``(T, B, *feat)`` for a longer grid.
        """
        grid = self.t if t is None else as_time_grid(t, "t")
        if not isinstance(x0, torch.Tensor):
            raise bad_type("x0", x0, "a floating-point tensor of shape (batch, *features)")
        if not x0.is_floating_point() or x0.dim() < 1:
            raise bad_value("x0", x0, "a float32/float64 tensor of shape (batch, *features)")
        if self.check_finite and not torch.isfinite(x0).all():
            raise bad_value(
                "x0",
                x0,
                "finite values only",
                f"{self.name} received NaN/inf in its initial state; check the layers before it.",
            )
        grid = grid.to(device=x0.device, dtype=x0.dtype)
        grid_output = grid.numel() > 2
        if self.gradient == "adjoint":
            capture = self._capture if torch.is_grad_enabled() else None
            record = SolveRecord(self, grid_output, capture)
            params = tuple(p for p in self.field.parameters() if p.requires_grad)
            ys = AdjointSolve.apply(record, x0, grid, *params)
        elif self.gradient == "torchdiffeq":
            capture = None
            ys = torchdiffeq_solve(self, x0, grid)
            if self.check_finite:
                self._check_solution(ys, grid, self.solver, "forward")
        else:
            capture = None
            ys = self.solve(FieldCall(self, "nfe_forward"), x0, grid, self.solver, "forward")
        out = ys if grid_output else ys[-1]
        if capture is not None:
            capture.record_call(record, x0, out)
        return out

    # ------------------------------------------------------------------ solving
    def solve(
        self, func, y0, grid: torch.Tensor, spec: SolverSpec, phase: str, reverse=False, **kw
    ):
        """``spec.integrate`` with failures turned into :class:`SolverError` naming the block.

        ``reverse``: integrate over ``-grid`` (``func`` takes ``s = -t`` and returns the
        derivative in ``s``); messages name the times of ``grid``.
        """
        try:
            ys = spec.integrate(func, y0, -grid if reverse else grid, **kw)
        except AssertionError as err:
            raise self._solver_error(err, func, grid, spec, phase) from err
        if self.check_finite:
            self._check_solution(ys, grid, spec, phase)
        return ys

    def _solver_error(self, err, func, grid, spec: SolverSpec, phase: str) -> SolverError:
        text = str(err)
        if "underflow" in text:
            what = "the step size underflowed"
        elif "max_num_steps" in text:
            what = "the maximum number of steps was exceeded"
        elif "non-finite" in text:
            what = "the state became non-finite"
        else:
            what = f"the solver stopped ({text[:120]})"
        reached = getattr(func, "last_t", None)
        reached = "unknown" if reached is None else f"{float(reached):.6g}"
        return SolverError(
            f"{self.name}: in the {phase} solve with method={spec.method!r} (rtol={spec.rtol}, "
            f"atol={spec.atol}) over [{float(grid[0]):.6g}, {float(grid[-1]):.6g}], {what} at "
            f"t={reached}. Remedies: lower the learning rate, loosen rtol/atol, regularise the "
            "field (e.g. kinetic energy), shorten the horizon, or use a fixed-step method."
        )

    def _check_solution(self, ys, grid, spec: SolverSpec, phase: str) -> None:
        parts = ys if isinstance(ys, tuple) else (ys,)
        for part in parts:
            finite = torch.isfinite(part.reshape(part.shape[0], -1)).all(dim=1)
            if not finite.all():
                first = int((~finite).nonzero()[0, 0])
                raise SolverError(
                    f"{self.name}: in the {phase} solve with method={spec.method!r} the state "
                    f"became non-finite; first bad output at t={float(grid[first]):.6g} "
                    f"(grid {describe(grid)}). Remedies: lower the learning rate, tighten "
                    "rtol/atol or use smaller fixed steps, regularise the field."
                )
