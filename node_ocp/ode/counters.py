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
        splits: intervals the own adjoint split because its reconstruction of the state
            left the forward solution (``SolveSettings.anchor``); the forward re-solves to
            their midpoints count in ``backward``.
        reconstruction: the largest reconstruction error the own adjoint measured (in units
            of the forward tolerance, before any split).
        unanchored: splits given up because a piece could not be integrated (the solver's
            step underflowed on the forward trajectory); the unsplit solve was kept.
    """

    forward: int = 0
    backward: int = 0
    capture: int = 0
    splits: int = 0
    reconstruction: float = 0.0
    unanchored: int = 0

    def reset(self) -> None:
        """Set every counter to zero (in place: holders of this object see it)."""
        self.forward = self.backward = self.capture = self.splits = self.unanchored = 0
        self.reconstruction = 0.0
