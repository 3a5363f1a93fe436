"""Image and mask transforms of the data sets: resize, ImageNet normalisation, texture augmentation.

Images are resized bilinearly and masks with nearest neighbour (so they stay binary), both in Pillow,
then turned into float tensors. Textures are augmented with a random element of the symmetry group of
the square (horizontal flip, vertical flip, 90-degree rotation), drawn from a torch generator so that a
run is reproducible; objects are never augmented (the template assumes pixel alignment).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize_size",
    "image_to_tensor",
    "mask_to_tensor",
    "random_flip_rotate",
    "denormalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_size(size: int | tuple[int, int], where: str = "size") -> tuple[int, int]:
    """Return ``size`` as ``(height, width)``, checking that both are positive integers.

    Args:
        size: one int for a square, or ``(height, width)``.
        where: the name shown in the error message.

    Raises:
        ValueError: a non-positive or non-integer size.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        height = width = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size
    ):
        height, width = int(size[0]), int(size[1])
    else:
        raise ValueError(f"{where}: expected an int or a (height, width) pair of ints, got {size!r}.")
    if height < 1 or width < 1:
        raise ValueError(f"{where}: height and width must be positive, got {(height, width)}.")
    return height, width


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize an RGB image bilinearly and normalise it with the ImageNet mean and std.

    Args:
        image: a Pillow image in mode ``RGB``.
        size: target ``(height, width)``.

    Returns:
        A float32 tensor of shape ``(3, height, width)``.
    """
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    array = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def mask_to_tensor(mask: Image.Image | None, size: tuple[int, int]) -> torch.Tensor:
    """Resize a mask with nearest neighbour and binarise it to {0, 1}: any non-zero pixel is a defect.

    That is MVTec AD's convention; it holds for masks stored as 0/255 or 0/1 and for label images.

    Args:
        mask: a Pillow image in mode ``L``, or ``None`` for an all-good mask.
        size: target ``(height, width)``.

    Returns:
        A float32 tensor of shape ``(1, height, width)`` with values 0 and 1.
    """
    height, width = size
    if mask is None:
        return torch.zeros(1, height, width, dtype=torch.float32)
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(mask) != 0).astype(np.float32))[None]


def random_flip_rotate(
    image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the same random horizontal flip, vertical flip and 90-degree rotation to image and mask.

    Each flip has probability 1/2; the rotation is a multiple of 90 degrees drawn uniformly (only 0 or
    180 degrees for non-square images, so the shape is kept).

    Args:
        image: ``(C, H, W)`` tensor.
        mask: ``(1, H, W)`` tensor.
        generator: the torch generator to draw from; ``None`` uses torch's global generator (seeded by
            ``torch.manual_seed`` and, inside ``DataLoader`` workers, by the loader's per-worker seeds).

    Returns:
        The transformed ``(image, mask)``.
    """
    draws = torch.randint(0, 4, (3,), generator=generator).tolist()
    hflip, vflip = draws[0] % 2 == 1, draws[1] % 2 == 1
    quarter_turns = draws[2]
    if image.shape[-1] != image.shape[-2]:
        quarter_turns = 2 * (quarter_turns % 2)
    dims: list[int] = []
    if hflip:
        dims.append(-1)
    if vflip:
        dims.append(-2)
    if dims:
        image, mask = image.flip(dims), mask.flip(dims)
    if quarter_turns:
        image = torch.rot90(image, quarter_turns, dims=(-2, -1))
        mask = torch.rot90(mask, quarter_turns, dims=(-2, -1))
    return image.contiguous(), mask.contiguous()


def denormalize(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Undo the ImageNet normalisation and return uint8 pixels for display or overlays.

    Args:
        image: a normalised image ``(3, H, W)`` or a batch ``(N, 3, H, W)`` (tensor or array).

    Returns:
        ``uint8`` array of shape ``(H, W, 3)`` or ``(N, H, W, 3)``.

    Raises:
        ValueError: the channel dimension is not 3.

    Example:
        >>> from PIL import Image
        >>> x = image_to_tensor(Image.new("RGB", (4, 4), (10, 20, 30)), (4, 4))
        >>> denormalize(x)[0, 0].tolist()
        [10, 20, 30]
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(image, dtype=np.float32)
    if array.ndim not in (3, 4) or array.shape[-3] != 3:
        raise ValueError(
            f"denormalize: expected a (3, H, W) or (N, 3, H, W) image, got shape {tuple(array.shape)}."
        )
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    pixels = np.clip(np.rint((array * std + mean) * 255.0), 0, 255).astype(np.uint8)
    return np.moveaxis(pixels, -3, -1)
