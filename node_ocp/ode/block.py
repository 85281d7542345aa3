"""``ODEBlock``: a vector field, its horizon, solver settings and a gradient mode."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import bad_type, bad_value, check_choice, describe
from .factors import SolveRecord, attach_record
from .solvers import SolverSpec, as_time_grid, make_spec

GRADIENT_MODES: tuple[str, ...] = ("adjoint", "direct")
ADJOINT_NORMS: tuple[str, ...] = ("seminorm", "state", "full")


class SolverError(RuntimeError):
    """An integration failed (step-size underflow, too many steps, non-finite state)."""


class FieldCall:
    """Wraps ``field(t, x)`` for one solve: counts evaluations, checks output, keeps last t."""

    def __init__(self, block: ODEBlock, counter: str):
        self.block = block
        self.counter = counter
        self.last_t: float | None = None

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        setattr(block, self.counter, getattr(block, self.counter) + 1)
        self.last_t = t
        dx = block.field(t, x)
        if not isinstance(dx, torch.Tensor):
            raise bad_type(f"field of {block.name}", dx, "a tensor f(t, x) shaped like x")
        if dx.shape != x.shape or dx.dtype != x.dtype:
            raise ValueError(
                f"field of {block.name}: f(t, x) returned shape {tuple(dx.shape)} and dtype "
                f"{dx.dtype} for a state of shape {tuple(x.shape)} and dtype {x.dtype}; "
                "accepted: an output with exactly the shape and dtype of the state x."
            )
        return dx


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
            second-order factors and curvature capture) or ``"direct"`` (backprop through
            the solver's operations).
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
        self.capture = None  # set by CurvatureCapture.attach
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
            from .adjoint import AdjointSolve

            record = SolveRecord(self, x0.shape, grid_output)
            params = tuple(p for p in self.field.parameters() if p.requires_grad)
            ys = AdjointSolve.apply(record, x0, grid, *params)
        else:
            record = None
            ys = self.solve(FieldCall(self, "nfe_forward"), x0, grid, self.solver, "forward")
        out = ys if grid_output else ys[-1]
        if record is not None:
            record.output_shape = out.shape
            attach_record(out, record)
            if self.capture is not None and torch.is_grad_enabled():
                record.input = x0
                record.kept = out
                self.capture.calls.append(record)
        return out

    # ------------------------------------------------------------------ solving
    def solve(self, func, y0, grid: torch.Tensor, spec: SolverSpec, phase: str, **kw):
        """``spec.integrate`` with failures turned into :class:`SolverError` naming the block."""
        try:
            ys = spec.integrate(func, y0, grid, **kw)
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
