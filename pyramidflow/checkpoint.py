"""Checkpoint files of a training run: atomic writes, and loading with clear errors.

A checkpoint is one ``torch.save`` file holding a plain dict (see :data:`CHECKPOINT_KEYS`): the model
and train configs as dicts, the weights, the optimizer state, the step, every RNG state the run
draws from, the sampler's position, the per-step losses and, once training has finished, the latent
template and the score statistics of the training images. It contains only tensors and plain Python
values, so it loads with ``torch.load(..., weights_only=True)``: opening a checkpoint never runs code.

A crash, a full disk or Ctrl-C in the middle of ``torch.save`` must never leave a truncated
``checkpoint.pt`` behind, or destroy the previous good one: the file is written through
:func:`pyramidflow._utils.atomic_write` (NOTE [atomic write]).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ._torch_file import CheckpointError, read_torch_file
from ._utils import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINT_KEYS",
    "CHECKPOINT_NAME",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "read_torch_file",
    "save_checkpoint_atomic",
]

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = (
    "format_version",
    "model_config",
    "train_config",
    "model",
    "optimizer",
    "step",
    "rng",
    "sampler",
    "losses",
    "finished",
    "template",
    "score_stats",
)

# Keys added after format version 1 was fixed; older files lack them and load with None.
OPTIONAL_KEYS = ("calibration", "drift", "data", "registration")

# How to run, not what was trained: a run may resume with another of these (they change memory and
# rounding order, never the maths), and any checkpoint serves every one of them.
_EXECUTION_ONLY = ("mode", "kernels", "backward_tile")


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, as returned by :func:`load_checkpoint`.

    Attributes:
        path: the file it was read from.
        format_version: :data:`CHECKPOINT_FORMAT_VERSION` at the time of writing.
        model_config: the model config as a dict (``dataclasses.asdict`` of ``PyramidFlowConfig``).
        train_config: the train config as a dict (``dataclasses.asdict`` of ``TrainConfig``).
        model: the model's ``state_dict``.
        optimizer: the optimizer's ``state_dict``.
        step: optimizer steps completed.
        rng: RNG states (``torch``, ``cuda``, ``numpy``, ``python``) at that step.
        sampler: the batch sampler's position (``seed``, ``epoch``, ``batch``).
        losses: the training loss of every completed step, in order.
        finished: whether training reached its budget (template and score statistics are then set).
        template: the latent template, one tensor ``(1, C, H_i, W_i)`` per level, or ``None``.
        score_stats: statistics of the training images' anomaly maps (see ``pyramidflow.train``), or ``None``.
        drift: ``[step, largest reconstruction drift]`` per logging interval (``None`` for an interval
            without measurement), or ``None`` in checkpoints written before drift was recorded.
        calibration: the held-out split (``seed``, ``fraction``, ``held_out`` indices and names) and, once
            training has finished, the decision thresholds set on it (see ``pyramidflow.calibration``);
            ``None`` in checkpoints written before calibration existed.
        data: what the run was trained on (``dataset``, ``root``, ``category``, ``image_size``,
            ``num_images``; see :func:`pyramidflow.train.data.data_record`), or ``None`` in older checkpoints.
        registration: ``{"reference": (3, H, W)}``, the mean training image that ``register=True`` aligns
            images to (:mod:`pyramidflow.inference.registration`), stored by a finished ``train``; ``None``
            in unfinished runs and in checkpoints written before ``train`` stored it.
    """

    path: Path
    format_version: int
    model_config: dict
    train_config: dict
    model: dict
    optimizer: dict
    step: int
    rng: dict
    sampler: dict
    losses: list = field(default_factory=list)
    finished: bool = False
    template: list | None = None
    score_stats: dict | None = None
    drift: list | None = None
    calibration: dict | None = None
    data: dict | None = None
    registration: dict | None = None

    def build_model(self, map_location: str | torch.device = "cpu") -> torch.nn.Module:
        """A ``PyramidFlow`` with this checkpoint's config and weights, in eval mode."""
        from pyramidflow.model import PyramidFlow, PyramidFlowConfig
        from pyramidflow.model.encoder import encoder_skeleton

        config = PyramidFlowConfig(**self.model_config)
        # The encoder's weights are in the state dict (NOTE [frozen encoder]): no weights file needed here.
        model = PyramidFlow(config, encoder=encoder_skeleton(config.encoder))
        model.load_state_dict(self.model)
        return model.to(map_location).eval()


