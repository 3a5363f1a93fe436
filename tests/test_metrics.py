"""Metrics: hand-built cases with known answers, and agreement with slow, independent references."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pyramidflow.metrics import aupro, compute_metrics, image_auroc, pixel_auroc

# ----------------------------------------------------------------------------------------------------
# Slow references, written independently of pyramidflow.metrics (no sorting tricks, no scipy).


def _slow_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count one half)."""
    pos = scores[labels.astype(bool)].astype(np.float64)
    neg = scores[~labels.astype(bool)].astype(np.float64)
    wins = 0.0
    for p in pos:
        wins += np.count_nonzero(neg < p) + 0.5 * np.count_nonzero(neg == p)
    return wins / (pos.size * neg.size)


def _regions_by_flood_fill(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions of one boolean mask, found with a breadth-first flood fill."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    height, width = mask.shape
    for r in range(height):
        for c in range(width):
            if not mask[r, c] or seen[r, c]:
                continue
            queue, pixels = deque([(r, c)]), []
            seen[r, c] = True
            while queue:
                y, x = queue.popleft()
                pixels.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            regions.append(pixels)
    return regions


def _slow_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """AUPRO with an explicit loop over every distinct threshold and a Python loop over regions."""
    masks = masks.astype(bool)
    regions = []  # (image index, list of pixels)
    for i in range(masks.shape[0]):
        regions += [(i, pixels) for pixels in _regions_by_flood_fill(masks[i])]
    good_scores = maps[~masks]
    curve = [(0.0, 0.0)]
    for t in sorted(set(maps.reshape(-1).tolist()), reverse=True):
        fpr = np.count_nonzero(good_scores >= t) / good_scores.size
        overlaps = []
        for i, pixels in regions:
            hit = sum(1 for (y, x) in pixels if maps[i, y, x] >= t)
            overlaps.append(hit / len(pixels))
        curve.append((fpr, sum(overlaps) / len(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_at_limit) / 2
            break
        else:
            break
    return area / limit


def _random_case(seed: int, n: int = 4, h: int = 11, w: int = 13, levels: int | None = None):
    """Random maps that are higher, on average, on random blob masks; quantised to force ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n - 1):  # the last image stays good
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            masks[i, max(0, y - rng.integers(0, 3)) : y + rng.integers(1, 3), max(0, x - 1) : x + rng.integers(1, 3)] = True
    maps = rng.random((n, h, w)) + 0.7 * masks
    if levels is not None:
        maps = np.floor(maps * levels) / levels
    return maps, masks


# ----------------------------------------------------------------------------------------------------
# Known answers.


def test_perfect_maps_score_one():
    maps, masks = _random_case(0)
    perfect = masks.astype(np.float64) + 0.01 * np.random.default_rng(1).random(masks.shape)
    assert pixel_auroc(perfect, masks) == 1.0
    assert aupro(perfect, masks) == 1.0
    assert image_auroc([0.1, 0.9, 0.8, 0.05], [0, 1, 1, 0]) == 1.0


def test_inverted_maps_score_zero():
    _, masks = _random_case(2)
    inverted = 1.0 - masks.astype(np.float64)
    assert pixel_auroc(inverted, masks) == 0.0
    assert aupro(inverted, masks) == 0.0
    assert image_auroc([0.9, 0.1, 0.2, 0.95], [0, 1, 1, 0]) == 0.0


def _hand_case():
    # notation: region A = two pixels in the top row, region B = one pixel; 9 good pixels.
    masks = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=bool)[None]
    maps = np.array([[0.9, 0.5, 0.0, 0.1], [0.2, 0.8, 0.6, 0.3], [0.05, 0.15, 0.25, 0.7]])[None]
    return maps, masks


def test_aupro_by_hand():
    # Thresholds from the top: 0.9 (A: PRO 1/4), 0.8 (good: FPR 1/9), 0.7 (B: PRO 3/4), 0.6 (good:
    # FPR 2/9), 0.5 (A: PRO 1), then only good pixels. Area up to 0.3:
    # 1/4 * 1/9 + 3/4 * 1/9 + 1 * (0.3 - 2/9) = 0.3 - 1/9, divided by 0.3 -> 17/27.
    maps, masks = _hand_case()
    assert aupro(maps, masks) == pytest.approx(17 / 27, abs=1e-12)
    # With the whole FPR range: 1/36 + 3/36 + 7/9 = 8/9, the pixel AUROC of the same case
    # (pairs: 0.9 beats 9 good pixels, 0.7 beats 8, 0.5 beats 7 -> 24/27).
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(8 / 9, abs=1e-12)
    assert pixel_auroc(maps, masks) == pytest.approx(8 / 9, abs=1e-12)


def test_aupro_uses_eight_connectivity():
    # Two pixels in a row plus one touching them only diagonally: one region of 3 pixels (not 2 + 1).
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 1, 1] = masks[0, 1, 2] = masks[0, 2, 3] = True
    maps = np.full((1, 5, 5), 0.5)
    maps[0, 2, 3] = 1.0  # only the diagonal pixel is found before the good pixels
    maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    assert aupro(maps, masks) == pytest.approx(1 / 3, abs=1e-12)  # 4-connectivity would give 1/2


def test_aupro_interpolates_exactly_at_the_limit():
    # One defect pixel ranked first, then all 14 good pixels in a tie with one more defect pixel of a
    # second region: the curve jumps diagonally from (0, 1/2) to (1, 1); at FPR 0.3 PRO is 0.65.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 3, 3] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    maps[0, 3, 3] = 0.5
    maps[0][~masks[0]] = 0.5
    assert aupro(maps, masks) == pytest.approx((0.5 + 0.65) / 2, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# Against the slow references.


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 6])
def test_aupro_matches_slow_reference(seed, levels):
    maps, masks = _random_case(seed, levels=levels)
    for limit in (0.3, 0.07, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(_slow_aupro(maps, masks, limit), abs=1e-10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 5])
def test_pixel_auroc_matches_pair_counting_and_sklearn(seed, levels):
    maps, masks = _random_case(seed + 10, levels=levels)
    expected = _slow_auroc(maps.reshape(-1), masks.reshape(-1))
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.reshape(-1), maps.reshape(-1)), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_image_auroc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(40) + 0.3 * labels, 1)  # rounded: ties
    assert image_auroc(scores, labels) == pytest.approx(_slow_auroc(scores, labels), abs=1e-12)


def test_aupro_never_above_one():
    # Many regions of sizes 1..7 (weights that do not add up exactly in floating point), perfect and
    # tied maps, float32 and float64.
    masks = np.zeros((3, 40, 40), dtype=bool)
    for k in range(60):
        i, y, x = k % 3, 3 * (k % 13), 3 * (k // 13) * 2 % 40
        masks[i, y, x : x + 1 + k % 7] = True
    for maps in (masks * 1.0, masks * 1.0 + 1e-7, np.where(masks, 0.7, 0.7)):
        for dtype in (np.float32, np.float64):
            for limit in (0.3, 1.0, 1e-6):
                value = aupro(maps.astype(dtype), masks, fpr_limit=limit)
                assert 0.0 <= value <= 1.0
    assert aupro(masks * 1.0, masks) == 1.0
    for seed in range(20):
        maps, m = _random_case(seed, levels=3)
        assert 0.0 <= aupro(maps, m) <= 1.0


def test_accepts_tensors_lists_and_channel_dim():
    maps, masks = _random_case(3)
    expected = compute_metrics(maps, masks)
    as_tensor = compute_metrics(torch.from_numpy(maps)[:, None].float(), torch.from_numpy(masks)[:, None].float())
    as_lists = compute_metrics(list(maps), [m.astype(np.uint8) * 255 for m in masks])
    for got in (as_tensor, as_lists):
        assert got.keys() == {"pixel_auroc", "image_auroc", "aupro"}
        for key in got:
            assert isinstance(got[key], float)
            assert got[key] == pytest.approx(expected[key], abs=1e-6)


def test_compute_metrics_matches_single_metrics():
    maps, masks = _random_case(4)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    got = compute_metrics(maps, masks, scores, labels)
    assert got["pixel_auroc"] == pixel_auroc(maps, masks)
    assert got["aupro"] == aupro(maps, masks)
    assert got["image_auroc"] == image_auroc(scores, labels)
    assert compute_metrics(maps, masks) == got  # default scores = map maxima, labels from masks


def test_random_maps_give_chance_values_at_full_size():
    # A speed sanity check on 48 maps of 256x256 (no timing assertion): with scores independent of the
    # masks, PRO follows FPR, so AUPRO@0.3 is about 0.15 and the pixel AUROC about 0.5.
    rng = np.random.default_rng(0)
    masks = np.zeros((48, 256, 256), dtype=bool)
    yy, xx = np.mgrid[:256, :256]
    for i in range(40):
        for _ in range(3):
            cy, cx, r = rng.integers(20, 236, 2).tolist() + [int(rng.integers(4, 20))]
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps = rng.random(masks.shape, dtype=np.float32)
    got = compute_metrics(maps, masks)
    assert got["aupro"] == pytest.approx(0.15, abs=0.01)
    assert got["pixel_auroc"] == pytest.approx(0.5, abs=0.01)


# ----------------------------------------------------------------------------------------------------
# Errors.


def test_errors_are_clear():
    maps, masks = _random_case(5)
    with pytest.raises(ValueError, match=r"aupro: maps have shape \(4, 11, 13\) but masks have shape \(4, 11, 12\)"):
        aupro(maps, masks[..., :12])
    with pytest.raises(ValueError, match="no defect pixels"):
        pixel_auroc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no defect pixels"):
        aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no good pixels"):
        aupro(maps, np.ones_like(masks))
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        pixel_auroc(bad, masks)
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="needs both good and defective"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="got 3 scores but 2 labels"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"unknown labels \(-1\)"):
        image_auroc([0.1, 0.2, 0.3], [0, 1, -1])
    with pytest.raises(ValueError, match="different shapes"):
        pixel_auroc([np.zeros((4, 4)), np.zeros((4, 5))], [np.zeros((4, 4)), np.zeros((4, 5))])


# ----------------------------------------------------------------------------------------------------
# Decisions at a fixed threshold (NOTE [decision metrics]).


def test_image_decision_metrics_hand_built_and_against_sklearn():
    from sklearn.metrics import f1_score, precision_score, recall_score

    from pyramidflow.metrics import image_decision_metrics

    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.5, 0.8, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1, 0])
    m = image_decision_metrics(scores, labels, threshold=0.4)  # flagged: 0.5, 0.8, 0.9 (0.4 is not above)
    assert m == {"image_precision": 2 / 3, "image_recall": 2 / 3, "image_f1": 2 / 3, "image_fpr": 0.25}
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores, labels = rng.random(40), rng.integers(0, 2, 40)
        predicted = (scores > 0.6).astype(int)
        m = image_decision_metrics(scores, labels, 0.6)
        assert m["image_precision"] == pytest.approx(precision_score(labels, predicted, zero_division=0))
        assert m["image_recall"] == pytest.approx(recall_score(labels, predicted, zero_division=0))
        assert m["image_f1"] == pytest.approx(f1_score(labels, predicted, zero_division=0))
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        image_decision_metrics([1, 2, 3], [0, 1], 0.5)


def test_pixel_decision_metrics_hand_built_and_against_sklearn():
    from sklearn.metrics import f1_score, jaccard_score

    from pyramidflow.metrics import pixel_decision_metrics

    masks = np.zeros((2, 5, 5))
    masks[0, 1:3, 1:3] = 1  # 4 defect pixels
    maps = np.zeros((2, 5, 5))
    maps[0, 1:3, 1:2] = 1.0  # 2 found
    maps[1, 4, 4] = 1.0  # 1 false alarm on the other image
    m = pixel_decision_metrics(maps, masks, threshold=0.5)
    # tp 2, fp 1, fn 2: F1 4/7, IoU 2/5, precision 2/3, recall 1/2.
    assert m == pytest.approx({"pixel_f1": 4 / 7, "pixel_iou": 0.4, "pixel_precision": 2 / 3, "pixel_recall": 0.5})
    rng = np.random.default_rng(1)
    maps, masks = rng.random((3, 9, 11)), rng.random((3, 9, 11)) > 0.8
    m = pixel_decision_metrics(maps, masks, 0.7)
    assert m["pixel_f1"] == pytest.approx(f1_score(masks.ravel(), maps.ravel() > 0.7))
    assert m["pixel_iou"] == pytest.approx(jaccard_score(masks.ravel(), maps.ravel() > 0.7))
    assert pixel_decision_metrics(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)), 0.5)["pixel_iou"] == 1.0
