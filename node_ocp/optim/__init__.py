"""Optimizers: OCNOpt (second-order, curvature from the ODE blocks) and horizon control."""

from .horizon import HORIZON_MODES, HorizonOptimizer
from .likelihoods import LIKELIHOODS, output_factors
from .ocnopt import CURVATURES, FACTOR_SOURCES, OUTSIDE_RULES, OCNOpt

__all__ = [
    "OCNOpt",
    "HorizonOptimizer",
    "output_factors",
    "CURVATURES",
    "FACTOR_SOURCES",
    "OUTSIDE_RULES",
    "LIKELIHOODS",
    "HORIZON_MODES",
]
