"""Decision thresholds set on held-out good images: the seeded split and the two threshold rules.

Scores of the images a model and its template were fitted on are optimistically low, so thresholds
taken from them flag held-out good parts too often. ``train`` therefore holds out a seeded share of
the good training images (:func:`calibration_split`), fits the model and the template on the rest,
and sets the thresholds on the held-out images only (:func:`calibrate`):

- the image threshold at a target false-positive rate ``image_fpr`` on good parts
  (:func:`image_threshold`, ``NOTE [image threshold rule]``);
- the pixel threshold by ``pixel_rule``: ``"synthetic"`` (the default) for the defect mask's outline,
  the best mean F1 over the kinds of defects drawn into the held-out images, never below the
  false-positive threshold;
  ``"fpr"`` at ``pixel_fpr`` over the held-out pixels (:func:`pixel_threshold`). NOTE [pixel
  threshold rules] in pixel_threshold.py.

No test image is ever used.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pyramidflow.data.transforms import image_to_tensor
from pyramidflow.pixel_threshold import DEFAULT_PIXEL_RULE, PIXEL_RULES, MaskRule, check_pixel_rule, synthetic_rule

__all__ = [
    "MIN_CALIBRATION_IMAGES",
    "CalibrationSplit",
    "calibration_split",
    "image_threshold",
    "pixel_threshold",
    "check_threshold",
    "stored_thresholds",
    "stored_pixel_rule",
    "stored_mask_rule",
    "calibrate",
]

MIN_CALIBRATION_IMAGES = 4
_MAX_PIXELS = 1 << 22  # NOTE [pixel quantile sample] in train/stats.py: a fixed stride bounds the memory


def calibration_split(num_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, held_out)`` of a seeded split of ``num_images`` good images.

    ``held_out`` has ``max(4, round(fraction * num_images))`` images (none when ``fraction`` is 0),
    drawn by a generator of its own seeded with ``seed`` (the run's global RNGs are not touched, so
    training stays reproducible and resumable). Both lists are sorted.

    Raises:
        ValueError: ``fraction`` outside [0, 1), or too few images to hold out and still train on 2.

    Example:
        >>> train, held_out = calibration_split(10, 0.1, seed=0)
        >>> len(train), len(held_out), sorted(train + held_out) == list(range(10))
        (6, 4, True)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {fraction!r}; 0.1 holds out 10%.")
    if fraction == 0.0:
        return list(range(num_images)), []
    count = max(MIN_CALIBRATION_IMAGES, int(round(fraction * num_images)))
    if num_images - count < 2:
        raise ValueError(
            f"calibration_fraction={fraction}: {num_images} good training images are too few to hold out {count} "
            f"for calibration (at least {MIN_CALIBRATION_IMAGES}) and train on 2 or more; add good images, or pass "
            "--calibration-fraction 0 (thresholds then come from the training images and are optimistic)."
        )
    order = np.random.default_rng(seed).permutation(num_images)
    return sorted(int(i) for i in order[count:]), sorted(int(i) for i in order[:count])


class CalibrationSplit(Dataset):
    """A view of some items of a data set; ``augment`` is the underlying data set's.

    ``torch.utils.data.Subset`` would hide the ``augment`` switch that the template pass turns off
    (``without_augmentation`` in train/data.py), so the view forwards it.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    @property
    def augment(self) -> Any:
        return getattr(self.dataset, "augment", None)

    @augment.setter
    def augment(self, value: bool) -> None:
        self.dataset.augment = value


def _check_fpr(fpr: float, name: str) -> float:
    if not (isinstance(fpr, (int, float)) and 0.0 < fpr < 1.0):
        raise ValueError(f"{name} must be a false-positive rate in (0, 1), got {fpr!r}; e.g. 0.01.")
    return float(fpr)


# NOTE [image threshold rule]
# With n held-out good images and a target false-positive rate a, an empirical quantile is useless
# for n < 1/a (it is the largest score, and a new good part beats it with probability 1/(n+1)). We
# model the log of a good part's image score as Gaussian (image scores are maxima of positive maps:
# right-skewed, their logs close to symmetric) and take the upper one-sided prediction bound
#     threshold = exp(m + t_df(1 - a) * s * sqrt(1 + 1/n)),
# m the mean of the n held-out log-scores, t_df the Student t quantile. The level m must come from
# held-out images: on the images the model and template were fitted on, scores are lower. The spread
# s need not: a handful of held-out images estimates it badly (in the demo, the 4 held-out pcb images
# had a log-score standard deviation of 0.013, the 28 training images 0.21), so when the training images' log-scores are given, s
# is the pooled standard deviation of both groups around their own means (same spread, shifted
# level), with df = n + n_train - 2; otherwise s is the held-out standard deviation, df = n - 1. Under
# the model a new good part exceeds the bound with probability exactly a; the Student factor (5.1 for
# n = 4 alone, 2.5 with 28 training images, against 2.33 for a known spread) is the price of a finite
# calibration set.


