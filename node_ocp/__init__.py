"""node_ocp: train continuous-time models with second-order optimal-control methods.

Public API (stable names):

- :class:`ODEBlock` — a vector field integrated over a time grid, with the own adjoint.
- :class:`OCNOpt` — the second-order optimizer; :class:`HorizonOptimizer` — t1 as a control.
- :class:`CurvatureCapture` — time-joint Kronecker / dense curvature from the backward solve.
  It also carries second-order factors through the blocks
  (``capture.set_terminal_factors``, ``capture.propagated_factors``).
- Time-conditioned layers: :class:`ConcatLinear`, :class:`ConcatSquashLinear`,
  :class:`ConcatConv2d`, :class:`ConcatSquashConv2d`, :class:`TimeSequential`.
- :func:`train_step` — one training step of any optimizer (OCNOpt's backward with outputs
  and likelihood, its trial closure, schedule and horizon steps, time and NFE measured);
  ``node-ocp train`` and ``bench`` take the same step.

``node_ocp.curvature`` is the old name of :mod:`node_ocp.capture`; it still imports, with a
``DeprecationWarning``.
"""

from .capture import CurvatureCapture, DenseFactors, KroneckerFactors
from .ode import (
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    ODEBlock,
    SolverError,
    TimeConditioned,
    TimeSequential,
)
from .optim import HorizonOptimizer, OCNOpt
from .train.step import StepFailed, StepResult, train_step

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``node_ocp.curvature`` reached as an attribute, without importing it: the deprecated
    # alias of ``node_ocp.capture``, warned about at the caller's line.
    if name == "curvature":
        import importlib
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            curvature = importlib.import_module(f"{__name__}.curvature")
        warnings.warn(curvature.MESSAGE, DeprecationWarning, stacklevel=2)
        return curvature
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ODEBlock",
    "SolverError",
    "OCNOpt",
    "HorizonOptimizer",
    "CurvatureCapture",
    "KroneckerFactors",
    "DenseFactors",
    "ConcatLinear",
    "ConcatSquashLinear",
    "ConcatConv2d",
    "ConcatSquashConv2d",
    "TimeConditioned",
    "TimeSequential",
    "train_step",
    "StepResult",
    "StepFailed",
    "__version__",
]
