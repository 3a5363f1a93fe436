"""Pixel-threshold rules: where a defect mask's outline lies, set on held-out good images only.

Which rules there are, how the synthetic one is set, and why: NOTE [pixel threshold rules].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from pyramidflow.metrics import EIGHT_CONNECTED

__all__ = ["PIXEL_RULES", "DEFAULT_PIXEL_RULE", "MaskRule", "check_pixel_rule", "paste_defects", "fit_mask_rule", "synthetic_rule"]

PIXEL_RULES = ("synthetic", "fpr")
DEFAULT_PIXEL_RULE = "synthetic"
DEFECTS_PER_IMAGE = 10  # two of each of the five kinds: 40 drawn defects from the minimum 4 held-out images
STRENGTHS = (1.0,)  # as drawn; adding half-strength copies lowered the demo's mask F1 (benchmarks/README.md)
FRACTIONS = tuple(round(0.05 * k, 2) for k in range(17))  # the peak fractions tried: 0 (hysteresis only) to 0.8


# NOTE [pixel threshold rules]
# The false-positive rule (`"fpr"`, `pyramidflow.calibration.pixel_threshold`)
# bounds the share of good pixels above one threshold, which says nothing about a defect's outline: on
# the demo its masks are several times the defects' area. The `"synthetic"` rule (the default) draws
# defects of known extent into copies of the held-out good images (the synthetic data set's own defect
# drawing, `pyramidflow.data.synthetic.draw_defect`, with a shifted copy of another held-out
# image as what a missing piece reveals, in the spirit of CutPaste), takes the anomaly maps of those
# copies, and sets a `MaskRule` on them (`fit_mask_rule`):
#
# - `low`: the false-positive threshold, the floor of every mask;
# - `seed`: a region of `map > low` is a defect only if it reaches `seed` (hysteresis), never below `low`;
# - `fraction`: within such a region, only pixels above `fraction` of the region's peak are kept. The
#   map is a blurred copy of the defect, so a strong defect's outline lies at a share of its own peak,
#   not at one threshold for all defects.
#
# `seed` and `fraction` are the pair with the best mean pixel F1 over the drawn kinds, the seed no
# lower than the highest value of the held-out good images' own maps (none of them gets a mask), each
# kind counting once: pooled pixels let the large, strong kinds set the seed above the peaks of the faint
# ones, and a rule set so fits the kinds it drew and no other (set on four of the five kinds and scored
# on the fifth, the pooled rule's F1 is 0.36-0.49 on the demo's categories, the per-kind rule's 0.53-0.67:
# benchmarks/README.md).
#
# Every mask of an image not flagged as defective is a subset of the false-positive rule's mask, so a
# good part's mask is empty at least as often; a flagged image's mask is never empty (`NOTE [a flagged
# image has a mask]`). No test image or label is read. The drawn defects are the synthetic test sets' own kinds, so
# on those sets the rule meets its calibration defects (a best case for the figures measured there).


# NOTE [a flagged image has a mask]
# The image decision (score > image threshold) and the mask come from the same map, but through
# different thresholds: a defect unlike the ones the rule was set on (a faint scratch, a patch of a
# foreign texture) can flag its image while its peak stays below the seed, and the image would be
# reported defective with nothing to show. So, for an image flagged as defective, the rule's seed and
# floor are capped just below the map's own peak: the region around the peak always seeds, grown down
# to the floor, trimmed to the fraction of its peak as any region. Nothing changes where the peak is
# above the seed (the cap is then the seed itself) or for an image not flagged. The cap is the map's
# own peak, not the image threshold, so the promise holds whatever map the mask is drawn on (the
# Detector draws it on the map resized to the input, whose peak can sit just below the score).


@dataclass(frozen=True)
class MaskRule:
    """How an anomaly map becomes a defect mask (``NOTE [pixel threshold rules]``).

    The pixels of each 8-connected region of ``map > low`` whose peak is above ``seed``, and within
    it above ``fraction`` of that peak. ``MaskRule.plain(t)`` is the single threshold ``map > t``.
    For the map of an image flagged as defective, ``seed`` and ``low`` are capped just below the map's
    peak, so its mask is never empty (``NOTE [a flagged image has a mask]``).
    """

    seed: float
    low: float
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"MaskRule: fraction must be in [0, 1) (a share of a region's peak), got {self.fraction!r}.")

    @classmethod
    def plain(cls, threshold: float) -> "MaskRule":
        """The mask ``map > threshold``."""
        return cls(float(threshold), float(threshold), 0.0)

    def __call__(self, maps: np.ndarray, flagged: bool | np.ndarray = False) -> np.ndarray:
        """The bool mask of an ``(H, W)`` map, or of each of ``(N, H, W)`` maps.

        Args:
            maps: anomaly maps, ``(H, W)`` or ``(N, H, W)``.
            flagged: whether the image of each map was flagged as defective (one bool, or ``(N,)``);
                a flagged image's mask holds at least its map's peak (``NOTE [a flagged image has a mask]``).

        Example:
            >>> row = np.array([[0.0, 0.3, 0.9, 0.5, 0.2, 0.35, 0.0]])
            >>> rule = MaskRule(seed=0.6, low=0.25, fraction=0.5)
            >>> rule(row).astype(int).tolist()
            [[0, 0, 1, 1, 0, 0, 0]]
            >>> rule(0.6 * row).astype(int).tolist(), rule(0.6 * row, flagged=True).astype(int).tolist()
            ([[0, 0, 0, 0, 0, 0, 0]], [[0, 0, 1, 1, 0, 0, 0]])
        """
        maps = np.asarray(maps)
        if maps.ndim == 3:
            flags = np.broadcast_to(np.asarray(flagged, dtype=bool), maps.shape[:1])
            return np.stack([self(m, f) for m, f in zip(maps, flags)]) if len(maps) else maps > self.low
        rule = self.capped_at(maps.max()) if flagged and maps.size else self
        return rule._mask(maps)

    def capped_at(self, peak: np.floating) -> "MaskRule":
        """This rule with ``seed`` and ``low`` at most just below ``peak`` (``NOTE [a flagged image has a mask]``).

        ``peak`` keeps the map's dtype: "just below" a float32 peak is the next float32 down, which a
        float64 step would round back up to the peak itself.
        """
        below = float(np.nextafter(peak, np.asarray(-np.inf, dtype=np.asarray(peak).dtype)))
        return MaskRule(min(self.seed, below), min(self.low, below), self.fraction)

    def _mask(self, map_: np.ndarray) -> np.ndarray:
        if self.seed == self.low and self.fraction == 0.0:
            return map_ > self.low
        return self._keep(map_, *self._regions(map_))

    def _regions(self, map_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 8-connected regions of ``map > low`` (labels, 0 outside) and the peak of each (index 0: 0)."""
        labels, count = ndimage.label(map_ > self.low, structure=EIGHT_CONNECTED)
        peaks = ndimage.maximum(map_, labels, np.arange(1, count + 1)) if count else np.zeros(0)
        return labels, np.concatenate(([0.0], peaks))

    def _keep(self, map_: np.ndarray, labels: np.ndarray, peaks: np.ndarray) -> np.ndarray:
        """The pixels of the regions whose peak is above ``seed``, above ``fraction`` of that peak."""
        return self._seeded(peaks)[labels] & self._trimmed(map_, labels, peaks)

    def _seeded(self, peaks: np.ndarray) -> np.ndarray:
        """Which regions are defects (index 0, outside every region, never is)."""
        return np.concatenate(([False], peaks[1:] > self.seed))

    def _trimmed(self, map_: np.ndarray, labels: np.ndarray, peaks: np.ndarray) -> np.ndarray:
        """The pixels above ``fraction`` of their region's peak."""
        return map_ > self.fraction * peaks[labels]


