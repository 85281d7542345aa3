"""Curvature variants: one :class:`CurvatureUnit` subclass per variant, one module each.

:data:`VARIANTS` is the registry the optimizer reads (the ``curvature=`` names);
:data:`FALLBACK` is the unit of parameters the chosen variant does not cover (GRU cells,
norms, layer types without Kronecker factors), :data:`OUTSIDE` the unit of layers outside
the ODE blocks for a ``"block"``-scoped variant.
"""

from .base import CurvatureUnit, Damping, dot
from .dense import DenseUnit
from .diagonal import DiagonalUnit
from .ekfac import EKFACUnit
from .identity import IdentityUnit
from .kfac import KFACUnit, pi_split
from .kronecker import KroneckerUnit, layer_matrix, split_layer_matrix

VARIANTS: dict[str, type[CurvatureUnit]] = {
    "identity": IdentityUnit,
    "diagonal": DiagonalUnit,
    "kfac": KFACUnit,
    "ekfac": EKFACUnit,
    "dense": DenseUnit,
}
FALLBACK: type[CurvatureUnit] = DiagonalUnit
OUTSIDE: type[CurvatureUnit] = KFACUnit

__all__ = [
    "VARIANTS",
    "FALLBACK",
    "OUTSIDE",
    "CurvatureUnit",
    "Damping",
    "KroneckerUnit",
    "IdentityUnit",
    "DiagonalUnit",
    "KFACUnit",
    "EKFACUnit",
    "DenseUnit",
    "dot",
    "layer_matrix",
    "split_layer_matrix",
    "pi_split",
]
