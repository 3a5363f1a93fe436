"""Anomaly-detection metrics of the MVTec AD protocol: pixel AUROC, AUPRO up to an FPR limit, image AUROC.

All pixel metrics share one pass: the pixel scores of all maps are sorted once (descending), the
ground-truth masks are split into connected regions (8-connectivity, as in the MVTec AD evaluation
code), and every curve is read off cumulative sums over the sorted pixels at the *distinct* score
values, so ties are handled exactly and no loop runs over thresholds or images. Hundreds of 256x256
maps take a few seconds on one CPU core.

# NOTE [AUPRO definition]
For a threshold t, a pixel is predicted defective when its score is >= t. The false-positive rate is
the fraction of all good pixels (mask 0, over all images, including the good pixels of defective images)
predicted defective; the per-region overlap (PRO) is the mean, over all connected ground-truth regions of
all images, of the fraction of the region's pixels predicted defective. AUPRO is the area under PRO(FPR)
from FPR 0 up to ``fpr_limit`` (the curve is interpolated linearly exactly at the limit; trapezoid rule),
divided by ``fpr_limit``, so a perfect map scores 1. Both coordinates are clipped to [0, 1] so that
rounding can never push the result above 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = ["pixel_auroc", "image_auroc", "aupro", "compute_metrics", "image_decision_metrics", "pixel_decision_metrics",
           "mask_decision_metrics", "best_pixel_f1", "EIGHT_CONNECTED", "AUPRO_FPR_LIMIT"]

# The FPR up to which AUPRO integrates, as the MVTec AD protocol does.
AUPRO_FPR_LIMIT = 0.3

# 8-connectivity, as in the official MVTec AD evaluation: the regions of the metrics, of a predicted
# mask (pyramidflow.inference.regions) and of the mask rule (pyramidflow.pixel_threshold).
EIGHT_CONNECTED = np.ones((3, 3), dtype=np.int8)


def _to_numpy(x: Any, name: str, where: str) -> np.ndarray:
    """Turn a tensor, array or nested list into a numpy array (tensors are detached and moved to CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    elif isinstance(x, (list, tuple)):
        items = [_to_numpy(item, name, where) for item in x]
        shapes = {item.shape for item in items}
        if len(shapes) > 1:
            raise ValueError(
                f"{where}: the {name} have different shapes {sorted(shapes)}; "
                f"resize them to one size before computing metrics."
            )
        x = np.stack(items) if items else np.zeros((0,))
    return np.asarray(x)


def _maps_and_masks(maps: Any, masks: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate anomaly maps and masks and return them as ``(N, H, W)`` float and bool arrays."""
    maps = _to_numpy(maps, "maps", where)
    masks = _to_numpy(masks, "masks", where)
    # Accept (N, 1, H, W) as produced by a data loader or a model, and a single (H, W) map.
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.ndim == 2:
        maps = maps[None]
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim != 3:
        raise ValueError(
            f"{where}: maps must have shape (N, H, W) or (N, 1, H, W), got {tuple(maps.shape)}; "
            f"average the channels of a multi-channel map first."
        )
    if maps.shape != masks.shape:
        raise ValueError(
            f"{where}: maps have shape {tuple(maps.shape)} but masks have shape {tuple(masks.shape)}; "
            f"they must match (one mask per map, at the map's resolution)."
        )
    if maps.size == 0:
        raise ValueError(f"{where}: got no pixels (maps of shape {tuple(maps.shape)}); pass at least one map.")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)  # integer or bool scores: float64 keeps them exact
    elif maps.dtype == np.float16:
        maps = maps.astype(np.float32)
    if not np.isfinite(maps).all():
        bad = int(np.count_nonzero(~np.isfinite(maps)))
        raise ValueError(
            f"{where}: the maps contain {bad} NaN or infinite values; fix the model output "
            f"(or replace them with np.nan_to_num) before computing metrics."
        )
    return maps, masks > 0.5


class _RankedPixels:
    """All pixels sorted by score once, with cumulative counts at each distinct score.

    Attributes (one entry per distinct score, highest score first):
        fp: number of good pixels with score >= that value.
        tp: number of defect pixels with score >= that value.
        pro: mean over regions of the covered fraction of each region (only when regions were requested).
    """

    def __init__(self, maps: np.ndarray, defects: np.ndarray, *, with_regions: bool, where: str) -> None:
        self.num_good = int(defects.size - np.count_nonzero(defects))
        self.num_defect = int(np.count_nonzero(defects))
        if self.num_defect == 0:
            raise ValueError(
                f"{where}: the masks contain no defect pixels (all {defects.size} pixels are good); "
                f"pixel metrics need at least one defective image with a non-empty mask."
            )
        if self.num_good == 0:
            raise ValueError(
                f"{where}: the masks contain no good pixels (all {defects.size} pixels are defective); "
                f"pixel metrics need good pixels to measure false positives."
            )
        scores = maps.reshape(-1)
        order = np.argsort(scores)[::-1]  # descending; ties are grouped below, so stability is not needed
        sorted_scores = scores[order]
        # Index of the last pixel of every group of equal scores.
        ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1)

        if with_regions:
            region = self._label_regions(defects)
            region_sorted = region.reshape(-1)[order]
            del order
            is_good = region_sorted == 0
            sizes = np.bincount(region.reshape(-1))
            num_regions = sizes.size - 1
            # Weight of one pixel of region r in the PRO average: 1 / (|r| * number of regions).
            weight = np.zeros(sizes.size, dtype=np.float64)
            weight[1:] = 1.0 / (sizes[1:].astype(np.float64) * num_regions)
            pro = np.clip(np.cumsum(weight[region_sorted])[ends], 0.0, 1.0)
            self.num_regions = num_regions
        else:
            is_good = ~defects.reshape(-1)[order]
            del order
        good_cum = np.cumsum(is_good, dtype=np.int64)
        self.fp = good_cum[ends]
        self.tp = (ends + 1) - self.fp
        if with_regions:
            # The float sum of the weights misses 1 by rounding once every region is covered; make it exact.
            pro[self.tp == self.num_defect] = 1.0
            self.pro = pro

    @staticmethod
    def _label_regions(defects: np.ndarray) -> np.ndarray:
        """Connected regions of every mask with ids unique over all images (0 = good pixel)."""
        region = np.zeros(defects.shape, dtype=np.int64)
        offset = 0
        for i in range(defects.shape[0]):
            if not defects[i].any():
                continue
            labels, count = ndimage.label(defects[i], structure=EIGHT_CONNECTED)
            region[i] = np.where(labels > 0, labels + offset, 0)
            offset += count
        return region


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))


def _auroc_from_ranked(ranked: _RankedPixels) -> float:
    fpr = np.concatenate(([0.0], ranked.fp / ranked.num_good))
    tpr = np.concatenate(([0.0], ranked.tp / ranked.num_defect))
    return min(1.0, max(0.0, _trapezoid(fpr, tpr)))


def _aupro_from_ranked(ranked: _RankedPixels, fpr_limit: float) -> float:
    fpr = np.clip(np.concatenate(([0.0], ranked.fp / ranked.num_good)), 0.0, 1.0)
    pro = np.concatenate(([0.0], ranked.pro))
    # Points with fpr <= limit, then the curve interpolated exactly at the limit.
    keep = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:keep], pro[:keep]
    if keep < fpr.size:
        # fpr[keep] > limit >= fpr[keep - 1], so the denominator is positive.
        x0, x1, y0, y1 = fpr[keep - 1], fpr[keep], pro[keep - 1], pro[keep]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_limit)
    area = _trapezoid(x, y) / fpr_limit
    return min(1.0, max(0.0, area))


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}; the MVTec AD protocol uses 0.3.")
    return fpr_limit


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Area under the ROC curve over all pixels of all maps.

    Ties between scores are handled exactly (a tied positive/negative pair counts one half).

    Args:
        maps: anomaly maps, higher means more anomalous; ``(N, H, W)`` or ``(N, 1, H, W)``, numpy
            array, torch tensor or list of ``(H, W)`` arrays.
        masks: ground-truth masks of the same shape; values > 0.5 are defect pixels (so {0, 1},
            bool and {0, 255} masks all work).

    Returns:
        The pixel AUROC in [0, 1].

    Raises:
        ValueError: shapes differ, the maps contain NaN/inf, or the masks have no defect or no good pixel.

    Example:
        >>> import numpy as np
        >>> masks = np.zeros((1, 4, 4)); masks[0, :2, :2] = 1
        >>> pixel_auroc(masks * 2.0, masks)
        1.0
    """
    maps, defects = _maps_and_masks(maps, masks, "pixel_auroc")
    return _auroc_from_ranked(_RankedPixels(maps, defects, with_regions=False, where="pixel_auroc"))


def aupro(maps: Any, masks: Any, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap curve up to a false-positive rate (MVTec AD protocol).

    See ``NOTE [AUPRO definition]`` in this module. Regions are the 8-connected components of each
    mask; every region counts equally, whatever its size.

    Args:
        maps: anomaly maps ``(N, H, W)`` or ``(N, 1, H, W)``, higher means more anomalous.
        masks: ground-truth masks of the same shape; values > 0.5 are defect pixels.
        fpr_limit: upper end of the FPR integration range, in (0, 1]; default 0.3.

    Returns:
        AUPRO in [0, 1] (area divided by ``fpr_limit``).

    Raises:
        ValueError: shapes differ, NaN/inf in the maps, no defect or no good pixel, or a bad ``fpr_limit``.

    Example:
        >>> import numpy as np
        >>> masks = np.zeros((2, 8, 8)); masks[0, 2:4, 2:4] = 1
        >>> aupro(masks + 0.1, masks)
        1.0
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    maps, defects = _maps_and_masks(maps, masks, "aupro")
    return _aupro_from_ranked(_RankedPixels(maps, defects, with_regions=True, where="aupro"), fpr_limit)


def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of image-level scores.

    Args:
        scores: one anomaly score per image, shape ``(N,)``; higher means more anomalous.
        labels: 1 for a defective image, 0 for a good one, shape ``(N,)``.

    Returns:
        The image AUROC in [0, 1].

    Raises:
        ValueError: lengths differ, NaN/inf scores, labels other than 0/1, or only one class present.

    Example:
        >>> image_auroc([0.1, 0.9, 0.4], [0, 1, 0])
        1.0
    """
    scores = _to_numpy(scores, "scores", "image_auroc").reshape(-1).astype(np.float64)
    labels = _to_numpy(labels, "labels", "image_auroc").reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(
            f"image_auroc: got {scores.size} scores but {labels.size} labels; pass one score and one label per image."
        )
    if not np.isfinite(scores).all():
        raise ValueError("image_auroc: the scores contain NaN or infinite values; fix them before computing metrics.")
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise ValueError(
            f"image_auroc: labels must be 0 (good) or 1 (defect), got values {sorted(values)}; "
            f"drop images with unknown labels (-1) first."
        )
    if len(values) < 2:
        raise ValueError(
            f"image_auroc: all {labels.size} images have label {values.pop() if values else '-'}; "
            f"image AUROC needs both good and defective images."
        )
    return float(roc_auc_score(labels.astype(np.int64), scores))


def compute_metrics(
    maps: Any,
    masks: Any,
    scores: Any | None = None,
    labels: Any | None = None,
    *,
    fpr_limit: float = AUPRO_FPR_LIMIT,
) -> dict[str, float]:
    """Pixel AUROC, AUPRO and image AUROC in one call, sorting the pixels only once.

    Args:
        maps: anomaly maps ``(N, H, W)`` or ``(N, 1, H, W)``.
        masks: ground-truth masks of the same shape (values > 0.5 are defects).
        scores: image scores ``(N,)``; default: the maximum of each map (the method's image score).
        labels: image labels ``(N,)`` (0 good, 1 defect); default: 1 where the mask has a defect pixel.
        fpr_limit: FPR limit of AUPRO; default 0.3.

    Returns:
        ``{"pixel_auroc": float, "image_auroc": float, "aupro": float}``.

    Raises:
        ValueError: as :func:`pixel_auroc`, :func:`aupro` and :func:`image_auroc`.

    Example:
        >>> import numpy as np
        >>> masks = np.zeros((2, 8, 8)); masks[0, 2:4, 2:4] = 1
        >>> compute_metrics(masks + 0.1, masks)["aupro"]
        1.0
    """
    return _metrics_and_ranking(maps, masks, scores, labels, fpr_limit, "compute_metrics")[0]


def _metrics_and_ranking(maps: Any, masks: Any, scores: Any | None, labels: Any | None, fpr_limit: float,
                         where: str) -> tuple[dict[str, float], _RankedPixels]:
    """:func:`compute_metrics` and the ranked pixels it read them from.

    For a caller that draws the ROC and PRO curves too (:mod:`pyramidflow.inference.curves`): the
    pixels are sorted once, and the curves are the ones the figures integrate.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    maps, defects = _maps_and_masks(maps, masks, where)
    ranked = _RankedPixels(maps, defects, with_regions=True, where=where)
    if scores is None:
        scores = maps.reshape(maps.shape[0], -1).max(axis=1)
    if labels is None:
        labels = defects.reshape(defects.shape[0], -1).any(axis=1).astype(np.int64)
    metrics = {
        "pixel_auroc": _auroc_from_ranked(ranked),
        "image_auroc": image_auroc(scores, labels),
        "aupro": _aupro_from_ranked(ranked, fpr_limit),
    }
    return metrics, ranked


# NOTE [decision metrics]
# At a fixed threshold a score strictly above it is a positive (``is_anomalous``, a mask pixel). From
# the counts tp, fp, fn: precision tp / (tp + fp) and recall tp / (tp + fn), 0 when their denominator is
# 0; F1 2tp / (2tp + fp + fn) and IoU tp / (tp + fp + fn), 1 when nothing is to be found and nothing is
# found. The pixel counts are pooled over all images (one confusion matrix for the whole set).


def _ratio(num: int, den: int, empty: float) -> float:
    return float(num) / float(den) if den else empty


def image_decision_metrics(scores: Any, labels: Any, threshold: float) -> dict[str, float]:
    """Image-level precision, recall, F1 and false-positive rate at ``threshold`` (``NOTE [decision metrics]``).

    Args:
        scores: image scores ``(N,)``.
        labels: ``(N,)`` 0 good, 1 defect.
        threshold: an image is predicted anomalous when its score is above it.

    Returns:
        ``image_precision``, ``image_recall``, ``image_f1``, ``image_fpr`` (share of good images flagged).

    Example:
        >>> m = image_decision_metrics([0.1, 0.5, 0.9, 0.3], [0, 0, 1, 1], threshold=0.4)
        >>> m["image_precision"], m["image_recall"], m["image_fpr"]
        (0.5, 0.5, 0.5)
    """
    scores = _to_numpy(scores, "scores", "image_decision_metrics").reshape(-1).astype(np.float64)
    labels = _to_numpy(labels, "labels", "image_decision_metrics").reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(
            f"image_decision_metrics: {scores.size} scores but {labels.size} labels; give one label per image."
        )
    predicted, actual = scores > float(threshold), labels == 1
    tp, fp = int((predicted & actual).sum()), int((predicted & ~actual).sum())
    fn, tn = int((~predicted & actual).sum()), int((~predicted & ~actual).sum())
    return {
        "image_precision": _ratio(tp, tp + fp, 0.0),
        "image_recall": _ratio(tp, tp + fn, 0.0),
        "image_f1": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "image_fpr": _ratio(fp, fp + tn, 0.0),
    }


def pixel_decision_metrics(maps: Any, masks: Any, threshold: float) -> dict[str, float]:
    """Pixel-level F1, IoU, precision and recall of the masks ``maps > threshold`` (``NOTE [decision metrics]``).

    Args:
        maps: anomaly maps ``(N, H, W)`` or ``(N, 1, H, W)``.
        masks: ground truth of the same shape (values > 0.5 are defects).
        threshold: a pixel is predicted defective when its score is above it.

    Returns:
        ``pixel_f1``, ``pixel_iou``, ``pixel_precision``, ``pixel_recall``, over all pixels of all images.

    Example:
        >>> masks = np.zeros((1, 4, 4)); masks[0, :2, :2] = 1
        >>> maps = np.zeros((1, 4, 4)); maps[0, :2, :1] = 1; maps[0, 3, 3] = 1
        >>> m = pixel_decision_metrics(maps, masks, threshold=0.5)
        >>> m["pixel_iou"], m["pixel_f1"]
        (0.4, 0.5714285714285714)
    """
    maps, defects = _maps_and_masks(maps, masks, "pixel_decision_metrics")
    return mask_decision_metrics(maps > float(threshold), defects)


def mask_decision_metrics(predicted: Any, masks: Any) -> dict[str, float]:
    """Pixel-level F1, IoU, precision and recall of predicted binary masks (``NOTE [decision metrics]``).

    Args:
        predicted: predicted masks ``(N, H, W)`` (true: defect), e.g. from a :class:`pyramidflow.pixel_threshold.MaskRule`.
        masks: ground truth of the same shape (values > 0.5 are defects).

    Example:
        >>> truth = np.zeros((1, 2, 2)); truth[0, 0] = 1
        >>> mask_decision_metrics(truth > 0, truth)["pixel_f1"]
        1.0
    """
    predicted, defects = _maps_and_masks(predicted, masks, "mask_decision_metrics")
    predicted = predicted > 0.5
    tp = int((predicted & defects).sum())
    fp = int((predicted & ~defects).sum())
    fn = int((~predicted & defects).sum())
    return {
        "pixel_f1": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "pixel_iou": _ratio(tp, tp + fp + fn, 1.0),
        "pixel_precision": _ratio(tp, tp + fp, 0.0),
        "pixel_recall": _ratio(tp, tp + fn, 0.0),
    }


def best_pixel_f1(maps: Any, masks: Any) -> dict[str, float]:
    """The highest pixel F1 over all thresholds, and a threshold that reaches it.

    It reads the labels, so it is a diagnosis (how far a calibrated threshold is from the best the maps
    allow) or, on masks one drew oneself, a calibration target; never a threshold for test data. The
    threshold returned is midway between the lowest score kept and the next lower one, so that
    ``maps > threshold`` is exactly the best mask (``NOTE [decision metrics]``).

    Returns:
        ``{"pixel_f1": best F1, "threshold": t}``.

    Example:
        >>> masks = np.zeros((1, 4, 4)); masks[0, :2, :2] = 1
        >>> maps = np.full((1, 4, 4), 0.1); maps[0, :2, :2] = 0.8; maps[0, 3, 3] = 0.5
        >>> best_pixel_f1(maps, masks)
        {'pixel_f1': 1.0, 'threshold': 0.65}
    """
    maps, defects = _maps_and_masks(maps, masks, "best_pixel_f1")
    ranked = _RankedPixels(maps, defects, with_regions=False, where="best_pixel_f1")
    f1 = 2.0 * ranked.tp / (ranked.tp + ranked.fp + ranked.num_defect)
    best = int(np.argmax(f1))
    distinct = np.unique(maps)[::-1]  # the distinct scores, highest first, as ranked counts them
    lower = distinct[best + 1] if best + 1 < distinct.size else np.nextafter(distinct[best], -np.inf)
    return {"pixel_f1": float(f1[best]), "threshold": float(0.5 * (distinct[best] + lower))}
