"""Pixel-threshold rules: where a defect mask's outline lies, set on held-out good images only.

``NOTE [pixel threshold rules]``: the false-positive rule (``"fpr"``, :func:`pyramidflow.calibration.pixel_threshold`)
bounds the share of good pixels above the threshold, which says nothing about a defect's outline: on
the demo its masks are several times the defects' area. The ``"synthetic"`` rule draws defects of
known extent into copies of the held-out good images (the synthetic data set's own defect drawing,
:func:`pyramidflow.data.synthetic.draw_defect`, with a shifted copy of another held-out image as
what a missing piece reveals, in the spirit of CutPaste), takes the anomaly maps of those copies and
keeps the threshold of the best pixel F1 on the drawn masks (:func:`pyramidflow.metrics.best_pixel_f1`).
It never goes below the false-positive threshold, so every mask is a subset of the false-positive
rule's mask and a good part's mask is empty at least as often. No test image or label is read.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["PIXEL_RULES", "DEFAULT_PIXEL_RULE", "check_pixel_rule", "paste_defects", "synthetic_threshold"]

PIXEL_RULES = ("synthetic", "fpr")
DEFAULT_PIXEL_RULE = "synthetic"
DEFECTS_PER_IMAGE = 10  # two of each of the five kinds: 40 drawn defects from the minimum 4 held-out images


def check_pixel_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`PIXEL_RULES`, else a ValueError naming them."""
    if rule not in PIXEL_RULES:
        raise ValueError(f"pixel_rule must be one of {', '.join(PIXEL_RULES)}, got {rule!r}; "
                         f"{DEFAULT_PIXEL_RULE!r} sets the threshold for the mask's outline, 'fpr' bounds false-positive pixels.")
    return rule


def paste_defects(images: np.ndarray, seed: int, per_image: int = DEFECTS_PER_IMAGE) -> tuple[np.ndarray, np.ndarray]:
    """Copies of good ``(N, H, W, 3)`` uint8 images with one drawn defect each, and their masks.

    Each image gets ``per_image`` copies, cycling through the synthetic defect kinds; a ``missing``
    piece shows a shifted copy of the next image (the image itself when there is one). Deterministic
    in ``seed``.

    Returns:
        ``(N * per_image, H, W, 3)`` uint8 images and ``(N * per_image, H, W)`` bool masks.
    """
    from pyramidflow.data.synthetic import DEFECT_TYPES, draw_defect

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[0] == 0:
        raise ValueError(f"paste_defects: give (N, H, W, 3) uint8 good images, got shape {images.shape} {images.dtype}.")
    rng = np.random.default_rng(seed)
    count, height, width = images.shape[:3]
    side = min(height, width)  # the drawing is square: a square window at a random place takes the defect
    out, masks = [], []
    for i in range(count):
        for k in range(per_image):
            kind = DEFECT_TYPES[k % len(DEFECT_TYPES)]
            image = images[i].astype(np.float64) / 255.0
            other = images[(i + 1) % count].astype(np.float64) / 255.0
            behind = np.roll(other, tuple(rng.integers(side // 8, side // 2, size=2)), axis=(0, 1))
            y, x = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
            window = (slice(y, y + side), slice(x, x + side))
            drawn, mask = draw_defect(rng, kind, image[window], behind[window])
            image[window] = drawn
            full = np.zeros((height, width), dtype=bool)
            full[window] = mask
            out.append(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))
            masks.append(full)
    return np.stack(out), np.stack(masks)


def synthetic_threshold(
    good_images: np.ndarray, maps_of: Callable[[np.ndarray], np.ndarray], floor: float, seed: int
) -> float:
    """The ``"synthetic"`` rule (``NOTE [pixel threshold rules]``): best-F1 threshold on drawn defects, at least ``floor``.

    Args:
        good_images: held-out good images ``(N, H, W, 3)`` uint8 at the model's resolution.
        maps_of: anomaly maps ``(M, H, W)`` of uint8 images ``(M, H, W, 3)``.
        floor: the false-positive rule's threshold on the same images.
        seed: seeds the drawing.
    """
    from pyramidflow.metrics import best_pixel_f1

    defective, masks = paste_defects(good_images, seed)
    best = best_pixel_f1(maps_of(defective), masks)
    return max(float(floor), best["threshold"])