def check_pixel_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`PIXEL_RULES`, else a ValueError naming them."""
    if rule not in PIXEL_RULES:
        raise ValueError(f"pixel_rule must be one of {', '.join(PIXEL_RULES)}, got {rule!r}; "
                         f"{DEFAULT_PIXEL_RULE!r} sets the threshold for the mask's outline, 'fpr' bounds false-positive pixels.")
    return rule


def paste_defects(
    images: np.ndarray, seed: int, per_image: int = DEFECTS_PER_IMAGE, strengths: Sequence[float] = STRENGTHS
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Copies of good ``(N, H, W, 3)`` uint8 images with one drawn defect each, their masks and their kinds.

    Each image gets ``per_image`` copies, cycling through the synthetic defect kinds, then through
    ``strengths``: a defect at strength ``s`` is ``good + s * (drawn - good)`` (1: as drawn), so a weak
    defect keeps the shape and the mask of a strong one. A ``missing`` piece shows a shifted copy of the
    next image (the image itself when it is the only one). Deterministic in ``seed``.

    Returns:
        ``(N * per_image, H, W, 3)`` uint8 images, ``(N * per_image, H, W)`` bool masks, and the kind of
        each, ``"<kind>"`` at strength 1 and ``"<kind> x<s>"`` otherwise.
    """
    from pyramidflow.data.synthetic import DEFECT_TYPES, draw_defect

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[0] == 0:
        raise ValueError(f"paste_defects: give (N, H, W, 3) uint8 good images, got shape {images.shape} {images.dtype}.")
    rng = np.random.default_rng(seed)
    count, height, width = images.shape[:3]
    side = min(height, width)  # the drawing is square: a square window at a random place takes the defect
    out, masks, kinds = [], [], []
    for i in range(count):
        for k in range(per_image):
            kind = DEFECT_TYPES[k % len(DEFECT_TYPES)]
            strength = float(strengths[(k // len(DEFECT_TYPES)) % len(strengths)])
            good = images[i].astype(np.float64) / 255.0
            image = good.copy()
            other = images[(i + 1) % count].astype(np.float64) / 255.0
            behind = np.roll(other, tuple(rng.integers(side // 8, side // 2, size=2)), axis=(0, 1))
            y, x = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
            window = (slice(y, y + side), slice(x, x + side))
            drawn, mask = draw_defect(rng, kind, image[window], behind[window])
            image[window] = good[window] + strength * (drawn - good[window])
            full = np.zeros((height, width), dtype=bool)
            full[window] = mask
            out.append(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))
            masks.append(full)
            kinds.append(kind if strength == 1.0 else f"{kind} x{strength:g}")
    return np.stack(out), np.stack(masks), kinds


def fit_mask_rule(
    maps: np.ndarray, masks: np.ndarray, kinds: Sequence[str], floor: float, least_seed: float | None = None
) -> MaskRule:
    """The :class:`MaskRule` with ``low = floor`` and the best mean pixel F1 over the kinds of drawn defects.

    Each kind counts once, whatever its area: pooled pixels would let the large, strong kinds set the
    seed above the peaks of the faint ones (``NOTE [pixel threshold rules]``). The seeds tried are
    ``least_seed`` (default ``floor``) and the best single threshold of each kind and of all pooled,
    never below it; the fractions :data:`FRACTIONS`; of equal scores, the lowest seed and the smallest
    fraction.

    Args:
        maps: anomaly maps ``(M, H, W)`` of the drawn defects; masks: their ``(M, H, W)`` bool masks.
        kinds: the kind of each drawn defect (:func:`paste_defects`).
        floor: the rule's ``low``.
        least_seed: the lowest seed allowed (at least ``floor``), e.g. the highest peak of the good
            images' maps, so that none of them gets a mask.
    """
    from pyramidflow.metrics import best_pixel_f1

    kinds, masks, floor = np.asarray(kinds), np.asarray(masks, dtype=bool), float(floor)
    least = max(floor, floor if least_seed is None else float(least_seed))
    groups = [kinds == kind for kind in dict.fromkeys(kinds.tolist())]
    seeds = sorted({max(least, best_pixel_f1(maps[g], masks[g])["threshold"]) for g in groups + [slice(None)]} | {least})
    # NOTE [counting a rule's F1]
    # The regions of map > low are the same for every rule tried; a mask is
    # the union of its seeded regions' trimmed pixels, so its true and false positives are sums over those
    # regions of counts taken once per fraction: F1 = 2 tp / (2 tp + fp + fn) with fn = defect pixels - tp.
    regions = [MaskRule(floor, floor)._regions(m) for m in maps]
    defect_pixels = np.array([[masks[g].sum()] for g in groups], dtype=np.float64)
    best, best_score = MaskRule(floor, floor), -1.0
    for fraction in FRACTIONS:
        counts = []  # per map: (true, false) positive pixels of each region when it is kept
        for m, mask, (labels, peaks) in zip(maps, masks, regions):
            trimmed = MaskRule(floor, floor, fraction)._trimmed(m, labels, peaks)
            counts.append((np.bincount(labels[trimmed & mask], minlength=len(peaks)),
                           np.bincount(labels[trimmed & ~mask], minlength=len(peaks))))
        for seed in seeds:
            rule = MaskRule(seed, floor, fraction)
            kept = [rule._seeded(peaks) for _, peaks in regions]
            tp = np.array([counts[i][0][kept[i]].sum() for i in range(len(maps))], dtype=np.float64)
            fp = np.array([counts[i][1][kept[i]].sum() for i in range(len(maps))], dtype=np.float64)
            per_kind = [(2 * tp[g].sum(), fp[g].sum(), n[0]) for g, n in zip(groups, defect_pixels)]
            score = float(np.mean([t / (t + f + n - t / 2) if t + f + n > 0 else 1.0 for t, f, n in per_kind]))
            if score > best_score or (score == best_score and (seed, fraction) < (best.seed, best.fraction)):
                best, best_score = rule, score
    return best


def synthetic_rule(
    good_images: np.ndarray, maps_of: Callable[[np.ndarray], np.ndarray], floor: float, seed: int
) -> MaskRule:
    """The ``"synthetic"`` rule's :class:`MaskRule`, set on defects drawn into ``good_images`` (``NOTE [pixel threshold rules]``).

    Args:
        good_images: held-out good images ``(N, H, W, 3)`` uint8 at the model's resolution.
        maps_of: anomaly maps ``(M, H, W)`` of uint8 images ``(M, H, W, 3)``.
        floor: the false-positive rule's threshold on the same images (the rule's ``low``).
        seed: seeds the drawing.
    """
    defective, masks, kinds = paste_defects(good_images, seed)
    good_peak = float(maps_of(np.asarray(good_images)).max())  # the seed leaves every held-out good image without a mask
    return fit_mask_rule(maps_of(defective), masks, kinds, floor, least_seed=good_peak)
