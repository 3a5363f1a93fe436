"""Shared pieces of the data sets: listing image folders, decoding images with clear errors, and the base
``Dataset`` that turns a list of samples into item dicts.

# NOTE [fail at start]
A data set lists every file when it is constructed and, with ``verify=True`` (the default), opens the
header of every image and mask (cheap: Pillow reads no pixels), so a missing folder, a missing mask, a
file that is not an image or a mask whose size differs from its image stops a training run before the
first step, not after an hour. Pixel data are decoded only when an item is read; a truncated or damaged
file is reported then, naming the file.

# NOTE [images as viewers show them]
Phones and many cameras store a picture as the sensor read it and record how to turn it in the EXIF
orientation tag; every viewer applies the tag. Every image the library reads (training images, masks,
``eval``, ``predict``, :class:`~pyramidflow.inference.detector.Detector`) is turned the same way, here and
only here (:func:`upright`, and :func:`_header_size` for the size), so scores, masks, maps and region boxes
are in the orientation the user sees. A stored-rotated image read as stored would be scored as a part
the model never saw, and its mask would not match the defect the user points at.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from pyramidflow.data.transforms import image_to_tensor, mask_to_tensor, normalize_size, random_flip_rotate

__all__ = [
    "IMAGE_EXTENSIONS", "UNKNOWN_LABEL", "Sample", "AnomalyDataset", "list_images", "find_by_stem", "check_bit_depth",
    "upright",
]

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


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable(error: BaseException, path: Path, where: str, otherwise: str) -> ValueError:
    """The one-line error for an image Pillow refused: too large, else ``otherwise``."""
    if isinstance(error, Image.DecompressionBombError):
        return ValueError(
            f"{where}: image {path} is too large to open ({_one_line(error)}); Pillow refuses images over "
            f"{2 * Image.MAX_IMAGE_PIXELS} pixels as a guard against decompression bombs: downscale or crop it "
            f"(images are resized to the trained size anyway), or from Python raise PIL.Image.MAX_IMAGE_PIXELS."
        )
    return ValueError(f"{where}: {otherwise.format(path=path, error=_one_line(error))}")


# EXIF orientations 5 to 8 turn the picture by a quarter: the shown width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: stored as shown), read from the header (NOTE [images as viewers show them])."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # no eXIf chunk before the pixels; Pillow would decode them to look for one after
    return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def upright(image: Image.Image) -> Image.Image:
    """``image`` as viewers show it: its EXIF orientation applied (NOTE [images as viewers show them]).

    An image without an orientation tag (or with tag 1) is returned as it is, not copied.
    """
    return image if _orientation(image) == 1 else ImageOps.exif_transpose(image)


def _header_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) as viewers show the image, from the file header, without decoding pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return (height, width) if _orientation(image) in _QUARTER_TURNS else (width, height)
    except _DECODE_ERRORS as error:
        raise _unreadable(error, path, where, "cannot read image {path} ({error}); replace or delete the file.") from None


def _decode(path: Path, where: str) -> tuple[Image.Image, bool]:
    """The decoded image, turned as viewers show it, and whether it is a 16-bit colour file that Pillow kept
    only the high bytes of. Every image and mask file the library reads is decoded here."""
    try:
        with Image.open(path) as image:
            high_bytes_only = image.mode in ("RGB", "RGBA") and any(";16" in str(tile.args) for tile in image.tile)
            image.load()
            shown = upright(image)
            if shown is image:
                shown = image.copy()
            return (shown if shown.mode != "P" else shown.convert("RGBA")), high_bytes_only
    except _DECODE_ERRORS as error:
        raise _unreadable(error, path, where, "cannot decode image {path} ({error}); the file is damaged or "
                          "truncated, replace or delete it.") from None


# NOTE [bit depth]
# A pixel's brightness is its value over the largest value of the file's bit depth: 255 for 8-bit
# files, 65535 for 16-bit ones, whatever the image holds (a dark 16-bit image stays dark). A camera
# whose 10- or 12-bit samples sit in a 16-bit container says so with ``bit_depth`` (``--bit-depth``):
# then 1023 or 4095 is full brightness, and a larger value is refused rather than clipped. The setting
# concerns 16-bit files only (8-bit files are read as they are); it is stored in the checkpoint, so
# that inference reads images as training did. Float images must hold values in [0, 1].
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_BIT_DEPTHS = range(8, 17)


def check_bit_depth(bit_depth: int | None, where: str) -> int | None:
    """``bit_depth`` as an int in 8..16, or ``None`` (the file's own depth); see ``NOTE [bit depth]``.

    Raises:
        ValueError: any other value.
    """
    if bit_depth is None:
        return None
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, (int, np.integer)) or bit_depth not in _BIT_DEPTHS:
        raise ValueError(
            f"{where}: bit_depth (--bit-depth) must be the significant bits of 16-bit images, an int from 8 to 16, "
            f"or None for the files' own depth; got {bit_depth!r}."
        )
    return int(bit_depth)


def _to_8bit(image: Image.Image, high_bytes_only: bool, path: Path, where: str, bit_depth: int | None) -> Image.Image:
    """16-bit, 32-bit integer and float grey-scale images scaled to 8 bits (see ``NOTE [bit depth]``)."""
    if high_bytes_only and bit_depth not in (None, 16):
        raise ValueError(
            f"{where}: {path} is a 16-bit colour image, which Pillow decodes to 8 bits per channel, so "
            f"bit_depth={bit_depth} cannot be applied to it; save the images as 16-bit grey-scale, or as 8-bit "
            f"colour scaled from {bit_depth} bits."
        )
    if image.mode not in _SIXTEEN_BIT_MODES + ("I", "F"):
        return image
    array = np.asarray(image, dtype=np.float64)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(array).all() and low >= 0.0 and high <= 1.0):
            raise ValueError(
                f"{where}: {path} holds float pixels in [{low:g}, {high:g}], but float images must be in [0, 1]; "
                f"scale them to [0, 1] or save them as 8- or 16-bit integers."
            )
        peak = 1.0
    else:
        if image.mode == "I" and bit_depth is None:
            raise ValueError(
                f"{where}: {path} holds 32-bit integer pixels and its bit depth is unknown; pass bit_depth "
                f"(--bit-depth) with the sensor's bit depth, or save the images as 8- or 16-bit."
            )
        depth = 16 if bit_depth is None else bit_depth
        peak = float(2**depth - 1)
        if low < 0 or high > peak:
            raise ValueError(
                f"{where}: {path} holds pixel values up to {high:g} (lowest {low:g}), outside the {depth}-bit "
                f"range 0..{peak:g}; pass the sensor's true bit depth (--bit-depth), or none for 16 bits."
            )
    return Image.fromarray(np.rint(array / peak * 255.0).astype(np.uint8), mode="L")


def load_rgb(path: Path, where: str, bit_depth: int | None = None) -> Image.Image:
    """Decode an image as RGB; grey-scale, palette, RGBA, CMYK and 16-bit images are converted.

    Args:
        bit_depth: significant bits of 16-bit images, ``None`` for the file's own (``NOTE [bit depth]``).
    """
    image = _to_8bit(*_decode(path, where), path, where, bit_depth)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_mask(path: Path, where: str) -> Image.Image:
    """Decode a mask as 0/255 grey-scale: any non-zero pixel (in any colour channel) is a defect.

    This is MVTec AD's convention, and it holds for 0/1, 0/255 and 16-bit masks and for label images
    whose classes are numbered 1, 2, ...; an alpha channel is ignored.
    """
    image, _ = _decode(path, where)
    array = np.asarray(image)
    if array.ndim == 3:
        colour = [i for i, band in enumerate(image.getbands()) if band != "A"]
        array = array[..., colour].any(axis=2)
    return Image.fromarray(np.where(array != 0, 255, 0).astype(np.uint8), mode="L")


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
        bit_depth: significant bits of 16-bit images (8..16), ``None`` for the files' own depth
            (``NOTE [bit depth]``).
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
        bit_depth: int | None = None,
    ) -> None:
        self.name = name
        self.bit_depth = check_bit_depth(bit_depth, name)
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
        image = load_rgb(sample.image, self.name, self.bit_depth)
        mask_image = None
        if sample.mask is not None:
            mask_image = load_mask(sample.mask, self.name)
            if mask_image.size != image.size:
                raise ValueError(self._size_message(sample, image.size, mask_image.size))
            if sample.label == 1 and mask_image.getbbox() is None:
                warnings.warn(
                    f"{self.name}: mask {sample.mask} of defect image {sample.image} is empty (no non-zero pixel), "
                    f"so its pixel metrics compare against nothing; mark the defect in the mask, or move the image "
                    f"to the good images.",
                    stacklevel=2,
                )
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