def image_threshold(scores: Any, fpr: float = 0.01, spread_from: Any = None) -> float:
    """Image-score threshold at false-positive rate ``fpr`` on good parts (``NOTE [image threshold rule]``).

    Args:
        scores: image scores of held-out good images, at least 2, all positive.
        fpr: target probability that a good part scores above the threshold.
        spread_from: optional image scores of the training images: they share the spread of the
            log-scores (pooled with the held-out ones), never the level.

    Returns:
        The threshold; an image is anomalous when its score is above it.

    Example:
        >>> round(image_threshold([1.0, 1.0, 1.0, 1.0]), 6)
        1.0
        >>> image_threshold([1.0, 1.1, 0.9, 1.05]) > 1.1
        True
    """
    fpr = _check_fpr(fpr, "image_fpr")
    logs = _log_scores(scores, "scores")
    squares, df = float(((logs - logs.mean()) ** 2).sum()), logs.size - 1
    if spread_from is not None and np.asarray(spread_from).size >= 2:
        reference = _log_scores(spread_from, "spread_from")
        squares += float(((reference - reference.mean()) ** 2).sum())
        df += reference.size - 1
    n = logs.size
    factor = float(scipy_stats.t.ppf(1.0 - fpr, df=df)) * math.sqrt(1.0 + 1.0 / n)
    return float(np.exp(logs.mean() + factor * math.sqrt(squares / df)))


def _log_scores(scores: Any, name: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size < 2 or not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError(
            f"image_threshold: needs at least 2 finite positive scores of good images in {name}, got {values.size} "
            f"(min {values.min() if values.size else 'n/a'}); hold out more good images."
        )
    return np.log(values)


def pixel_threshold(values: Any, fpr: float = 0.001) -> float:
    """Pixel-score threshold at false-positive rate ``fpr`` over held-out good pixels.

    The conformal order statistic: the ``ceil((n + 1) * (1 - fpr))``-th smallest of the ``n`` pixel
    scores, which a new good pixel exceeds with probability at most ``fpr`` (pixels exchangeable).
    Held-out images give tens of thousands of pixels, so ``n * fpr`` is large; when ``n`` is too
    small for ``fpr`` (the rank would exceed ``n``) the largest score is returned.

    Example:
        >>> pixel_threshold(list(range(1, 1001)), fpr=0.01)
        991.0
    """
    fpr = _check_fpr(fpr, "pixel_fpr")
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size == 0 or not np.isfinite(flat).all():
        raise ValueError(f"pixel_threshold: needs finite pixel scores of good images, got {flat.size} values.")
    rank = min(math.ceil((flat.size + 1) * (1.0 - fpr)), flat.size)
    return float(np.partition(flat, rank - 1)[rank - 1])


def check_threshold(value: Any, name: str, *, optional: bool = True) -> float | None:
    """A user-given threshold as a float; ``None`` passes through when ``optional``.

    Any real number is accepted: Python and numpy ints and floats, and 0-d tensors or arrays. Anomaly
    maps are means of absolute latent differences, so scores are finite and non-negative: a negative or
    non-finite threshold would flag everything or nothing.

    Raises:
        TypeError: not a real number (``None`` too, unless ``optional``).
        ValueError: outside the score range [0, inf).
    """
    if value is None and optional:
        return None
    number = value.item() if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0 else value
    if isinstance(number, (bool, np.bool_)) or not isinstance(number, numbers.Real):
        raise TypeError(
            f"{name} must be a real number, got {value!r} ({type(value).__name__}); give a non-negative number"
            + (", or leave it out to use the calibrated threshold." if optional else ".")
        )
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{name} {value!r} is outside the score range [0, inf) (anomaly scores are finite and non-negative); "
            "give a non-negative number, or leave it out to use the calibrated threshold."
        )
    return float(number)


def stored_thresholds(checkpoint: Any) -> tuple[float, float, str]:
    """``(image_threshold, pixel_threshold, source)`` of a finished checkpoint.

    Checkpoints written before calibration existed fall back to the training images' largest score
    and pixel quantile (``score_stats``), which are optimistic; ``source`` says which.
    """
    calibration = getattr(checkpoint, "calibration", None) or {}
    if "image_threshold" in calibration:
        return float(calibration["image_threshold"]), float(calibration["pixel_threshold"]), calibration["source"]
    stats = getattr(checkpoint, "score_stats", None) or {}
    return float(stats.get("image_max", 0.0)), float(stats.get("pixel_quantile", 0.0)), "training score statistics"


