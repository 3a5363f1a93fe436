"""Tiled inference: anomaly maps of images larger than the trained size, at their native resolution.

The model and its template belong to one input size (the template is a per-position mean latent), so
a larger image is cut into tiles of exactly the trained size, overlapping by half a tile, and the
tiles' maps are blended with a separable Hann window normalised by the summed weights
(``NOTE [tile blending]``). Nothing is resized, so a defect keeps its native size in pixels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["tile_starts", "tile_window", "check_tileable", "tiled_anomaly_map"]


def tile_starts(length: int, tile: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` pixels, half a tile apart.

    The last tile ends exactly at ``length`` (it overlaps its neighbour by more when ``length`` is not
    a multiple of half a tile).

    Example:
        >>> tile_starts(256, 128), tile_starts(300, 128), tile_starts(128, 128)
        ([0, 64, 128], [0, 64, 128, 172], [0])
    """
    stride = max(1, tile // 2)
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


# NOTE [tile blending]
# Pixels near a tile's border see zero padding in the convolutions and the pyramid's border handling,
# so their map values are the least reliable. Each tile's map is weighted by w(y) * w(x) with the Hann
# window w(i) = sin^2(pi * (i + 0.5) / T): near 0 at the tile's border, 1 in its middle, and at half a
# tile overlap the weights of neighbouring tiles sum to 1 away from the image border, so no seam is
# drawn into the map. The blended value is sum(w * map) / sum(w); where only one tile covers a pixel
# (the image's border) that is exactly the tile's value (w > 0 everywhere thanks to the half-pixel shift).


def tile_window(tile: int) -> np.ndarray:
    """The 1-D Hann weights ``(tile,)`` of ``NOTE [tile blending]``, all positive."""
    i = np.arange(tile, dtype=np.float64)
    return np.sin(np.pi * (i + 0.5) / tile) ** 2


def check_tileable(height: int, width: int, tile: tuple[int, int], name: str) -> None:
    """Refuse an image smaller than the tile (the trained size) in either direction."""
    if height < tile[0] or width < tile[1]:
        raise ValueError(
            f"{name}: tiled inference needs images at least the trained size {tile[1]}x{tile[0]} (width x height), "
            f"this one is {width}x{height}; drop --tile (tile=False) to resize it to the trained size instead."
        )


@torch.no_grad()
def tiled_anomaly_map(
    image: torch.Tensor,
    tile: tuple[int, int],
    maps_of: Callable[[torch.Tensor], np.ndarray],
    *,
    batch_size: int = 8,
    name: str = "image",
) -> np.ndarray:
    """The blended ``(H, W)`` anomaly map of one normalised image ``(3, H, W)`` at its own resolution.

    Args:
        image: ImageNet-normalised image ``(3, H, W)``, ``H`` and ``W`` at least the tile's.
        tile: the trained size ``(height, width)``.
        maps_of: maps ``(n, th, tw)`` of a batch of tiles ``(n, 3, th, tw)`` (the model and template).
        batch_size: tiles per call of ``maps_of``.
        name: how errors refer to the image.

    Raises:
        ValueError: the image is smaller than the tile.
    """
    height, width = int(image.shape[-2]), int(image.shape[-1])
    check_tileable(height, width, tile, name)
    th, tw = tile
    weight = np.outer(tile_window(th), tile_window(tw))
    total = np.zeros((height, width), dtype=np.float64)
    weights = np.zeros((height, width), dtype=np.float64)
    corners = [(y, x) for y in tile_starts(height, th) for x in tile_starts(width, tw)]
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        tiles = torch.stack([image[:, y:y + th, x:x + tw] for y, x in chunk])
        maps = maps_of(tiles)
        for (y, x), tile_map in zip(chunk, maps):
            total[y:y + th, x:x + tw] += weight * tile_map
            weights[y:y + th, x:x + tw] += weight
    return (total / weights).astype(np.float32)
