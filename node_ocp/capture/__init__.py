"""Curvature capture during the backward solve: Kronecker and dense statistics.

``capture.py`` (:class:`CurvatureCapture` and its factor records), ``taps.py`` (which layers
get Kronecker factors, and their rows), ``cells.py`` (recurrent cells as two Kronecker
maps). The curvature *variants* that consume these statistics are elsewhere:
``node_ocp.optim.curvatures``. This package used to be called ``node_ocp.curvature``;
that name still imports, with a ``DeprecationWarning``.
"""

from .capture import CurvatureCapture, DenseFactors, KroneckerFactors
from .cells import RECURRENT_CELLS, CellMap, cell_forward, cell_maps, is_cell
from .taps import conv_patches, input_rows, is_tapped, output_rows, tapped_modules

__all__ = [
    "CurvatureCapture",
    "KroneckerFactors",
    "DenseFactors",
    "tapped_modules",
    "is_tapped",
    "input_rows",
    "output_rows",
    "conv_patches",
    "RECURRENT_CELLS",
    "CellMap",
    "cell_maps",
    "cell_forward",
    "is_cell",
]
