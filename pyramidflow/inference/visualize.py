"""Pictures a person looks at: image, anomaly heat map, ground-truth contour, side by side, with a colour bar.

Pillow and numpy only: one panel per image must stay cheap (the report's plots use matplotlib,
:mod:`pyramidflow.inference.plots`). The colour map
is a perceptually ordered ramp (black, purple, red, orange, yellow, white),
so that brighter always means more anomalous.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .._utils import atomic_write

__all__ = ["colorize", "heat_top", "overlay_panel", "save_panel"]

# Anchors of the ramp, from 0 (normal) to 1 (most anomalous).
_RAMP = np.array(
    [[0, 0, 4], [60, 15, 110], [150, 40, 100], [225, 80, 50], [250, 170, 20], [252, 255, 164]], dtype=np.float64
)
_CONTOUR = (0, 255, 120)
_PREDICTED = (0, 200, 255)  # outline of the predicted defect mask
_ANOMALOUS = (200, 30, 30)  # the decision badges
_GOOD = (20, 130, 60)
_MIN_TILE = 256  # pixels: smaller images are enlarged by an integer factor


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map an ``(H, W)`` array to ``(H, W, 3)`` uint8 colours; values outside ``[vmin, vmax]`` saturate."""
    scaled = np.clip((np.asarray(values, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    position = scaled * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return np.round(_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def heat_top(pixel_threshold: float, fallback: float) -> float:
    """The top of the heat map's colour range (the bottom is 0): twice the pixel threshold.

    The threshold then sits in the middle of every colour bar, so that across runs and images purple
    to red reads "below the threshold" and orange to white "above it". ``fallback`` (say, the highest
    training score) where the threshold is 0 and gives no scale.
    """
    return 2.0 * float(pixel_threshold) if pixel_threshold > 0 else float(fallback)


def _contour(mask: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)`` outline of the regions of a binary mask, two pixels wide."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)


def _enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    """Repeat every pixel ``scale`` times along both axes."""
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def overlay_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    mask: Optional[np.ndarray] = None,
    title: str = "",
    alpha: float = 0.55,
    predicted: Optional[np.ndarray] = None,
    threshold: Optional[float] = None,
    is_anomalous: Optional[bool] = None,
) -> Image.Image:
    """Three tiles side by side (the image, its heat map, the heat map blended over the image) above a colour bar.

    Args:
        image: ``(H, W, 3)`` uint8 image.
        anomaly_map: ``(H, W)`` anomaly values at the image's resolution.
        vmin, vmax: the value range of the colour map (keep it fixed across
            images of one run so that colours compare).
        mask: optional ``(H, W)`` ground truth; its contour is drawn on every tile.
        title: a line written under the colour bar (file name, score).
        alpha: weight of the heat map in the blended tile.
        predicted: optional ``(H, W)`` predicted defect mask; its outline is drawn in cyan on the blended tile.
        threshold: the pixel threshold, marked on the colour bar (so "how bright is a defect?" has an answer).
        is_anomalous: the image's decision, written as a red ``ANOMALOUS`` or green ``GOOD`` badge.

    Returns:
        An RGB :class:`PIL.Image.Image`.
    """
    heat = colorize(anomaly_map, vmin, vmax)
    blended = np.round(image * (1 - alpha) + heat * alpha).astype(np.uint8)
    # Small images are enlarged (nearest, so pixels stay pixels) to stay readable beside the labels.
    scale = max(1, -(-_MIN_TILE // max(image.shape[:2])))
    tiles = [_enlarge(tile, scale) for tile in (image, heat, blended)]
    with_truth = mask is not None and mask.any()
    if with_truth:
        outline = _contour(_enlarge(mask, scale))
        for tile in tiles:
            tile[outline] = _CONTOUR
    with_prediction = predicted is not None and predicted.any()
    if with_prediction:
        tiles[2][_contour(_enlarge(predicted, scale))] = _PREDICTED
    height, width = tiles[0].shape[:2]
    gap, header, bar, footer = 4, 18, 34, 18
    panel = Image.new("RGB", (3 * width + 2 * gap, header + height + bar + footer), (255, 255, 255))
    for i, tile in enumerate(tiles):
        panel.paste(Image.fromarray(tile), (i * (width + gap), header))
    draw = ImageDraw.Draw(panel)
    font = _font(12)
    labels = ["image" + (" (green: ground truth)" if with_truth else ""), "anomaly map",
              "overlay" + (" (cyan: predicted)" if with_prediction else "")]
    for i, label in enumerate(labels):
        draw.text((i * (width + gap) + 2, 2), label, fill=(0, 0, 0), font=font)
    if is_anomalous is not None:
        _badge(draw, panel.width - 2, 1, "ANOMALOUS" if is_anomalous else "GOOD",
               _ANOMALOUS if is_anomalous else _GOOD, font)
    _colour_bar(panel, (2, header + height + 4, panel.width - 2), vmin, vmax, threshold, font)
    if title:
        draw.text((2, header + height + bar + 2), title, fill=(0, 0, 0), font=font)
    return panel


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's own scalable font (no system font is needed); its bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _badge(draw: ImageDraw.ImageDraw, right: int, top: int, text: str, colour: tuple, font) -> None:
    """White ``text`` on a ``colour`` box whose right edge is at ``right``."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    left = right - (x1 - x0) - 8
    draw.rectangle((left, top, right, top + (y1 - y0) + 6), fill=colour)
    draw.text((left + 4 - x0, top + 3 - y0), text, fill=(255, 255, 255), font=font)


def _colour_bar(panel: Image.Image, box: tuple, vmin: float, vmax: float, threshold: Optional[float], font) -> None:
    """The colour map from ``vmin`` to ``vmax`` as a strip ``box = (left, top, right)``, its ends and the threshold."""
    left, top, right = box
    strip = 10
    ramp = colorize(np.linspace(vmin, vmax, right - left)[None], vmin, vmax)
    panel.paste(Image.fromarray(np.repeat(ramp, strip, axis=0)), (left, top))
    draw = ImageDraw.Draw(panel)
    draw.rectangle((left, top, right - 1, top + strip - 1), outline=(0, 0, 0))
    draw.text((left, top + strip + 2), f"{vmin:.3g}", fill=(0, 0, 0), font=font)
    end = f"{vmax:.3g}"
    draw.text((right - draw.textlength(end, font=font), top + strip + 2), end, fill=(0, 0, 0), font=font)
    if threshold is None:
        return
    position = (threshold - vmin) / max(vmax - vmin, 1e-12)
    x = left + int(round(np.clip(position, 0.0, 1.0) * (right - left - 1)))
    draw.line((x, top - 3, x, top + strip + 2), fill=(0, 0, 0), width=3)
    draw.line((x, top - 3, x, top + strip + 2), fill=(255, 255, 255), width=1)
    label = f"pixel threshold {threshold:.3g}" + (" (above the range)" if position > 1 else "")
    size = draw.textlength(label, font=font)
    draw.text((min(max(x - size / 2, left + 40), right - size - 40), top + strip + 2), label, fill=(0, 0, 0), font=font)


def save_panel(panel: Image.Image, path: Path) -> None:
    """Write a panel as PNG (NOTE [atomic write]; the folder is created).

    The format is given, not guessed from the name: a name such as ``..png`` has no extension to
    Python's ``os.path.splitext``, which Pillow uses.
    """
    with atomic_write(path) as tmp:
        panel.save(tmp, format="PNG")
