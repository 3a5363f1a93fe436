"""Pictures a person looks at: image, anomaly heat map, ground-truth contour, side by side.

Pillow and numpy only (no plotting library is a dependency). The colour map
is a perceptually ordered ramp (black, purple, red, orange, yellow, white),
so that brighter always means more anomalous.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .._utils import atomic_write

__all__ = ["colorize", "overlay_panel", "save_panel"]

# Anchors of the ramp, from 0 (normal) to 1 (most anomalous).
_RAMP = np.array(
    [[0, 0, 4], [60, 15, 110], [150, 40, 100], [225, 80, 50], [250, 170, 20], [252, 255, 164]], dtype=np.float64
)
_CONTOUR = (0, 255, 120)
_PREDICTED = (0, 200, 255)  # outline of the predicted defect mask
_MIN_TILE = 256  # pixels: smaller images are enlarged by an integer factor


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map an ``(H, W)`` array to ``(H, W, 3)`` uint8 colours; values outside ``[vmin, vmax]`` saturate."""
    scaled = np.clip((np.asarray(values, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    position = scaled * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return np.round(_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


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
) -> Image.Image:
    """Three tiles side by side: the image, its heat map, and the heat map blended over the image.

    Args:
        image: ``(H, W, 3)`` uint8 image.
        anomaly_map: ``(H, W)`` anomaly values at the image's resolution.
        vmin, vmax: the value range of the colour map (keep it fixed across
            images of one run so that colours compare).
        mask: optional ``(H, W)`` ground truth; its contour is drawn on every tile.
        title: a line written above the tiles (file name, score).
        alpha: weight of the heat map in the blended tile.
        predicted: optional ``(H, W)`` predicted defect mask; its outline is drawn in cyan on the blended tile.

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
    gap, header, footer = 4, 16, 16
    panel = Image.new("RGB", (3 * width + 2 * gap, header + height + footer), (255, 255, 255))
    for i, tile in enumerate(tiles):
        panel.paste(Image.fromarray(tile), (i * (width + gap), header))
    draw = ImageDraw.Draw(panel)
    labels = ["image", "anomaly map", "overlay" + (" (green: ground truth)" if with_truth else "")
              + (" (cyan: predicted)" if with_prediction else "")]
    for i, label in enumerate(labels):
        draw.text((i * (width + gap) + 2, 2), label, fill=(0, 0, 0))
    if title:
        draw.text((2, header + height + 2), title, fill=(0, 0, 0))
    return panel


def save_panel(panel: Image.Image, path: Path) -> None:
    """Write a panel as PNG (NOTE [atomic write]; the folder is created).

    The format is given, not guessed from the name: a name such as ``..png`` has no extension to
    Python's ``os.path.splitext``, which Pillow uses.
    """
    with atomic_write(path) as tmp:
        panel.save(tmp, format="PNG")
