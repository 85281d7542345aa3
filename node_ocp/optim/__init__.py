"""Optimizers: OCNOpt (second-order, curvature from the ODE blocks) and horizon control.

OCNOpt is built from parts, one module each: its options (:mod:`.options`), the curvature
variants (:mod:`.curvatures`) and the preconditioner that holds them (:mod:`.preconditioner`:
which unit covers which parameters, :mod:`.units`; statistics collection,
:mod:`.statistics`; the distributed reduce and decomposition, :mod:`.reduce`; the per-part
calibration scales, :mod:`.unit_scales`), the damping adaptation (:mod:`.damping`), the
steppers that turn directions into updates (:mod:`.steppers`) with their step control
(:mod:`.step_control`), the trial evaluations (:mod:`.trial`), the factor sources
(:mod:`.factor_sources`, with :mod:`.factor_flow` and :mod:`.fisher_backward`, both from
:mod:`.likelihoods`) and the feedback across a model's stages (:mod:`.feedback_runner`, its
policies in :mod:`.feedback_policies` over :mod:`.feedback` and :mod:`.feedback_dense`).
:mod:`.ocnopt` wires them together.

The statistics come from the capture of the ODE blocks' backward solves,
:mod:`node_ocp.capture` (not to be confused with the variants in :mod:`.curvatures`).
"""

from .curvatures import VARIANTS, CurvatureUnit, Damping
from .feedback import FEEDBACK_MODES, FeedbackReport
from .feedback_gain import FEEDBACK_GAINS
from .horizon import HORIZON_MODES, HorizonOptimizer
from .likelihoods import LIKELIHOODS, gauss_newton_quadratic, output_factors
from .ocnopt import (
    CURVATURES,
    DAMPING_MODES,
    DEFAULTS,
    FACTOR_SOURCES,
    OUTSIDE_RULES,
    OCNOpt,
)
from .options import OCNOptOptions
from .step_control import STEP_MODES

__all__ = [
    "OCNOpt",
    "OCNOptOptions",
    "HorizonOptimizer",
    "CurvatureUnit",
    "Damping",
    "VARIANTS",
    "DEFAULTS",
    "output_factors",
    "gauss_newton_quadratic",
    "CURVATURES",
    "FACTOR_SOURCES",
    "OUTSIDE_RULES",
    "DAMPING_MODES",
    "STEP_MODES",
    "LIKELIHOODS",
    "HORIZON_MODES",
    "FEEDBACK_GAINS",
    "FEEDBACK_MODES",
    "FeedbackReport",
]
