"""Optimizers: OCNOpt (second-order, curvature from the ODE blocks) and horizon control.

OCNOpt is built from parts, one module each: the curvature variants
(:mod:`.curvatures`), which unit covers which parameters (:mod:`.units`), statistics
collection (:mod:`.statistics`), the distributed reduce and decomposition (:mod:`.reduce`),
the damping adaptation (:mod:`.damping`), the step control (:mod:`.step_control`), the
factor flow of the sampled/exact sources (:mod:`.factor_flow`) and the feedback policies
across a model's stages (:mod:`.feedback`, :mod:`.feedback_dense`).
"""

from .curvatures import VARIANTS, CurvatureUnit, Damping
from .feedback import FEEDBACK_MODES, FeedbackReport
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
from .step_control import STEP_MODES

__all__ = [
    "OCNOpt",
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
    "FEEDBACK_MODES",
    "FeedbackReport",
]
