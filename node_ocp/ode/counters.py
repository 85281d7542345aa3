"""``SolveCounters``: the function-evaluation counters of one ODE block.

The block owns one instance for its lifetime (:meth:`~node_ocp.ODEBlock.reset_nfe` zeroes it
in place) and hands it to every helper that evaluates the field: the counted field call
(:class:`~node_ocp.ode.calls.FieldCall`), the own adjoint and the torchdiffeq reference. The
block's ``nfe_forward``, ``nfe_backward`` and ``nfe_capture`` read and write its fields.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SolveCounters:
    """Evaluations of a block's field, accumulated over calls until :meth:`reset`.

    Attributes:
        forward: evaluations by forward solves (and by torchdiffeq's forward pass).
        backward: evaluations by backward solves (the adjoint's augmented dynamics, the
            time gradients at grid points, torchdiffeq's backward pass).
        capture: batched evaluations made by a curvature capture during backward solves
            (what :meth:`BackwardCapture.accumulate_kronecker` returns).
    """

    forward: int = 0
    backward: int = 0
    capture: int = 0

    def reset(self) -> None:
        """Set every counter to zero (in place: holders of this object see it)."""
        self.forward = self.backward = self.capture = 0
