"""ODE blocks, the own adjoint, solver settings and time-conditioned layers."""

from .block import ODEBlock, SolverError
from .factors import SolveRecord
from .layers import (
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    TimeConditioned,
    TimeSequential,
)
from .solvers import ADAPTIVE_METHODS, FIXED_METHODS, METHODS

__all__ = [
    "ODEBlock",
    "SolverError",
    "SolveRecord",
    "ConcatLinear",
    "ConcatSquashLinear",
    "ConcatConv2d",
    "ConcatSquashConv2d",
    "TimeConditioned",
    "TimeSequential",
    "METHODS",
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
]