def stored_mask_rule(checkpoint: Any) -> MaskRule:
    """How a checkpoint's maps become masks; checkpoints without a peak fraction use one threshold."""
    calibration = getattr(checkpoint, "calibration", None) or {}
    pixel = stored_thresholds(checkpoint)[1]
    if "pixel_peak_fraction" not in calibration:
        return MaskRule.plain(pixel)
    return MaskRule(pixel, float(calibration["pixel_fpr_threshold"]), float(calibration["pixel_peak_fraction"]))


def stored_pixel_rule(checkpoint: Any) -> str:
    """The name of the rule that set a checkpoint's pixel threshold.

    Checkpoints calibrated before the rule could be chosen record a description of the false-positive
    rule (or nothing), so anything but a known name reads as ``"fpr"``.
    """
    rule = (getattr(checkpoint, "calibration", None) or {}).get("pixel_rule")
    return rule if rule in PIXEL_RULES else "fpr"


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    template: Sequence[torch.Tensor],
    dataset: Dataset,
    *,
    image_fpr: float,
    pixel_fpr: float,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
    training_scores: Sequence[float] | None = None,
    pixel_rule: str = DEFAULT_PIXEL_RULE,
    seed: int = 0,
) -> dict:
    """Both thresholds from the anomaly maps of ``dataset`` (good images; eval mode, no grad).

    ``training_scores``: image scores of the training images, for the spread of the image rule
    (``NOTE [image threshold rule]``); leave out when ``dataset`` is the training set itself.
    ``pixel_rule``: ``"synthetic"`` or ``"fpr"`` (``NOTE [pixel threshold rules]``); ``seed`` seeds
    the defects the synthetic rule draws.

    Returns:
        ``image_threshold``, ``pixel_threshold``, the targets ``image_fpr`` and ``pixel_fpr``, the
        rules used (``pixel_rule`` the rule's name; ``pixel_threshold``, ``pixel_fpr_threshold`` and
        ``pixel_peak_fraction`` the :class:`~pyramidflow.pixel_threshold.MaskRule`'s ``seed``,
        ``low`` and ``fraction``), ``num_images``, the held-out image ``scores``, and ``source``
        (``"held-out"``, or ``"training images"`` when nothing was held out).
    """
    from pyramidflow.data.transforms import denormalize
    from pyramidflow.model import image_score

    pixel_rule = check_pixel_rule(pixel_rule)
    was_training = model.training
    model.eval()
    try:
        scores, pixels, good_images = [], [], []
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images = (batch["image"] if isinstance(batch, dict) else batch).to(device=device, dtype=dtype)
            maps = model.anomaly_map(images, template)  # (N, 1, H, W)
            scores.append(image_score(maps).double().cpu())
            pixels.append(maps.double().cpu().reshape(-1))
            if pixel_rule == "synthetic":
                good_images.append(denormalize(images.float().cpu()))
        image_scores = torch.cat(scores).numpy()
        pixel_values = torch.cat(pixels).numpy()
        pixel_values = pixel_values[:: max(1, math.ceil(pixel_values.size / _MAX_PIXELS))]
        fpr_threshold = pixel_threshold(pixel_values, pixel_fpr)
        rule = MaskRule.plain(fpr_threshold)
        if pixel_rule == "synthetic":
            def maps_of(drawn: np.ndarray) -> np.ndarray:
                out = []
                for first in range(0, len(drawn), batch_size):
                    batch = torch.stack([image_to_tensor(Image.fromarray(im), im.shape[:2]) for im in drawn[first:first + batch_size]])
                    out.append(model.anomaly_map(batch.to(device=device, dtype=dtype), template)[:, 0].double().cpu().numpy())
                return np.concatenate(out)

            rule = synthetic_rule(np.concatenate(good_images), maps_of, fpr_threshold, seed)
    finally:
        model.train(was_training)
    return {
        "source": source,
        "num_images": int(image_scores.size),
        "scores": [float(s) for s in image_scores],
        "image_fpr": float(image_fpr),
        "pixel_fpr": float(pixel_fpr),
        "image_threshold": image_threshold(image_scores, image_fpr, spread_from=training_scores),
        "pixel_threshold": rule.seed,
        "pixel_fpr_threshold": rule.low,
        "pixel_peak_fraction": rule.fraction,
        "image_rule": "log-normal one-sided prediction bound (Student t)"
        + (", spread pooled with the training images" if training_scores is not None else ""),
        "pixel_rule": pixel_rule,
    }
