"""pyramidflow: invertible backprop for normalizing flows, and PyramidFlow anomaly localisation."""

from .engine import DriftError, DriftWarning, InvertibleModule, InvertibleSequential, check_inverse, wrap
from .model import PyramidFlow, PyramidFlowConfig

__all__ = [
    "InvertibleModule",
    "InvertibleSequential",
    "wrap",
    "check_inverse",
    "DriftWarning",
    "DriftError",
    "PyramidFlow",
    "PyramidFlowConfig",
]
__version__ = "0.1.0"
