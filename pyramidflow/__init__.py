"""pyramidflow: invertible backprop for normalizing flows, and PyramidFlow anomaly localisation."""

from ._utils import VERSION as __version__
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
    "Detector",
    "Prediction",
]


def __getattr__(name: str):
    # Detector pulls in the data, metrics and inference modules (Pillow, scipy, scikit-learn): imported
    # on first use, so that engine-only users do not pay for them.
    if name in ("Detector", "Prediction"):
        from .inference import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'pyramidflow' has no attribute {name!r}")
