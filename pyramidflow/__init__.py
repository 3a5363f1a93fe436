"""pyramidflow: invertible backprop for normalizing flows, and PyramidFlow anomaly localisation."""

from .engine import InvertibleModule, InvertibleSequential, check_inverse, wrap

__all__ = ["InvertibleModule", "InvertibleSequential", "wrap", "check_inverse"]
__version__ = "0.1.0"
