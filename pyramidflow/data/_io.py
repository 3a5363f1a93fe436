"""Shared pieces of the data sets: listing image folders, decoding images with clear errors, and the base
``Dataset`` that turns a list of samples into item dicts.

# NOTE [fail at start]
A data set lists every file when it is constructed and, with ``verify=True`` (the default), opens the
header of every image and mask (cheap: Pillow reads no pixels), so a missing folder, a missing mask, a
file that is not an image or a mask whose size differs from its image stops a training run before the
first step, not after an hour. Pixel data are decoded only when an item is read; a truncated or damaged
file is reported then, naming the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pyramidflow.data.transforms import image_to_tensor, mask_to_tensor, normalize_size, random_flip_rotate

__all__ = ["IMAGE_EXTENSIONS", "UNKNOWN_LABEL", "Sample", "AnomalyDataset", "list_images", "find_by_stem"]

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
UNKNOWN_LABEL = -1
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    Attributes:
        image: path of the image file.
        mask: path of its ground-truth mask, or ``None`` (good image, or no mask known).
        label: 0 good, 1 defect, -1 unknown.
        defect_type: name of the defect folder (``"good"`` for good images, ``""`` when unknown).
    """

    image: Path
    mask: Path | None
    label: int
    defect_type: str


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def list_images(folder: Path, where: str, fix: str) -> list[Path]:
    """Sorted image files (by extension, case-insensitive) directly inside ``folder``.

    Args:
        folder: the folder to list.
        where: the data set name for messages, e.g. ``"MVTecDataset(carpet, train)"``.
        fix: what the user should do when the folder is missing or empty.

    Raises:
        FileNotFoundError: the folder does not exist or holds no image file.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: folder {folder} does not exist; {fix}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"{where}: folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); {fix}"
        )
    return files


def find_by_stem(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """The first image file in ``folder`` whose stem is one of ``stems`` (any image extension)."""
    for stem in stems:
        for ext in IMAGE_EXTENSIONS:
            for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _header_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"{where}: cannot read image {path} ({_one_line(error)}); replace or delete the file."
        ) from None


def _decode(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy() if image.mode != "P" else image.convert("RGBA")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"{where}: cannot decode image {path} ({_one_line(error)}); the file is damaged or truncated, "
            f"replace or delete it."
        ) from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grey-scale images scaled to 8 bits (Pillow's convert would clip them)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            peak = max(float(array.max(initial=0)), 1.0)
        image = Image.fromarray(np.clip(np.rint(array / peak * 255.0), 0, 255).astype(np.uint8), mode="L")
    return image


def load_rgb(path: Path, where: str) -> Image.Image:
    """Decode an image as RGB; grey-scale, palette, RGBA, CMYK and 16-bit images are converted."""
    image = _to_8bit(_decode(path, where))
    return image if image.mode == "RGB" else image.convert("RGB")


def load_mask(path: Path, where: str) -> Image.Image:
    """Decode a mask as 8-bit grey-scale (``1``, palette, RGB and 16-bit masks are converted)."""
    image = _to_8bit(_decode(path, where))
    if image.mode == "1":
        return image.convert("L")
    return image if image.mode == "L" else image.convert("L")


class AnomalyDataset(Dataset):
    """Base data set: a list of :class:`Sample` turned into tensors.

    Each item is a dict with ``image`` (float32 ``(3, H, W)``, ImageNet-normalised), ``mask`` (float32
    ``(1, H, W)`` in {0, 1}; zeros for good or unknown images), ``label`` (int: 0 good, 1 defect, -1
    unknown), ``path`` (str) and ``defect_type`` (str).

    Args:
        samples: the images of the split, in a fixed order.
        name: how messages refer to this data set, e.g. ``"MVTecDataset(carpet, test)"``.
        split: ``"train"`` or ``"test"``.
        size: output size, one int or ``(height, width)``.
        texture: whether the category is a texture (enables augmentation on the train split).
        augment: ``None`` augments exactly when ``split == "train"`` and ``texture``; ``True``/``False`` force it.
        generator: torch generator for the augmentation; ``None`` uses torch's global generator, which
            ``torch.manual_seed`` makes reproducible and which ``DataLoader`` seeds differently in each
            worker. Pass a generator only with ``num_workers=0``: every worker would get a copy of it
            and draw the same augmentations.
        verify: open every file header at construction (see ``NOTE [fail at start]``).
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        name: str,
        split: str,
        size: int | tuple[int, int],
        texture: bool,
        augment: bool | None,
        generator: torch.Generator | None,
        verify: bool,
    ) -> None:
        self.name = name
        self.split = split
        self.size = normalize_size(size, f"{name}: size")
        self.texture = bool(texture)
        self.augment = (split == "train" and self.texture) if augment is None else bool(augment)
        self.generator = generator
        self.samples = list(samples)
        if verify:
            self._verify()

    @property
    def labels(self) -> list[int]:
        """The label of every item, in order (0 good, 1 defect, -1 unknown)."""
        return [sample.label for sample in self.samples]

    def _verify(self) -> None:
        for sample in self.samples:
            image_size = _header_size(sample.image, self.name)
            if sample.mask is not None:
                mask_size = _header_size(sample.mask, self.name)
                if mask_size != image_size:
                    raise ValueError(self._size_message(sample, image_size, mask_size))

    def _size_message(self, sample: Sample, image_size: tuple[int, int], mask_size: tuple[int, int]) -> str:
        return (
            f"{self.name}: mask {sample.mask} is {mask_size[0]}x{mask_size[1]} but its image {sample.image} is "
            f"{image_size[0]}x{image_size[1]} (width x height); masks must have their image's size, "
            f"fix or delete the mask."
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = load_rgb(sample.image, self.name)
        mask_image = None
        if sample.mask is not None:
            mask_image = load_mask(sample.mask, self.name)
            if mask_image.size != image.size:
                raise ValueError(self._size_message(sample, image.size, mask_image.size))
        image_tensor = image_to_tensor(image, self.size)
        mask_tensor = mask_to_tensor(mask_image, self.size)
        if self.augment:
            image_tensor, mask_tensor = random_flip_rotate(image_tensor, mask_tensor, self.generator)
        return {
            "image": image_tensor,
            "mask": mask_tensor,
            "label": sample.label,
            "path": str(sample.image),
            "defect_type": sample.defect_type,
        }

    def __repr__(self) -> str:
        return (
            f"{self.name}: {len(self)} images, size={self.size}, texture={self.texture}, augment={self.augment}"
        )


def check_split(split: str, where: str) -> str:
    """Raise a ValueError unless ``split`` is ``"train"`` or ``"test"``."""
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be 'train' or 'test', got {split!r}.")
    return split


def warn_unmatched(masks: list[Path], folder: Path, where: str) -> None:
    """Warn (pointing at the caller's caller) about masks that match no image."""
    if masks:
        warnings.warn(
            f"{where}: {len(masks)} mask(s) match no image in {folder} (e.g. {masks[0].name}); they are ignored.",
            stacklevel=4,
        )
