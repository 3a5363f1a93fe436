"""Whether a training run may continue from a checkpoint: the same settings, data and held-out images.

A resumed run continues bit for bit (``NOTE [resume bit for bit]`` in :mod:`pyramidflow.train.loop`) only
if nothing that shapes the trajectory of the weights changed. :data:`RESUMABLE_CHANGES` names the
train settings that may change (the budget, logging, workers, device, drift checks);
:func:`check_same_settings`, :func:`check_same_data` (category, data root, image size, number of
images) and :func:`check_same_split` refuse a resume with one clear line otherwise.

The checkpoint also holds the state of every random number generator the run draws from: torch's
global CPU RNG (augmentation), the CUDA RNG of the run's device, numpy's and Python's global RNGs
(:func:`capture_rng_state`, :func:`restore_rng_state`), as tensors, ints and floats only, so that
checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pyramidflow.checkpoint import CheckpointError, config_differences
from pyramidflow.train.config import TrainConfig

__all__ = [
    "RESUMABLE_CHANGES", "capture_rng_state", "check_same_data", "check_same_settings", "check_same_split",
    "fresh_rng_state", "restore_rng_state",
]

# Train settings a resumed run may change: they do not alter the trajectory of the weights.
RESUMABLE_CHANGES = ("steps", "epochs", "checkpoint_every", "log_every", "num_workers", "device", "drift")


def check_same_settings(saved: Mapping[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse to resume the checkpoint at ``path`` (train config ``saved``) with other settings than ``config``.

    Settings newer than the checkpoint (absent from it) are not compared: the run predates them.

    Raises:
        CheckpointError: a setting outside :data:`RESUMABLE_CHANGES` differs.
    """
    differing = config_differences(
        {k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES},
        {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES and k in saved},
    )
    if differing:
        raise CheckpointError(
            f"train: cannot resume from {path}: the train config differs in {'; '.join(differing)}; "
            f"resume with the same settings (only {', '.join(RESUMABLE_CHANGES)} may change) or use a new folder."
        )


# How a user changes each field of the data record (train.data.data_record) from the command line.
_DATA_FLAGS = {"dataset": "--layout", "root": "--data", "category": "--category", "image_size": "--size",
               "num_images": "images added or removed"}


def check_same_data(saved: Mapping[str, Any] | None, current: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume the checkpoint at ``path`` on other data than it was trained on.

    ``saved`` and ``current`` are :func:`pyramidflow.train.data.data_record` of the checkpoint and of
    this run; ``None`` (a checkpoint older than the record) is not compared.

    Raises:
        CheckpointError: the category, data root, layout, image size or number of images differs.
    """
    if saved is None:
        return
    differing = [key for key in _DATA_FLAGS if key in saved and saved[key] != current.get(key)]
    if differing:
        what = "; ".join(f"{key} {saved[key]!r} (checkpoint) vs {current.get(key)!r} (this run, {_DATA_FLAGS[key]})"
                         for key in differing)
        raise CheckpointError(
            f"train: cannot resume from {path}: it was trained on other data: {what}; resume with the checkpoint's "
            "data, or train into another folder (--out)."
        )


def check_same_split(recorded: list[int] | None, current: list[int] | None, path: Path) -> None:
    """Refuse to resume the checkpoint at ``path`` if its held-out images differ from the data set's now.

    ``recorded`` and ``current`` are the held-out indices of the checkpoint and of this run; ``None``
    (not recorded) is not compared.

    Raises:
        CheckpointError: the calibration split changed (the image folder changed).
    """
    if recorded is not None and current is not None and recorded != current:
        raise CheckpointError(
            f"train: cannot resume from {path}: its calibration split held out images {recorded} but the "
            f"data set now gives {current} (the folder changed); resume with the same images."
        )

def capture_rng_state(device: torch.device) -> dict:
    """The state of torch's CPU RNG, ``device``'s CUDA RNG (``None`` off CUDA), numpy's and Python's RNGs."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # numpy's state as tensors and ints, so the checkpoint loads with weights_only=True.
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
    }
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Set every generator to ``state`` (from :func:`capture_rng_state`); the CUDA one only on CUDA."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1]))


def fresh_rng_state(seed: int, step: int, rank: int) -> dict:
    """A deterministic RNG state for a rank whose state the checkpoint lacks (an interrupted DDP run)."""
    torch.manual_seed(seed * 1_000_003 + step * 7919 + rank)
    return capture_rng_state(torch.device("cpu"))
