"""The BTAD (beanTech Anomaly Detection) data set layout.

Layout: ``<root>/<class>/train/ok/*``, ``<root>/<class>/test/ok/*``, ``<root>/<class>/test/ko/*`` and
``<root>/<class>/ground_truth/ko/<stem>.png`` (or ``.bmp``; ``<stem>_mask.*`` is accepted too). Classes
are ``01``, ``02`` and ``03``; images are ``.bmp`` or ``.png``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyramidflow.data._io import AnomalyDataset, Sample, check_split, find_by_stem, list_images
from pyramidflow.data.mvtec import resolve_category_dir

__all__ = ["BTAD_CATEGORIES", "BTADDataset"]

BTAD_CATEGORIES = ("01", "02", "03")


class BTADDataset(AnomalyDataset):
    """One class of BTAD, one split; items as :class:`pyramidflow.data.MVTecDataset`.

    Args:
        root: the folder holding the class folders ``01``, ``02``, ``03``.
        category: the class, e.g. ``"01"``.
        split: ``"train"`` (``train/ok``) or ``"test"`` (``test/ok`` label 0, ``test/ko`` label 1).
        size: output size, an int or ``(height, width)``; default 256.
        texture: treat the class as a texture (train-split augmentation); default ``False``.
        augment: ``None`` follows ``texture`` on the train split; ``True``/``False`` force it.
        generator: torch generator for the augmentation (``None``: torch's global generator).
        verify: open every file header now, so bad files fail at construction (default ``True``).
        bit_depth: significant bits of 16-bit images (8..16); ``None`` (default) reads each file at its own
            depth (see ``NOTE [bit depth]`` in :mod:`pyramidflow.data._io`).

    Raises:
        FileNotFoundError: a missing root, class, split folder or mask; an empty folder.
        ValueError: an unknown class or split, a file that is not an image, a mask of the wrong size.
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        *,
        split: str = "train",
        size: int | tuple[int, int] = 256,
        texture: bool = False,
        augment: bool | None = None,
        generator: torch.Generator | None = None,
        verify: bool = True,
        bit_depth: int | None = None,
    ) -> None:
        where = f"BTADDataset({category}, {split})"
        check_split(split, where)
        folder = resolve_category_dir(root, category, BTAD_CATEGORIES, where)
        self.root = Path(root)
        self.category = category
        fix = "the BTAD layout is <root>/<class>/train/ok/, test/ok/, test/ko/ and ground_truth/ko/."
        if split == "train":
            samples = [Sample(p, None, 0, "ok") for p in list_images(folder / "train" / "ok", where, fix)]
        else:
            samples = [Sample(p, None, 0, "ok") for p in list_images(folder / "test" / "ok", where, fix)]
            masks = folder / "ground_truth" / "ko"
            for path in list_images(folder / "test" / "ko", where, fix):
                mask = find_by_stem(masks, (path.stem, f"{path.stem}_mask"))
                if mask is None:
                    raise FileNotFoundError(
                        f"{where}: no mask for test image {path}: expected {masks / path.stem}.png (or .bmp); "
                        f"add the mask or move the image to test/ok/ if it has no defect."
                    )
                samples.append(Sample(path, mask, 1, "ko"))
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
