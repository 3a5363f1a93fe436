"""A generic layout: a folder of images, with an optional folder of masks matched by file stem.

For training, a folder of good images. For testing, a folder of images and, optionally, a folder of
masks: an image with a mask named ``<stem>.*`` or ``<stem>_mask.*`` is a defect (label 1), one without
is good (label 0); with no mask folder at all the labels are unknown (-1) and the masks all zero.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyramidflow.data._io import (
    IMAGE_EXTENSIONS,
    UNKNOWN_LABEL,
    AnomalyDataset,
    Sample,
    check_split,
    list_images,
    warn_unmatched,
)

__all__ = ["FolderDataset"]


def _mask_key(path: Path) -> str:
    return path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem


class FolderDataset(AnomalyDataset):
    """Images of one folder (one split); items as :class:`pyramidflow.data.MVTecDataset`.

    Args:
        image_dir: the folder of images (good images for ``split="train"``).
        split: ``"train"`` or ``"test"``.
        mask_dir: only for ``split="test"``: folder of masks matched to images by stem (``<stem>.*`` or
            ``<stem>_mask.*``). Images without a mask are good; without ``mask_dir`` labels are -1 (unknown).
        size: output size, an int or ``(height, width)``; default 256.
        texture: treat the images as a texture (train-split augmentation); default ``False``.
        augment: ``None`` follows ``texture`` on the train split; ``True``/``False`` force it.
        generator: torch generator for the augmentation (``None``: torch's global generator).
        verify: open every file header now, so bad files fail at construction (default ``True``).
        bit_depth: significant bits of 16-bit images (8..16); ``None`` (default) reads each file at its own
            depth (see ``NOTE [bit depth]`` in :mod:`pyramidflow.data._io`).

    Raises:
        FileNotFoundError: a missing or empty image folder, a missing mask folder.
        ValueError: a bad split, ``mask_dir`` with ``split="train"``, a file that is not an image, a mask of
            the wrong size.

    Example:
        >>> import tempfile
        >>> from pyramidflow.data import synthetic
        >>> root = synthetic.generate(tempfile.mkdtemp(), size=64, categories=("nut",), num_train=2, num_test=1)
        >>> test = FolderDataset(root / "nut/test/spot", split="test", mask_dir=root / "nut/ground_truth/spot")
        >>> test.labels
        [1]
    """

    def __init__(
        self,
        image_dir: str | Path,
        *,
        split: str = "train",
        mask_dir: str | Path | None = None,
        size: int | tuple[int, int] = 256,
        texture: bool = False,
        augment: bool | None = None,
        generator: torch.Generator | None = None,
        verify: bool = True,
        bit_depth: int | None = None,
    ) -> None:
        image_dir = Path(image_dir)
        where = f"FolderDataset({image_dir.name}, {split})"
        check_split(split, where)
        images = list_images(image_dir, where, "pass a folder that holds the images (.png, .bmp, .jpg, .tif).")
        if split == "train":
            if mask_dir is not None:
                raise ValueError(
                    f"{where}: mask_dir={str(mask_dir)!r} was given for the train split, whose images are all good; "
                    f"pass mask_dir only with split='test'."
                )
            samples = [Sample(p, None, 0, "good") for p in images]
        elif mask_dir is None:
            samples = [Sample(p, None, UNKNOWN_LABEL, "") for p in images]
        else:
            mask_dir = Path(mask_dir)
            if not mask_dir.is_dir():
                raise FileNotFoundError(
                    f"{where}: mask folder {mask_dir} does not exist; pass an existing folder or mask_dir=None."
                )
            masks = {}
            for path in sorted(mask_dir.iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    masks.setdefault(_mask_key(path), path)
            samples = []
            for path in images:
                mask = masks.pop(path.stem, None)
                samples.append(Sample(path, mask, 0 if mask is None else 1, "good" if mask is None else "defect"))
            warn_unmatched(sorted(masks.values()), image_dir, where)
        super().__init__(
            samples,
            name=where,
            split=split,
            size=size,
            texture=texture,
            augment=augment,
            generator=generator,
            verify=verify,
            bit_depth=bit_depth,
        )
