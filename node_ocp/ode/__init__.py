"""ODE blocks, the own adjoint, solver settings and time-conditioned layers.

The helpers that solve receive small records, not the block: :class:`SolveSettings` (how
to integrate), :class:`SolveCounters` (evaluations) and :class:`SolveRecord` (one call);
:class:`BackwardCapture` declares what the solves call on an attached curvature capture.
"""

from .backward_capture import BackwardCapture
from .block import ODEBlock, SolverError
from .counters import SolveCounters
from .factors import SolveRecord
from .layers import (
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    TimeConditioned,
    TimeSequential,
)
from .settings import SolveSettings
from .solvers import ADAPTIVE_METHODS, BACKENDS, FIXED_METHODS, METHODS, OWN_METHODS, SolverSpec

__all__ = [
    "ODEBlock",
    "SolverError",
    "SolveRecord",
    "SolveSettings",
    "SolveCounters",
    "SolverSpec",
    "BackwardCapture",
    "ConcatLinear",
    "ConcatSquashLinear",
    "ConcatConv2d",
    "ConcatSquashConv2d",
    "TimeConditioned",
    "TimeSequential",
    "METHODS",
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "BACKENDS",
    "OWN_METHODS",
]
