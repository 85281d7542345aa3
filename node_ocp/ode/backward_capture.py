"""``BackwardCapture``: what an ODE block and its own adjoint call on an attached capture.

Curvature capture is an extension point of the backward solve: a consumer (the optimizer,
through :class:`~node_ocp.CurvatureCapture`) attaches an object to a block
(:meth:`~node_ocp.ODEBlock.attach_capture`) and the block calls it at the points below.
Anything with these members can be attached; :class:`~node_ocp.CurvatureCapture` is the
implementation the package ships.

Shapes: ``B`` batch, ``feat`` the state's feature dimensions, ``T`` times of the block's
grid, ``S`` sample times of one grid interval, ``R`` factors per sample (the terminal
factors a consumer set on the call's record; ``R = 1`` with none set, the adjoint ``a``
being the one factor), ``P`` the number of field parameters that require grad.

Order of the calls for one block call made with grad enabled:

1. forward: ``record_call(record, x0, out)`` once, after the forward solve;
2. ``loss.backward()``: for every interval ``[t_{k-1}, t_k]`` of the grid, last first,
   and only when ``kronecker_enabled``: ``sample_grid(t_k, t_{k-1}, like=grid)``, then the
   backward solve through the returned times, then ``accumulate_kronecker(...)`` with the
   states and factors at those times (its return value is added to the block's
   ``nfe_capture``);
3. after the last interval, and only when ``dense_enabled``: ``accumulate_dense(...)`` once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from .._errors import bad_type

if TYPE_CHECKING:  # pragma: no cover
    from .factors import SolveRecord


@runtime_checkable
class BackwardCapture(Protocol):
    """The interface a block's forward and backward solves call on an attached capture.

    Attributes:
        kronecker_enabled: sample each interval of the backward solve and call
            :meth:`accumulate_kronecker`; read once per backward solve.
        dense_enabled: integrate per-sample, per-factor parameter integrals in the backward
            solve (a larger augmented state) and call :meth:`accumulate_dense`.
    """

    kronecker_enabled: bool
    dense_enabled: bool

    def record_call(self, record: SolveRecord, x0: torch.Tensor, out: torch.Tensor) -> None:
        """Called once per block call made with grad enabled, after the forward solve.

        Args:
            record: the call's :class:`~node_ocp.ode.factors.SolveRecord` (its ``block``,
                ``grid_output``; a consumer may set terminal factors on it before backward,
                and reads ``input_factors`` ``(R, B, *feat)`` after).
            x0: ``(B, *feat)`` the call's initial state.
            out: the tensor the block returns: ``(B, *feat)`` for a pair grid, ``(T, B,
                *feat)`` for a longer grid.
        """
        ...

    def sample_grid(
        self, t_start: torch.Tensor, t_end: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Sample times of one interval of the backward solve and their quadrature weight.

        Args:
            t_start, t_end: 0-dim tensors, the interval's end where the backward solve
                starts (``t_k``) and the one it goes to (``t_{k-1}``).
            like: ``(T,)`` the block's grid (dtype and device of the returned times).

        Returns ``(times, weight)``: ``times`` ``(S,)``, ``S >= 1``, strictly between the
        endpoints and ordered from ``t_start`` to ``t_end``, dtype and device of ``like``;
        ``weight`` a float, the quadrature weight of each time.
        """
        ...

    def accumulate_kronecker(
        self,
        field: nn.Module,
        times: torch.Tensor,
        weight: float,
        states: torch.Tensor,
        factors: torch.Tensor,
    ) -> int:
        """Statistics of one interval, at the times :meth:`sample_grid` returned.

        Args:
            field: the block's vector field ``f(t, x)``.
            times: ``(S,)`` the sample times.
            weight: their quadrature weight.
            states: ``(S, B, *feat)`` the states ``x(t_j)`` of the backward solve.
            factors: ``(S, R, B, *feat)`` the factors ``q_i(t_j)`` (with no terminal factors
                set, ``R = 1`` and the factor is the adjoint ``a(t_j)``).

        Returns the number of field evaluations made (added to the block's ``nfe_capture``).
        """
        ...

    def accumulate_dense(self, block: nn.Module, names: list[str], p: torch.Tensor) -> None:
        """Per-sample, per-factor parameter integrals of one backward solve of ``block``.

        Args:
            block: the block that was called (the record's ``block``; a key).
            names: ``P``-ordered names of the field's parameters that require grad, as
                ``field.named_parameters()`` gives them; the flattened last dimension of
                ``p`` lies parameter after parameter in this order.
            p: ``(R, B, P)``: ``p[i, b] = ∫ (∂f_b/∂θ)ᵀ q_{i,b} dt`` over the whole grid.
        """
        ...


#: The members a capture must have, for error messages.
MEMBERS: tuple[str, ...] = (
    "kronecker_enabled",
    "dense_enabled",
    "record_call",
    "sample_grid",
    "accumulate_kronecker",
    "accumulate_dense",
)


def check_capture(capture, name: str = "capture"):
    """Return ``capture`` if it has every member of :class:`BackwardCapture`, else raise a
    ``TypeError`` naming the missing ones."""
    missing = [m for m in MEMBERS if not hasattr(capture, m)]
    if missing:
        raise bad_type(
            name,
            capture,
            "an object with the members of node_ocp.ode.BackwardCapture "
            f"({', '.join(MEMBERS)}), such as node_ocp.CurvatureCapture",
            f"It lacks: {', '.join(missing)}.",
        )
    return capture
