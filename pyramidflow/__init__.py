"""pyramidflow: invertible backprop for normalizing flows, and PyramidFlow anomaly localisation."""

from ._utils import VERSION as __version__

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

# NOTE [light package import]
# The public names are imported on first use, so `import pyramidflow.cli` loads no torch: the command
# line installs its stop-signal handling before the heavy imports (a Ctrl-C during them is then one
# line, not a traceback), and engine-only users do not pay for Pillow, scipy or scikit-learn.
_HOMES = {
    "InvertibleModule": "engine", "InvertibleSequential": "engine", "wrap": "engine", "check_inverse": "engine",
    "DriftWarning": "engine", "DriftError": "engine", "PyramidFlow": "model", "PyramidFlowConfig": "model",
    "Detector": "inference.detector", "Prediction": "inference.detector",
}


def __getattr__(name: str):
    import importlib

    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a subpackage not imported yet, e.g. `pyramidflow.engine`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'pyramidflow' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
