"""The curves behind the AUROC and AUPRO figures, read off the metrics' own pass over the pixels.

:func:`pixel_curves` takes the ROC and PRO points from :mod:`pyramidflow.metrics`' ranked pixels
(``NOTE [AUPRO definition]``), so the plotted curves are the ones the figures integrate
(:func:`ranked_curves` from the ranking the metrics were computed from); the image ROC
comes from scikit-learn, as :func:`pyramidflow.metrics.image_auroc` does. :func:`thin` keeps a few
thousand points of a curve of millions for a plot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve

from ..metrics import _maps_and_masks, _RankedPixels

__all__ = ["PixelCurves", "pixel_curves", "ranked_curves", "image_roc", "thin"]


@dataclass
class PixelCurves:
    """Pixel ROC and PRO curves, one point per distinct score (highest first), from ``(0, 0)``.

    Attributes:
        fpr: ``(K,)`` false-positive rate over all good pixels.
        tpr: ``(K,)`` share of defect pixels above the threshold.
        pro: ``(K,)`` mean share of each ground-truth region above the threshold.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    pro: np.ndarray


def pixel_curves(maps: np.ndarray, masks: np.ndarray) -> PixelCurves:
    """The pixel ROC and PRO curves of ``(N, H, W)`` maps against their ground-truth masks.

    Raises:
        ValueError: as :func:`pyramidflow.metrics.compute_metrics` (no defect or no good pixel, NaN maps).
    """
    maps, defects = _maps_and_masks(maps, masks, "pixel_curves")
    return ranked_curves(_RankedPixels(maps, defects, with_regions=True, where="pixel_curves"))


def ranked_curves(ranked: _RankedPixels) -> PixelCurves:
    """The curves of pixels :mod:`pyramidflow.metrics` ranked already (``_metrics_and_ranking``), sorting nothing."""
    start = np.zeros(1)
    return PixelCurves(
        fpr=np.clip(np.concatenate((start, ranked.fp / ranked.num_good)), 0.0, 1.0),
        tpr=np.concatenate((start, ranked.tp / ranked.num_defect)),
        pro=np.concatenate((start, ranked.pro)),
    )


def image_roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the image scores (label 1: defective)."""
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(np.int64), np.asarray(scores, dtype=np.float64))
    return fpr, tpr


def thin(x: np.ndarray, y: np.ndarray, resolution: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """The points of a monotone curve that move it by at least ``resolution`` along either axis.

    A curve with one point per distinct pixel score has up to one point per pixel; drawn, the points
    closer than a line's width are the same picture. The first and last points are kept.

    Example:
        >>> x = np.linspace(0, 1, 100001); thin(x, x)[0].size
        1001
    """
    if np.shape(x) != np.shape(y):
        raise ValueError(f"thin: a curve's x and y must have the same shape, got {np.shape(x)} and {np.shape(y)}.")
    # Each axis on its own: one (N, 2) array of cells compared row by row took 14 times as long.
    cell_x, cell_y = np.floor(x / resolution), np.floor(y / resolution)
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = (cell_x[1:] != cell_x[:-1]) | (cell_y[1:] != cell_y[:-1])
    keep[-1] = True
    return x[keep], y[keep]
