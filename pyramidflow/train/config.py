"""Settings and results of a training run, and the device choice: what :func:`pyramidflow.train.train` takes and gives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._utils import DEVICES, resolve_device
from ..data._io import check_bit_depth
from ..engine.drift import DRIFT_POLICIES
from ..pixel_threshold import DEFAULT_PIXEL_RULE, check_pixel_rule

__all__ = ["DEVICES", "DTYPES", "REFERENCE_EPOCHS", "TrainConfig", "TrainResult", "TrainingDivergedError", "resolve_device"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
REFERENCE_EPOCHS = 15  # the budget of the reference run, when neither steps nor epochs is given


class TrainingDivergedError(RuntimeError):
    """The loss (or a weight) became NaN or infinite; training stopped without saving the bad state."""


@dataclass
class TrainConfig:
    """Settings of a training run (the defaults are the method's).

    Give exactly one budget: ``steps`` (optimizer steps) or ``epochs`` (passes over the training set;
    the reference run uses 15). An epoch has ``len(dataset) // batch_size`` steps: an incomplete last
    batch is dropped.

    Args:
        steps: number of optimizer steps, or ``None`` to use ``epochs``.
        epochs: number of epochs, or ``None`` to use ``steps``.
        batch_size: images per step over all processes, at least 2 (the loss compares pairs).
        lr: Adam learning rate.
        betas: Adam betas.
        eps: Adam epsilon (1e-4 in the method, much larger than Adam's default).
        weight_decay: Adam weight decay (L2).
        grad_clip: largest gradient norm (all parameters together); ``None`` disables clipping.
        seed: seeds the initial weights, the shuffles and the augmentation.
        checkpoint_every: write ``checkpoint.pt`` every this many steps (``None``: only at the end).
        num_workers: data-loading worker processes (0 loads in the training process; resuming is
            bit for bit only then, see ``NOTE [resume bit for bit]``).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        log_every: update the progress bar, and check the loss for NaN/inf, every this many steps.
        dtype: ``"float32"`` or ``"float64"`` (for exact comparisons in tests).
        score_quantile: quantile of the training images' pixel scores stored in the checkpoint.
        augment: texture augmentation (random flips and 90° rotations) of the training images;
            ``None`` keeps the data set's choice (on for textures, off for objects, as the authors),
            ``False`` turns it off (``--no-augment``), ``True`` forces it. The template and score
            statistics never use it.
        drift: the engine's reconstruction-drift policy (``InvertibleSequential(drift=...)``):
            ``"recompute"`` (default: a long run never trains on silently wrong gradients),
            ``"warn"``, ``"raise"`` or ``"off"``. May change on resume: it changes the
            gradients only of steps whose reconstruction drifted.
        calibration_fraction: share of the good images held out of training to set the decision
            thresholds (at least 4 images; 0 holds out none and sets them on the training images,
            optimistically); see :mod:`pyramidflow.calibration`.
        image_fpr: target false-positive rate of the image threshold on good parts.
        pixel_fpr: target false-positive rate of the pixel threshold on good pixels (the ``"fpr"`` rule's,
            and the floor of the ``"synthetic"`` rule's).
        pixel_rule: ``"synthetic"`` (the mask's outline) or ``"fpr"``; see :mod:`pyramidflow.pixel_threshold`.
        bit_depth: significant bits of 16-bit training images (8..16; ``None``: the data set's setting,
            by default each file's own depth). Stored in the checkpoint, so that ``eval``, ``predict`` and
            :class:`~pyramidflow.Detector` read images as training did (``NOTE [bit depth]`` in
            :mod:`pyramidflow.data._io`).
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 2
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int | None = 500
    num_workers: int = 0
    device: str = "auto"
    log_every: int = 10
    dtype: str = "float32"
    score_quantile: float = 0.99
    augment: bool | None = None
    drift: str = "recompute"
    calibration_fraction: float = 0.1
    image_fpr: float = 0.01
    pixel_fpr: float = 0.001
    bit_depth: int | None = None
    pixel_rule: str = DEFAULT_PIXEL_RULE

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"TrainConfig: give exactly one budget, steps or epochs (got steps={self.steps}, "
                f"epochs={self.epochs}); e.g. epochs=15 as in the reference run."
            )
        for name in ("steps", "epochs", "batch_size", "num_workers", "log_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"TrainConfig: {name} must be an int, got {value!r} ({type(value).__name__}).")
        for name in ("steps", "epochs", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig: {name} must be at least 1, got {value}.")
        if self.seed < 0:
            raise ValueError(f"TrainConfig: seed must be >= 0 (the shuffle's generators take no negative seed), got {self.seed}.")
        if self.batch_size < 2:
            raise ValueError(
                f"TrainConfig: batch_size must be at least 2 (the loss compares pairs of images), got {self.batch_size}."
            )
        if self.num_workers < 0:
            raise ValueError(f"TrainConfig: num_workers must be >= 0, got {self.num_workers}.")
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"TrainConfig: {name} must be a positive number, got {value!r}.")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig: weight_decay must be >= 0, got {self.weight_decay!r}.")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig: betas must be two numbers in [0, 1), got {self.betas!r}.")
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, (int, float)) and math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise ValueError(f"TrainConfig: grad_clip must be a positive number or None, got {self.grad_clip!r}.")
        if self.device not in DEVICES:
            raise ValueError(f"TrainConfig: device must be one of {DEVICES}, got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig: dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}.")
        if self.augment is not None and not isinstance(self.augment, bool):
            raise TypeError(f"TrainConfig: augment must be True, False or None, got {self.augment!r}.")
        if self.drift not in DRIFT_POLICIES:
            raise ValueError(f"TrainConfig: drift must be one of {DRIFT_POLICIES}, got {self.drift!r}.")
        if not 0.0 < self.score_quantile < 1.0:
            raise ValueError(f"TrainConfig: score_quantile must lie in (0, 1), got {self.score_quantile!r}.")
        if not (isinstance(self.calibration_fraction, (int, float)) and 0.0 <= self.calibration_fraction < 1.0):
            raise ValueError(
                f"TrainConfig: calibration_fraction must lie in [0, 1), got {self.calibration_fraction!r}; 0.1 holds out 10%."
            )
        for name in ("image_fpr", "pixel_fpr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise ValueError(f"TrainConfig: {name} must be a false-positive rate in (0, 1), got {value!r}.")
        self.bit_depth = check_bit_depth(self.bit_depth, "TrainConfig")
        check_pixel_rule(self.pixel_rule)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        checkpoint_path: the final ``checkpoint.pt`` (written by rank 0 only).
        step: optimizer steps completed.
        losses: the loss of every step, in order (those of a resumed run's earlier steps included).
        model: the trained ``PyramidFlow`` (not the DDP wrapper), in eval mode.
        template: the latent template, one tensor ``(1, C, H_i, W_i)`` per level (``None`` off rank 0).
        score_stats: statistics of the training images' anomaly maps (``None`` off rank 0): ``image_mean``,
            ``image_std``, ``image_max`` (image score = max of the map), ``pixel_quantile`` at ``quantile``,
            ``num_images``.
    """

    checkpoint_path: Path
    step: int
    losses: list[float]
    model: torch.nn.Module
    template: list[Tensor] | None = None
    score_stats: dict | None = None
