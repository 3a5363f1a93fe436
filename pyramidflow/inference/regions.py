"""From a binary mask to its defect regions: connected components (8-connectivity, as the metrics use)
with a bounding box, an area and a peak score each."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..metrics import EIGHT_CONNECTED

__all__ = ["find_regions"]


def find_regions(mask: np.ndarray, anomaly_map: np.ndarray) -> list[dict]:
    """Connected regions of a binary ``(H, W)`` mask, largest peak first.

    Each region is ``{"bbox": [x0, y0, x1, y1], "area": pixels, "peak": highest map value}``, the box
    in pixel coordinates with exclusive ends (``image[y0:y1, x0:x1]`` crops it).

    Example:
        >>> mask = np.zeros((6, 6), bool); mask[1:3, 1:4] = True; mask[5, 5] = True
        >>> values = np.arange(36.0).reshape(6, 6)
        >>> find_regions(mask, values)
        [{'bbox': [5, 5, 6, 6], 'area': 1, 'peak': 35.0}, {'bbox': [1, 1, 4, 3], 'area': 6, 'peak': 15.0}]
    """
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    peaks = ndimage.maximum(np.asarray(anomaly_map, dtype=np.float64), labels, index)
    regions = []
    for box, area, peak in zip(ndimage.find_objects(labels), areas, peaks):
        rows, cols = box
        regions.append({"bbox": [int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)],
                        "area": int(area), "peak": float(peak)})
    return sorted(regions, key=lambda region: -region["peak"])
