"""Offline data: procedural toys, data bundled in packages, irregular series, user files,
the standard tabular density suite read from the user's copy of its release files.

Nothing here downloads anything.
"""

from .bundled import TABULAR, bundled_uea_names, digits_images, tabular_density, uea_series
from .density_suite import SUITE, suite_density
from .files import (
    file_classification,
    file_density,
    file_image_density,
    load_image_file,
    load_tabular_file,
)
from .forecast import PROCEDURAL, procedural_forecast, procedural_series, uea_forecast
from .irregular import IrregularBatch, collate_irregular
from .series_files import (
    SeriesSet,
    file_series_classification,
    file_series_forecast,
    load_series_file,
    read_long_csv,
    read_ts_file,
)
from .splits import Split, TaskData, split_indices, standardize
from .toys import TOYS, toy_2d, two_spirals

__all__ = [
    "TOYS",
    "toy_2d",
    "two_spirals",
    "PROCEDURAL",
    "procedural_series",
    "procedural_forecast",
    "uea_forecast",
    "TABULAR",
    "tabular_density",
    "digits_images",
    "SUITE",
    "suite_density",
    "uea_series",
    "bundled_uea_names",
    "IrregularBatch",
    "collate_irregular",
    "load_tabular_file",
    "file_density",
    "file_image_density",
    "file_classification",
    "load_image_file",
    "SeriesSet",
    "read_long_csv",
    "read_ts_file",
    "load_series_file",
    "file_series_classification",
    "file_series_forecast",
    "Split",
    "TaskData",
    "split_indices",
    "standardize",
]
