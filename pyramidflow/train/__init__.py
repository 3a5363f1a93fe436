"""Training: :func:`train` runs the method's training and writes a checkpoint that evaluation reads.

The loop is :mod:`.loop`; its settings :mod:`.config`; the data side, statistics after training,
resume checks, RNG state, log, NaN stop, stop signals and data-parallel helpers are one module each.
"""

from .config import TrainConfig, TrainingDivergedError, TrainResult, resolve_device
from .loop import train

__all__ = ["TrainConfig", "TrainResult", "TrainingDivergedError", "resolve_device", "train"]
