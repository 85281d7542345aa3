"""``SolveSettings``: how an ODE block integrates, as one checked, immutable record.

The block builds it once from its constructor arguments (:func:`make_settings`, every check
at the boundary) and hands it to the helpers that solve: the forward solve, the own adjoint
(:mod:`.adjoint`), the torchdiffeq reference (:mod:`.reference`) and the checked solve
(:mod:`.checked`), which read it and never the block. Changing a setting of a block
(``block.solver = spec``) replaces its record (:func:`dataclasses.replace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._errors import bad_type, bad_value, check_choice
from .solvers import SolverSpec, make_spec

#: The reconstruction error (in units of the forward tolerance, RMS over the state) beyond
#: which the own adjoint splits an interval (see ``SolveSettings.anchor``).
DEFAULT_ANCHOR = 1000.0

#: Error norms of the adaptive backward solve over the augmented state (see ``ODEBlock``).
ADJOINT_NORMS: tuple[str, ...] = ("seminorm", "state", "full")


@dataclass(frozen=True)
class SolveSettings:
    """The settings of a block's solves.

    Attributes:
        forward: method, tolerances and options of the forward solve.
        backward: those of the backward (adjoint) solve.
        adjoint_norm: error norm of the adaptive backward solve over the augmented state
            ``[x, a, q_1..q_R, ∫∂f/∂θᵀa]``: ``"seminorm"`` (parameter accumulators left
            out), ``"state"`` (factors left out too) or ``"full"``.
        check_finite: check the initial state and every solution for non-finite values.
        name: the block's name, used in error messages.
        anchor: the largest reconstruction error the own adjoint accepts, as the RMS over
            the state of ``(x̂ − x) / (atol + rtol |x|)`` (the forward solve's tolerances):
            ``x̂`` the backward solve's state at a grid time, ``x`` the forward solution
            there. Beyond it (and beyond 1% of the state's size) the interval is solved
            again in pieces, each from its own anchor (:class:`~node_ocp.ode.adjoint.
            _Interval`). None: measured, never re-anchored.
    """

    forward: SolverSpec
    backward: SolverSpec
    adjoint_norm: str = "seminorm"
    check_finite: bool = True
    name: str = "ODEBlock"
    anchor: float | None = DEFAULT_ANCHOR


def make_settings(
    method: Any,
    rtol: Any,
    atol: Any,
    options: Any,
    *,
    adjoint_method: Any = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_options: Any = None,
    adjoint_norm: Any = "seminorm",
    check_finite: Any = True,
    name: str = "ODEBlock",
    backend: Any = "torchdiffeq",
    step_control: Any = "batch",
    adjoint_anchor: Any = DEFAULT_ANCHOR,
) -> SolveSettings:
    """Check the user's solver arguments (named as ``ODEBlock`` names them) and build the
    settings; an ``adjoint_*`` left None takes the forward solve's value; ``backend`` and
    ``step_control`` apply to both solves."""
    forward = make_spec(method, rtol, atol, options, backend=backend, step_control=step_control)
    backward = make_spec(
        method if adjoint_method is None else adjoint_method,
        rtol if adjoint_rtol is None else adjoint_rtol,
        atol if adjoint_atol is None else adjoint_atol,
        options if adjoint_options is None else adjoint_options,
        prefix="adjoint_",
        backend=backend,
        step_control=step_control,
    )
    adjoint_norm = check_choice("adjoint_norm", adjoint_norm, ADJOINT_NORMS)
    if step_control == "per_sample" and adjoint_norm == "full":
        raise bad_value(
            "adjoint_norm",
            adjoint_norm,
            "'seminorm' or 'state' with step_control='per_sample' (each sample's error norm "
            "cannot include the parameter accumulators, a sum over samples)",
        )
    if not isinstance(check_finite, bool):
        raise bad_type("check_finite", check_finite, "True or False")
    anchor = check_anchor(adjoint_anchor)
    return SolveSettings(forward, backward, adjoint_norm, check_finite, name, anchor)


def check_anchor(value: Any) -> float | None:
    """``adjoint_anchor`` checked: None or a finite number > 1 (as a float)."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (1 < float(value) < float("inf")):
        raise bad_value(
            "adjoint_anchor",
            value,
            "None (no reconstruction check) or a finite number > 1: the reconstruction error, "
            "in units of the forward tolerance, beyond which the adjoint re-anchors",
        )
    return float(value)
