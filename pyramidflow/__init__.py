"""pyramidflow: invertible backprop for normalizing flows, and PyramidFlow anomaly localisation."""

from .engine import InvertibleModule, InvertibleSequential, check_inverse, wrap
from .model import PyramidFlow, PyramidFlowConfig

__all__ = ["InvertibleModule", "InvertibleSequential", "wrap", "check_inverse", "PyramidFlow", "PyramidFlowConfig"]
__version__ = "0.1.0"
