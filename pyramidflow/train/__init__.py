"""Training: :func:`train` runs the method's training and writes a checkpoint that evaluation reads.

The loop is :mod:`.loop`; its settings :mod:`.config`; the data side, statistics after training,
resume checks, RNG state, log, NaN stop, stop signals and data-parallel helpers are one module each.
The names below are imported on first use, so that :mod:`.interrupts` loads without torch
(NOTE [light package import] in :mod:`pyramidflow`).
"""

__all__ = ["TrainConfig", "TrainResult", "TrainingDivergedError", "resolve_device", "train"]

_HOMES = {"TrainConfig": "config", "TrainResult": "config", "TrainingDivergedError": "config",
          "resolve_device": "config", "train": "loop"}


def __getattr__(name: str):
    import importlib

    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
