"""Curvature capture during the backward solve: Kronecker and dense statistics."""

from .capture import CurvatureCapture, DenseFactors, KroneckerFactors
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
]
