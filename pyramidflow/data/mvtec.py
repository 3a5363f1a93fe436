"""The MVTec AD data set layout (also written by :mod:`pyramidflow.data.synthetic`).

Layout: ``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect_type>/*.png`` and
``<root>/<category>/ground_truth/<defect_type>/<name>_mask.png``; the ``good`` test images have no mask.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyramidflow.data import synthetic
from pyramidflow.data._io import AnomalyDataset, Sample, check_split, find_by_stem, list_images

__all__ = ["MVTEC_CATEGORIES", "MVTEC_TEXTURES", "MVTecDataset", "is_texture_category"]

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_OBJECTS = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)
MVTEC_CATEGORIES = MVTEC_TEXTURES + MVTEC_OBJECTS


def is_texture_category(category: str) -> bool:
    """Whether a category of MVTec AD or of the synthetic set is a texture (augmented in training)."""
    return category in MVTEC_TEXTURES or synthetic.is_texture(category)


def resolve_category_dir(root: str | Path, category: str, known: tuple[str, ...], where: str) -> Path:
    """``root / category``, with a clear error when the root or the category is missing or unknown.

    Raises:
        FileNotFoundError: the root folder, or the folder of a known category, does not exist.
        ValueError: the category is neither known nor a folder under root.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{where}: data root {root} does not exist; pass the folder that holds the categories.")
    if not isinstance(category, str) or not category:
        raise ValueError(f"{where}: category must be a non-empty string, got {category!r}.")
    folder = root / category
    if folder.is_dir():
        return folder
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    if category in known:
        raise FileNotFoundError(
            f"{where}: category folder {folder} does not exist (folders under {root}: {present}); "
            f"put the '{category}' data there or pass the right root."
        )
    raise ValueError(
        f"{where}: unknown category {category!r}: no folder {folder} (folders under {root}: {present}; "
        f"known categories: {list(known)}); check the spelling."
    )


class MVTecDataset(AnomalyDataset):
    """One category of MVTec AD (or of the synthetic set), one split.

    Items are dicts (see :class:`pyramidflow.data.AnomalyDataset`): ``image`` ``(3, H, W)``
    ImageNet-normalised, ``mask`` ``(1, H, W)`` in {0, 1}, ``label`` (0 good, 1 defect), ``path``,
    ``defect_type``.

    Args:
        root: the folder holding the category folders.
        category: e.g. ``"carpet"`` or, on a synthetic set, ``"fabric"``; any folder under ``root`` works.
        split: ``"train"`` (good images only) or ``"test"``.
        size: output size, an int or ``(height, width)``; default 256.
        texture: whether to treat the category as a texture; default: MVTec textures (carpet, grid,
            leather, tile, wood) and the synthetic textures.
        augment: ``None`` augments textures on the train split (random flips and 90-degree rotations);
            ``True``/``False`` force it.
        generator: torch generator for the augmentation (``None``: torch's global generator).
        verify: open every file header now, so bad files fail at construction (default ``True``).
        bit_depth: significant bits of 16-bit images (8..16); ``None`` (default) reads each file at its own
            depth (see ``NOTE [bit depth]`` in :mod:`pyramidflow.data._io`).

    Raises:
        FileNotFoundError: a missing root, category, split folder or mask; an empty folder.
        ValueError: an unknown category or split, a file that is not an image, a mask of the wrong size.

    Example:
        >>> import tempfile
        >>> root = synthetic.generate(tempfile.mkdtemp(), size=64, categories=("nut",), num_train=2, num_test=1)
        >>> test = MVTecDataset(root, "nut", split="test", size=64)
        >>> len(test), test[1]["image"].shape, test[1]["mask"].shape
        (6, torch.Size([3, 64, 64]), torch.Size([1, 64, 64]))
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        *,
        split: str = "train",
        size: int | tuple[int, int] = 256,
        texture: bool | None = None,
        augment: bool | None = None,
        generator: torch.Generator | None = None,
        verify: bool = True,
        bit_depth: int | None = None,
    ) -> None:
        where = f"MVTecDataset({category}, {split})"
        check_split(split, where)
        folder = resolve_category_dir(root, category, MVTEC_CATEGORIES + synthetic.CATEGORIES, where)
        self.root = Path(root)
        self.category = category
        samples = self._train(folder, where) if split == "train" else self._test(folder, where)
        super().__init__(
            samples,
            name=where,
            split=split,
            size=size,
            texture=is_texture_category(category) if texture is None else texture,
            augment=augment,
            generator=generator,
            verify=verify,
            bit_depth=bit_depth,
        )

    @staticmethod
    def _train(folder: Path, where: str) -> list[Sample]:
        fix = "the MVTec layout puts the good training images in <root>/<category>/train/good/."
        return [Sample(path, None, 0, "good") for path in list_images(folder / "train" / "good", where, fix)]

    @staticmethod
    def _test(folder: Path, where: str) -> list[Sample]:
        test = folder / "test"
        fix = "the MVTec layout puts test images in <root>/<category>/test/<defect_type>/ (good/ for normal ones)."
        if not test.is_dir():
            raise FileNotFoundError(f"{where}: folder {test} does not exist; {fix}")
        kinds = sorted(p.name for p in test.iterdir() if p.is_dir())
        if not kinds:
            raise FileNotFoundError(f"{where}: folder {test} has no defect-type subfolders; {fix}")
        samples = []
        for kind in kinds:
            for path in list_images(test / kind, where, fix):
                if kind == "good":
                    samples.append(Sample(path, None, 0, kind))
                    continue
                masks = folder / "ground_truth" / kind
                mask = find_by_stem(masks, (f"{path.stem}_mask", path.stem))
                if mask is None:
                    raise FileNotFoundError(
                        f"{where}: no mask for test image {path}: expected {masks / (path.stem + '_mask.png')}; "
                        f"add the mask or move the image to test/good/ if it has no defect."
                    )
                samples.append(Sample(path, mask, 1, kind))
        return samples
