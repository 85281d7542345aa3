"""``ODEBlock``: a vector field, its horizon, solver settings and a gradient mode."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .._errors import bad_type, bad_value, check_choice
from .adjoint import AdjointSolve, forward_solve
from .backward_capture import BackwardCapture, check_capture
from .checked import SolverError, check_solution, checked_solve
from .compiled import CompileFieldError, FieldCompiler, check_compile_field, is_compile_failure
from .counters import SolveCounters
from .factors import SolveRecord
from .graphs import CudaGraphError, CudaGraphSolves, check_graph_settings
from .per_sample import check_per_sample, check_step_control
from .reference import torchdiffeq_solve
from .settings import ADJOINT_NORMS, DEFAULT_ANCHOR, SolveSettings, check_anchor, make_settings
from .solvers import SolverSpec, as_time_grid, check_backend

GRADIENT_MODES: tuple[str, ...] = ("adjoint", "direct", "torchdiffeq")

__all__ = [
    "ODEBlock",
    "SolverError",
    "CompileFieldError",
    "CudaGraphError",
    "GRADIENT_MODES",
    "ADJOINT_NORMS",
]


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
        adjoint_anchor: the own adjoint (``gradient="adjoint"``, adaptive forward method,
            batch step control) re-solves the state backward in time from the forward
            solution at each grid time; where the flow contracts strongly forward (a CNF
            fitting near-degenerate data) that reconstruction can leave the forward
            trajectory by orders of magnitude, and the gradient with it. This is the
            largest error accepted at the next grid time: the RMS over the state of
            ``(x̂ − x) / (atol + rtol |x|)`` in the forward solve's tolerances, a number
            > 1 (default 1000). Beyond it, and beyond 1% of the state's RMS size (a
            low-order method's global error at a tight tolerance is left alone), the
            interval is cut into ``⌈ln error / ln anchor⌉`` equal pieces (2 to 16), the
            states at their ends re-solved forward from the grid time below, and each
            piece solved backward from its own anchor (a piece that fails again is cut
            once more). Memory stays O(1) in the solver's steps; extra evaluations are
            spent only where the check fails (``counters.splits``,
            ``counters.reconstruction``). Where a piece cannot be integrated (the step size
            underflows on the true trajectory) the unsplit solve is kept, as without the
            check (``counters.unanchored``). None: no re-anchoring (the error is still
            measured, and a ``RuntimeWarning`` names the block once where it passes 1000).
        check_finite: check ``x0`` and the solution for non-finite values.
        name: a name used in error messages.
        backend: who steps the solves of the ``adjoint`` and ``direct`` modes:
            ``"torchdiffeq"`` (default, ``torchdiffeq.odeint``) or ``"own"`` (``dopri5``,
            ``bosh3`` and ``rk4`` through the own loop of :mod:`node_ocp.ode.rk`, same
            steps and results to solver tolerance with less overhead; other methods and
            options through torchdiffeq). ``gradient="torchdiffeq"`` is torchdiffeq's
            ``odeint_adjoint`` whatever the backend.
        compile_field: ``False`` (default), ``True`` or a ``torch.compile`` mode
            (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``): the solvers of the ``adjoint`` and ``direct``
            modes evaluate ``torch.compile(field)`` (compiled on first use; the field itself,
            its parameters and ``state_dict`` are unchanged). Calls made while a curvature
            capture is attached or a layer of the field is hooked evaluate the eager field
            (see :mod:`node_ocp.ode.compiled`); a failure of ``torch.compile`` raises
            :class:`~node_ocp.ode.compiled.CompileFieldError` naming the option.
        cuda_graph: replay the fixed-grid solves of the own adjoint (``euler``,
            ``midpoint``, ``rk4``; forward, and backward when no capture is attached and the
            grid needs no gradient) from CUDA graphs captured on first use per state shape,
            dtype and grid (:mod:`node_ocp.ode.graphs`). Needs ``gradient="adjoint"``,
            fixed-grid methods with no option but ``step_size``, and CUDA states; refused
            with an error naming the option otherwise.
        step_control: ``"batch"`` (default: one step size shared by the batch) or
            ``"per_sample"`` (every row of ``x0`` keeps its own time, step size and
            accept/reject, :mod:`node_ocp.ode.per_sample`; for batches of independent
            samples). ``"per_sample"`` needs ``backend="own"``, ``dopri5`` or ``bosh3`` for
            both solves, a field with ``accepts_batched_time = True`` (it is called with one
            time per row), ``gradient`` ``"adjoint"`` or ``"direct"``, and
            ``adjoint_norm`` ``"seminorm"`` or ``"state"``; dense curvature capture is
            refused with it.

    Shapes: ``x0`` is ``(B, *feat)``, any number of feature dimensions, float32 or float64,
    any device. ``forward(x0, t=None)`` may override the grid for one call (e.g. the k-th
    observation interval of a time series).

    Counters: ``nfe_forward``, ``nfe_backward`` (solver evaluations of the field) and
    ``nfe_capture`` (batched evaluations made by curvature capture) accumulate over calls
    until :meth:`reset_nfe`, with the adjoint's re-anchoring (``splits``, the largest
    ``reconstruction`` error seen); they are the fields of :attr:`counters`
    (:class:`~node_ocp.ode.counters.SolveCounters`).

    Settings: :attr:`settings` (:class:`~node_ocp.ode.settings.SolveSettings`) holds the
    solver settings, the adjoint norm, ``check_finite`` and ``name``; ``solver``,
    ``adjoint_solver``, ``adjoint_norm``, ``check_finite``, ``name`` and the forward solve's
    ``method``, ``rtol``, ``atol``, ``options`` read it (the first five may be assigned, and
    ``backend`` and ``step_control``, which set both solves').
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
        backend: str = "torchdiffeq",
        compile_field: bool | str = False,
        cuda_graph: bool = False,
        step_control: str = "batch",
        adjoint_anchor: float | None = DEFAULT_ANCHOR,
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
        self.settings: SolveSettings = make_settings(
            method,
            rtol,
            atol,
            options,
            adjoint_method=adjoint_method,
            adjoint_rtol=adjoint_rtol,
            adjoint_atol=adjoint_atol,
            adjoint_options=adjoint_options,
            adjoint_norm=adjoint_norm,
            check_finite=check_finite,
            name=name if name is not None else f"ODEBlock({type(field).__name__})",
            backend=backend,
            step_control=step_control,
            adjoint_anchor=adjoint_anchor,
        )
        self._check_step_control()
        self.counters = SolveCounters()
        self._capture: BackwardCapture | None = None  # see attach_capture
        self._compiler: FieldCompiler | None = None
        self.compile_field = compile_field
        self._graphs: CudaGraphSolves | None = None
        self.cuda_graph = cuda_graph

    # ------------------------------------------------------------------ settings
    @property
    def solver(self) -> SolverSpec:
        """The forward solve's settings (``settings.forward``)."""
        return self.settings.forward

    @solver.setter
    def solver(self, spec: SolverSpec) -> None:
        self.settings = replace(self.settings, forward=_spec("solver", spec))
        self._check_step_control()

    @property
    def adjoint_solver(self) -> SolverSpec:
        """The backward solve's settings (``settings.backward``)."""
        return self.settings.backward

    @adjoint_solver.setter
    def adjoint_solver(self, spec: SolverSpec) -> None:
        self.settings = replace(self.settings, backward=_spec("adjoint_solver", spec))
        self._check_step_control()

    @property
    def adjoint_norm(self) -> str:
        """Error norm of the adaptive backward solve (``settings.adjoint_norm``)."""
        return self.settings.adjoint_norm

    @adjoint_norm.setter
    def adjoint_norm(self, value: str) -> None:
        value = check_choice("adjoint_norm", value, ADJOINT_NORMS)
        if value == "full" and self.settings.backward.per_sample:
            raise bad_value(
                "adjoint_norm", value, "'seminorm' or 'state' with step_control='per_sample'"
            )
        self.settings = replace(self.settings, adjoint_norm=value)

    @property
    def adjoint_anchor(self) -> float | None:
        """The own adjoint's reconstruction check (``settings.anchor``; see the class)."""
        return self.settings.anchor

    @adjoint_anchor.setter
    def adjoint_anchor(self, value: float | None) -> None:
        self.settings = replace(self.settings, anchor=check_anchor(value))

    @property
    def check_finite(self) -> bool:
        """Check states for non-finite values (``settings.check_finite``)."""
        return self.settings.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise bad_type("check_finite", value, "True or False")
        self.settings = replace(self.settings, check_finite=value)

    @property
    def name(self) -> str:
        """The name used in error messages (``settings.name``)."""
        return self.settings.name

    @name.setter
    def name(self, value: str) -> None:
        self.settings = replace(self.settings, name=str(value))
        if self._compiler is not None:
            self._compiler.name = self.settings.name
        if self._graphs is not None:
            self._graphs.name = self.settings.name

    @property
    def backend(self) -> str:
        """Who steps the solves: ``"torchdiffeq"`` or ``"own"`` (both solves' ``backend``)."""
        return self.settings.forward.backend

    @backend.setter
    def backend(self, value: str) -> None:
        value = check_backend(value)
        if value != "own" and self.step_control == "per_sample":
            check_per_sample(self.method, self.options, value)
        self.settings = replace(
            self.settings,
            forward=replace(self.settings.forward, backend=value),
            backward=replace(self.settings.backward, backend=value),
        )

    @property
    def compile_field(self) -> str | None:
        """The ``torch.compile`` mode of the field's solver evaluations, None: not compiled
        (assign ``True``/``False`` or a mode; see the ``compile_field`` argument)."""
        return None if self._compiler is None else self._compiler.mode

    @compile_field.setter
    def compile_field(self, value: bool | str | None) -> None:
        mode = check_compile_field(value)
        if mode is not None and self.gradient == "torchdiffeq":
            raise bad_value(
                "compile_field",
                value,
                "False with gradient='torchdiffeq' (torchdiffeq's odeint_adjoint evaluates the "
                "field itself)",
                "Use gradient='adjoint' or 'direct' to solve with a compiled field.",
            )
        if mode is None:
            self._compiler = None
        elif self._compiler is None or self._compiler.mode != mode:
            self._compiler = FieldCompiler(mode, self.name)

    @property
    def cuda_graph(self) -> bool:
        """Whether the fixed-grid solves are replayed from CUDA graphs (see the
        ``cuda_graph`` argument; assign True or False)."""
        return self._graphs is not None

    @cuda_graph.setter
    def cuda_graph(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise bad_type("cuda_graph", value, "True or False")
        if not value:
            self._graphs = None
            return
        check_graph_settings(self.settings, self.gradient)
        if self._graphs is None:
            self._graphs = CudaGraphSolves(self.name)

    @property
    def step_control(self) -> str:
        """``"batch"`` or ``"per_sample"`` (the forward solve's; both solves share it)."""
        return self.settings.forward.step_control

    @step_control.setter
    def step_control(self, value: str) -> None:
        value = check_step_control(value)
        fw, bw = self.settings.forward, self.settings.backward
        if value == "per_sample":
            check_per_sample(fw.method, fw.options, fw.backend)
            check_per_sample(bw.method, bw.options, bw.backend, "adjoint_")
            if self.adjoint_norm == "full":
                raise bad_value(
                    "adjoint_norm",
                    self.adjoint_norm,
                    "'seminorm' or 'state' with step_control='per_sample'",
                )
        settings = replace(
            self.settings,
            forward=replace(fw, step_control=value),
            backward=replace(bw, step_control=value),
        )
        old, self.settings = self.settings, settings
        try:
            self._check_step_control()
        except ValueError:
            self.settings = old
            raise

    def _check_step_control(self) -> None:
        """Refuse per-sample control with what it cannot serve, naming the argument."""
        fw, bw = self.settings.forward, self.settings.backward
        if not (fw.per_sample or bw.per_sample):
            return
        if self.gradient == "torchdiffeq":
            raise bad_value(
                "step_control",
                "per_sample",
                "gradient 'adjoint' or 'direct' with step_control='per_sample' "
                "(gradient='torchdiffeq' is torchdiffeq's odeint_adjoint, one step size)",
                "Use gradient='adjoint' (the own adjoint) or 'direct'.",
            )
        if not getattr(self.field, "accepts_batched_time", False):
            raise bad_value(
                "step_control",
                "per_sample",
                f"a field that accepts one time per batch row with step_control='per_sample' "
                f"({type(self.field).__name__} does not set accepts_batched_time = True)",
                "Build the field from node_ocp.ode.layers (time_column accepts t of shape "
                "(batch,)) and set accepts_batched_time = True, or use step_control='batch'.",
            )

    @property
    def method(self) -> str:
        """The forward solve's method."""
        return self.settings.forward.method

    @property
    def rtol(self) -> float:
        """The forward solve's relative tolerance."""
        return self.settings.forward.rtol

    @property
    def atol(self) -> float:
        """The forward solve's absolute tolerance."""
        return self.settings.forward.atol

    @property
    def options(self) -> dict:
        """The forward solve's torchdiffeq options."""
        return self.settings.forward.options

    # ------------------------------------------------------------------ counters
    @property
    def nfe_forward(self) -> int:
        """Field evaluations of forward solves since :meth:`reset_nfe` (``counters.forward``)."""
        return self.counters.forward

    @nfe_forward.setter
    def nfe_forward(self, value: int) -> None:
        self.counters.forward = value

    @property
    def nfe_backward(self) -> int:
        """Field evaluations of backward solves (``counters.backward``)."""
        return self.counters.backward

    @nfe_backward.setter
    def nfe_backward(self, value: int) -> None:
        self.counters.backward = value

    @property
    def nfe_capture(self) -> int:
        """Batched field evaluations of curvature capture (``counters.capture``)."""
        return self.counters.capture

    @nfe_capture.setter
    def nfe_capture(self, value: int) -> None:
        self.counters.capture = value

    def extra_repr(self) -> str:
        t = self.t.detach().cpu().tolist()
        t = t if len(t) <= 4 else f"[{t[0]}, ..., {t[-1]}] ({len(t)} points)"
        return (
            f"t={t}, method={self.solver.method!r}, rtol={self.solver.rtol}, "
            f"atol={self.solver.atol}, gradient={self.gradient!r}"
            + (f", backend={self.backend!r}" if self.backend != "torchdiffeq" else "")
            + (f", compile_field={self.compile_field!r}" if self.compile_field else "")
            + (", cuda_graph=True" if self.cuda_graph else "")
            + (f", step_control={self.step_control!r}" if self.step_control != "batch" else "")
        )

    @property
    def capture(self) -> BackwardCapture | None:
        """The capture attached to this block (a :class:`~node_ocp.CurvatureCapture` or any
        :class:`~node_ocp.ode.backward_capture.BackwardCapture`), or None."""
        return self._capture

    def attach_capture(self, capture: BackwardCapture) -> None:
        """Let ``capture`` record the calls made with grad enabled and gather statistics in
        their backward solves (``CurvatureCapture.attach`` calls this for every block).
        ``capture`` must have the members of
        :class:`~node_ocp.ode.backward_capture.BackwardCapture`."""
        if self.gradient != "adjoint":
            raise bad_value(
                f"{self.name}.gradient",
                self.gradient,
                "'adjoint' for curvature capture and second-order factors",
                "Build the block with gradient='adjoint'.",
            )
        self._capture = check_capture(capture)

    def detach_capture(self, capture: BackwardCapture) -> None:
        """Undo :meth:`attach_capture` (a no-op if another capture has taken over)."""
        if self._capture is capture:
            self._capture = None

    def reset_nfe(self) -> None:
        """Set the evaluation counters to zero."""
        self.counters.reset()

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
        if (
            self.gradient == "direct"
            and self.step_control == "per_sample"
            and grid.requires_grad
            and torch.is_grad_enabled()
        ):
            raise bad_value(
                "t",
                grid,
                "a time grid without gradient with step_control='per_sample' and gradient='direct'",
                "Use gradient='adjoint' for the gradient of the time grid.",
            )
        grid_output = grid.numel() > 2
        if self.gradient == "adjoint":
            capture = self._capture if torch.is_grad_enabled() else None
            record = SolveRecord(self, grid_output, capture)
            if self._compiler is not None:
                record.run = self._compiler.evaluator(self.field, capture)
                if record.run is not self.field:
                    record.compiler = self._compiler
            if self._graphs is not None:
                check_graph_settings(self.settings, self.gradient)  # settings may be replaced
                self._graphs.check_state(x0)
                record.graphs = self._graphs
            params = tuple(p for p in self.field.parameters() if p.requires_grad)
            ys = AdjointSolve.apply(
                self.field, self.settings, self.counters, record, x0, grid, *params
            )
        elif self.gradient == "torchdiffeq":
            self._check_step_control()  # gradient may have been set after construction
            capture = None
            ys = torchdiffeq_solve(self.field, self.settings, self.counters, x0, grid)
            if self.check_finite:
                check_solution(self.settings, ys, grid, self.solver, "forward")
        else:
            capture = None
            ys = self._direct_solve(x0, grid)
        out = ys if grid_output else ys[-1]
        if capture is not None:
            capture.record_call(record, x0, out)
        return out

    def _direct_solve(self, x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``gradient="direct"``: the forward solve, through the compiled field if any."""
        if self._compiler is None:
            return forward_solve(self.field, self.settings, self.counters, x0, grid)
        run = self._compiler.evaluator(self.field, None)
        try:
            return forward_solve(self.field, self.settings, self.counters, x0, grid, run)
        except Exception as err:
            if run is not self.field and is_compile_failure(err):
                raise self._compiler.failure(err) from err
            raise

    # ------------------------------------------------------------------ solving
    def solve(
        self, func, y0, grid: torch.Tensor, spec: SolverSpec, phase: str, reverse=False, **kw
    ):
        """``spec.integrate`` with failures turned into :class:`SolverError` naming the block
        (:func:`~node_ocp.ode.checked.checked_solve` with this block's settings).

        ``reverse``: integrate over ``-grid`` (``func`` takes ``s = -t`` and returns the
        derivative in ``s``); messages name the times of ``grid``.
        """
        return checked_solve(self.settings, func, y0, grid, spec, phase, reverse=reverse, **kw)


def _spec(name: str, spec) -> SolverSpec:
    if not isinstance(spec, SolverSpec):
        raise bad_type(name, spec, "a SolverSpec (node_ocp.ode.solvers.make_spec builds one)")
    return spec
