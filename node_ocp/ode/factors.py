"""``SolveRecord``: what one call of an ODE block leaves for its backward solve.

Under the Gauss–Newton approximation a terminal Hessian ``Φ_xx = Σ_i y_i y_iᵀ`` stays
low-rank along the trajectory, ``V_xx(t) = Σ_i q_i(t) q_i(t)ᵀ``, and each ``q_i`` obeys the
adjoint equation. The record of a block call carries the terminal factors ``y`` that a
consumer set for the call's output into the backward solve, and the factors ``q_i(t0)`` the
solve hands back at the call's input.

Records are created by :meth:`ODEBlock.forward` and passed to the backward solve through
the autograd graph (``ctx``); consumers reach them through the
:class:`~node_ocp.CurvatureCapture` attached to the block, which keeps the records of the
calls made while it is attached (see ``CurvatureCapture.set_terminal_factors``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .._errors import bad_type, bad_value

if TYPE_CHECKING:  # pragma: no cover
    from .block import ODEBlock


class SolveRecord:
    """One call of an ODE block.

    Attributes:
        block: the :class:`~node_ocp.ODEBlock` that was called (the solves use it only as
            the key they hand to ``BackwardCapture.accumulate_dense``; they receive the
            field, settings and counters themselves).
        grid_output: True if the block returned states at every grid time ``(T, *x.shape)``.
        capture: the capture attached to the block when it was called (with grad enabled),
            which gathers statistics in the backward solve; None otherwise.
        input: the ``x0`` tensor of the call (kept only when ``capture`` is set).
        output: the tensor the block returned (kept only when ``capture`` is set).
        terminal_factors: ``(R, *output.shape)`` factors set by a consumer, or None.
        input_factors: ``(R, *x0.shape)`` factors at the block input after backward, or None.
        run: what the solvers call to evaluate the field in this call (the block's compiled
            field, see :mod:`~node_ocp.ode.compiled`), or None: the field itself.
        compiler: the :class:`~node_ocp.ode.compiled.FieldCompiler` that built ``run``
            (its failures are re-raised naming ``compile_field``), or None.
        graphs: the block's :class:`~node_ocp.ode.graphs.CudaGraphSolves` when its solves
            are replayed from CUDA graphs (``cuda_graph=True``), or None.
    """

    __slots__ = (
        "block",
        "grid_output",
        "capture",
        "input",
        "output",
        "terminal_factors",
        "input_factors",
        "run",
        "compiler",
        "graphs",
    )

    def __init__(self, block: ODEBlock, grid_output: bool, capture=None):
        self.block = block
        self.grid_output = grid_output
        self.capture = capture
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.terminal_factors: torch.Tensor | None = None
        self.input_factors: torch.Tensor | None = None
        self.run = None
        self.compiler = None
        self.graphs = None

    @property
    def rank(self) -> int:
        return 0 if self.terminal_factors is None else int(self.terminal_factors.shape[0])

    def set_terminal_factors(self, factors: torch.Tensor | None) -> None:
        """Set (or with None remove) the factors ``(R, *output.shape)`` of this call."""
        if factors is None:
            self.terminal_factors = None
            return
        output = self.output
        if not isinstance(factors, torch.Tensor):
            raise bad_type("factors", factors, "a tensor of shape (R, *output.shape)")
        expected = tuple(output.shape)
        if factors.dim() != output.dim() + 1 or tuple(factors.shape[1:]) != expected:
            raise bad_value(
                "factors",
                factors,
                f"shape (R, {', '.join(str(s) for s in expected)}): R factors, each shaped "
                f"like the block output {expected}",
            )
        if factors.shape[0] < 1:
            raise bad_value("factors", factors, "at least one factor (R >= 1)")
        if factors.dtype != output.dtype or factors.device != output.device:
            raise bad_value(
                "factors",
                factors,
                f"dtype {output.dtype} on device {output.device}, like the block output",
            )
        self.terminal_factors = factors.detach()
        self.input_factors = None

    def factors_per_time(self, n_times: int) -> torch.Tensor | None:
        """Factors as ``(R, T, *x.shape)`` (zeros at the times a pair output does not show)."""
        y = self.terminal_factors
        if y is None or self.grid_output:
            return y
        full = y.new_zeros((y.shape[0], n_times, *y.shape[1:]))
        full[:, -1] = y
        return full