def save_checkpoint_atomic(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (NOTE [atomic write] in :mod:`pyramidflow._utils`).

    Args:
        state: the dict to save (tensors and plain Python values only).
        path: destination file; its folder must exist.

    Returns:
        ``Path(path)``.

    Raises:
        OSError, RuntimeError: whatever ``torch.save`` or the file system raised; the previous file at
            ``path``, if any, is left as it was and no temporary file remains.
    """
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        torch.save(dict(state), handle)
    return path


def config_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``["channels=16 (checkpoint) vs 8 (asked)", ...]`` for every setting that differs."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key, "<unset>"), wanted.get(key, "<unset>")
        if isinstance(a, list) and isinstance(b, tuple) or isinstance(a, tuple) and isinstance(b, list):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{key}={a!r} (checkpoint) vs {b!r} (asked)")
    return out


def _as_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(
        f"load_checkpoint: model_config must be a PyramidFlowConfig (or a dict of its fields), "
        f"got {type(config).__name__}."
    )


def _defaults_of(config: Any) -> dict:
    """The default of every field of a config dataclass (none for a dict)."""
    if not dataclasses.is_dataclass(config):
        return {}
    return {f.name: f.default for f in dataclasses.fields(config)
            if f.default is not dataclasses.MISSING and f.name not in _EXECUTION_ONLY}


def load_checkpoint(
    path: str | os.PathLike,
    model_config: Any = None,
    *,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read a checkpoint written by :func:`pyramidflow.train.train`.

    Args:
        path: the checkpoint file (usually ``<out_dir>/checkpoint.pt``).
        model_config: if given, the ``PyramidFlowConfig`` the caller expects; a checkpoint from any
            other config is refused, naming the settings that differ.
        map_location: where to put the tensors (default CPU).

    Returns:
        The :class:`Checkpoint`.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the file is damaged or not a pyramidflow checkpoint, was written by a newer
            format, or its model config differs from ``model_config``.

    Example:
        >>> ckpt = load_checkpoint("runs/nut/checkpoint.pt")  # doctest: +SKIP
        >>> model = ckpt.build_model()  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_checkpoint: no checkpoint at {path}; pass the checkpoint.pt written by `pyramidflow train`."
        )
    state = read_torch_file(path, "load_checkpoint", "use another checkpoint or train again.", map_location)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"load_checkpoint: {path} is not a pyramidflow checkpoint (missing {', '.join(missing)}); "
            f"pass the checkpoint.pt written by `pyramidflow train`."
        )
    version = state["format_version"]
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"load_checkpoint: {path} has format version {version!r} but this pyramidflow reads versions up "
            f"to {CHECKPOINT_FORMAT_VERSION}; upgrade pyramidflow."
        )
    if model_config is not None:
        # The engine's mode (invertible / checkpoint / autograd) and the backward tile change how
        # gradients are computed, never the weights: a checkpoint serves every one.
        saved = {k: v for k, v in state["model_config"].items() if k not in _EXECUTION_ONLY}
        # A setting added after the checkpoint was written had its default then: fill it in.
        saved = {**_defaults_of(model_config), **saved}
        wanted = {k: v for k, v in _as_dict(model_config).items() if k not in _EXECUTION_ONLY}
        differences = config_differences(saved, wanted)
        if differences:
            raise CheckpointError(
                f"load_checkpoint: {path} was written for another model config: {'; '.join(differences)}; "
                f"use the checkpoint's settings or another output folder."
            )
    optional = {key: state.get(key) for key in OPTIONAL_KEYS}
    return Checkpoint(path=path, **{key: state[key] for key in CHECKPOINT_KEYS}, **optional)
