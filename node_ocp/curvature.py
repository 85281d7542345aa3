"""Deprecated name of :mod:`node_ocp.capture` (the capture of the backward solves' statistics).

The package was renamed so that it no longer looks like ``node_ocp.optim.curvatures`` (the
curvature variants). Importing this module warns once and re-exports the new package; its
submodules are the new ones under the old names (``node_ocp.curvature.capture`` *is*
``node_ocp.capture.capture``), so old imports and pickles keep resolving to the same classes.
"""

import sys
import warnings

from . import capture as _new
from .capture import *  # noqa: F403  (the same objects under the old name)
from .capture import (
    __all__,  # noqa: F401
    capture,
    cells,
    taps,
)

# ``import node_ocp.curvature.cells`` (and unpickling) finds the new modules, not copies.
sys.modules[f"{__name__}.capture"] = capture
sys.modules[f"{__name__}.cells"] = cells
sys.modules[f"{__name__}.taps"] = taps

MESSAGE = f"{__name__} is deprecated: it was renamed to {_new.__name__}; import from there"
warnings.warn(MESSAGE, DeprecationWarning, stacklevel=2)
