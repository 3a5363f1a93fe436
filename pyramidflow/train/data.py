"""The data side of training: the data-set check, the augmentation switch, the hold-out split, the loaders.

:func:`pyramidflow.train.train` takes any map-style data set of dicts with an ``image`` tensor. Before
the run, :func:`check_dataset` rejects anything else with one clear line, :func:`check_images` decodes
every image once (so a damaged file fails before the first step, not after the last),
:func:`apply_augmentation_setting` applies ``TrainConfig.augment``, :func:`data_record` says what the
run trains on (for the resume check) and :func:`hold_out` sets the seeded calibration images aside
(:mod:`pyramidflow.calibration`). During the run, :func:`epoch_loader` serves the seeded shuffle from
any step on (``NOTE [resume bit for bit]`` in :mod:`pyramidflow.train.loop`); after it, the template pass
reads the training images in order (:func:`plain_loader`) and unaugmented (:func:`without_augmentation`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pyramidflow.calibration import CalibrationSplit, calibration_split
from pyramidflow.train.distributed import EpochBatchSampler
from pyramidflow.train.config import TrainConfig

__all__ = [
    "apply_augmentation_setting",
    "apply_bit_depth_setting",
    "batch_images",
    "check_dataset",
    "check_images",
    "data_record",
    "epoch_loader",
    "hold_out",
    "image_size",
    "plain_loader",
    "without_augmentation",
]


def check_dataset(dataset: Any) -> None:
    """Reject anything but a non-empty map-style data set of dicts with ``image``.

    Raises:
        TypeError: not a map-style data set, or items that are not dicts with ``image``.
        ValueError: the data set is empty.
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"train: dataset must be a map-style torch Dataset of dicts with 'image', got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("train: the training data set is empty; point it at a folder of normal images.")
    item = dataset[0]
    if not isinstance(item, dict) or "image" not in item:
        raise TypeError(
            f"train: dataset items must be dicts with an 'image' tensor (3, H, W), got {type(item).__name__}; "
            "use a pyramidflow.data data set."
        )


