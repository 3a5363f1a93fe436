"""Defect regions from a binary mask: 8-connectivity, boxes with exclusive ends, areas and peaks."""

import numpy as np

from pyramidflow.inference.regions import find_regions


def test_regions_are_eight_connected_with_box_area_and_peak():
    mask = np.zeros((8, 10), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal: one region under 8-connectivity
    mask[5:7, 6:9] = True  # a 2x3 block
    values = np.zeros((8, 10))
    values[2, 2], values[6, 8], values[0, 0] = 5.0, 3.0, 9.0  # 9.0 lies outside every region
    regions = find_regions(mask, values)
    assert regions == [
        {"bbox": [1, 1, 4, 4], "area": 3, "peak": 5.0},
        {"bbox": [6, 5, 9, 7], "area": 6, "peak": 3.0},
    ]
    for region in regions:
        x0, y0, x1, y1 = region["bbox"]
        assert mask[y0:y1, x0:x1].sum() == region["area"]


def test_an_empty_mask_has_no_regions():
    assert find_regions(np.zeros((4, 4), bool), np.ones((4, 4))) == []