def _item_name(dataset: Any, index: int) -> str:
    """``image <file>`` where the data set lists its files (``samples``), else ``item <index>``."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return f"image {getattr(samples[index], 'image', samples[index])}"
    return f"item {index}"


def check_images(dataset: Dataset) -> None:
    """Decode every image (training and held-out) once, unaugmented, before the first step.

    The held-out calibration images are otherwise first read after the last step: a damaged one
    would cost the whole run, and deleting it then changes the split that a resume needs. The data
    sets of :mod:`pyramidflow.data` raise one line naming the file; a shape unlike the first image's
    (which would stop the loader mid-run) is refused here, naming the file.

    Raises:
        ValueError: an image that cannot be decoded, or of another shape than the first.
    """
    expected = None
    with without_augmentation(dataset):
        for index in range(len(dataset)):
            shape = tuple(dataset[index]["image"].shape)
            if expected is None:
                expected = shape
            elif shape != expected:
                raise ValueError(
                    f"train: {_item_name(dataset, index)} has shape {shape} but {_item_name(dataset, 0)} has "
                    f"{expected}; training images must share one size (the pyramidflow.data data sets resize them)."
                )


def data_record(dataset: Dataset) -> dict:
    """What a run trains on, stored in its checkpoint so that a resume on other data is refused.

    ``dataset`` (the class, i.e. the layout), ``root`` (absolute) and ``category`` where the data set
    has them (``None`` otherwise), ``image_size`` ``[H, W]`` and ``num_images``.
    """
    root = getattr(dataset, "root", None)
    return {
        "dataset": type(dataset).__name__,
        "root": None if root is None else str(Path(root).resolve()),
        "category": getattr(dataset, "category", None),
        "image_size": list(image_size(dataset)),
        "num_images": len(dataset),
    }


def apply_augmentation_setting(dataset: Dataset, augment: bool | None) -> None:
    """``TrainConfig.augment``: ``None`` keeps the data set's own choice (textures on), a bool forces it.

    Raises:
        ValueError: ``augment`` is a bool but the data set has no boolean ``augment`` attribute.
    """
    if augment is None:
        return
    if not isinstance(getattr(dataset, "augment", None), bool):
        raise ValueError(
            f"train: TrainConfig.augment={augment} but the data set ({type(dataset).__name__}) has no boolean "
            "'augment' attribute to switch; use a pyramidflow.data data set or leave augment=None."
        )
    dataset.augment = bool(augment)


def apply_bit_depth_setting(dataset: Dataset, bit_depth: int | None) -> int | None:
    """``TrainConfig.bit_depth``: the bit depth the training images are read at, to record in the checkpoint.

    ``None`` keeps the data set's own (``NOTE [bit depth]`` in :mod:`pyramidflow.data._io`); an int is
    applied to a data set that reads files and has none set.

    Raises:
        ValueError: the data set was built with another bit depth.
    """
    own = getattr(dataset, "bit_depth", None)
    if bit_depth is None or own == bit_depth:
        return own
    if own is not None:
        raise ValueError(
            f"train: TrainConfig.bit_depth={bit_depth} but the data set reads images at bit_depth={own}; "
            "give the same value to both, or leave TrainConfig.bit_depth=None."
        )
    if hasattr(dataset, "bit_depth"):
        dataset.bit_depth = bit_depth
    return bit_depth


@contextlib.contextmanager
def without_augmentation(dataset: Dataset) -> Iterator[None]:
    """Template and statistics describe the training images as they are, not random flips of them.

    Data sets of :mod:`pyramidflow.data` switch augmentation with their ``augment`` attribute; other
    data sets are used as given.
    """
    augment = getattr(dataset, "augment", None)
    if isinstance(augment, bool):
        dataset.augment = False
    try:
        yield
    finally:
        if isinstance(augment, bool):
            dataset.augment = augment


def hold_out(dataset: Dataset, config: TrainConfig) -> tuple[Dataset, Dataset | None, dict]:
    """The seeded calibration split (``pyramidflow.calibration``): training images, held-out images, record.

    The held-out images are ``None`` when ``config.calibration_fraction`` is 0; the record (seed,
    fraction, held-out indices and, where the data set has ``samples``, their file names) goes into
    the checkpoint.
    """
    train_indices, held_out = calibration_split(len(dataset), config.calibration_fraction, config.seed)
    samples = getattr(dataset, "samples", None)
    names = [str(getattr(samples[i], "image", samples[i])) for i in held_out] if samples is not None else None
    record = {"seed": config.seed, "fraction": config.calibration_fraction, "held_out": held_out,
              "held_out_names": names}
    if not held_out:
        return dataset, None, record
    return CalibrationSplit(dataset, train_indices), CalibrationSplit(dataset, held_out), record


def image_size(dataset: Dataset) -> tuple[int, int]:
    """``(H, W)`` of the data set's first image."""
    return tuple(dataset[0]["image"].shape[-2:])


def batch_images(batch: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The images ``(N, 3, H, W)`` of a loader's batch (a dict with ``image``, or the tensor), on ``device``."""
    images = batch["image"] if isinstance(batch, dict) else batch
    return images.to(device=device, dtype=dtype, non_blocking=True)


def plain_loader(dataset: Dataset, config: TrainConfig) -> DataLoader:
    """The data set in order, in batches of ``config.batch_size`` (the passes after training)."""
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers,
                      generator=generator)


def epoch_loader(dataset: Dataset, sampler: EpochBatchSampler, step: int, config: TrainConfig, rank: int,
                 device: torch.device) -> DataLoader:
    """This rank's training batches from ``step`` to the end of its epoch, in the epoch's seeded shuffle."""
    epoch, batch = divmod(step, sampler.batches_per_epoch)
    sampler.set_position(epoch, batch)
    # Its own generator: building the iterator draws worker base seeds from it, never from the
    # global RNG that augmentation uses (NOTE [resume bit for bit] in train/loop.py).
    generator = torch.Generator()
    generator.manual_seed((config.seed * 1_000_003 + epoch * 7919 + rank) & 0x7FFF_FFFF)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda", generator=generator)
