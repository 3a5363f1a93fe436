"""Where a coupling's tiles fall: the rules of ``backward_tile``, the tiles of a level, and the window of
the conditioning levels that F reads for each (NOTE [tiles and halos]).

notation: ``k`` the transformed level, ``f`` the level whose resolution the
network F runs at (``k``, or ``k - 1`` for a ``"down"`` block, whose output is
nearest-resized after), ``halo`` F's reach at level ``f`` (two k×k convs:
``2 · (kernel // 2)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TileLayout", "TileWindow", "check_tile_support", "check_tile_alignment", "check_tile_unsynchronised",
    "part_window", "upsampled",
]


def check_tile_support(tile: Optional[int], volume_norm: Optional[str], where: str) -> None:
    """Raise a ValueError unless ``tile`` is ``None`` or a positive int with ``volume_norm="CVN"``."""
    if tile is None:
        return
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{where}: backward_tile must be None or a positive int (pixels of level 0), got {tile!r}.")
    if volume_norm != "CVN":
        reason = "SVN's mean runs over the whole level" if volume_norm == "SVN" else "without VN the log-det sums over the whole level"
        raise ValueError(
            f"{where}: backward_tile needs volume_norm='CVN', got {volume_norm!r}: {reason}, so a tile cannot be done "
            "alone; leave backward_tile=None (whole-level backward) or use volume_norm='CVN'."
        )


def check_tile_alignment(tile: Optional[int], coarsest_level: int, where: str, exponent: str) -> None:
    """Raise a ValueError naming the nearest good value unless ``tile`` is a multiple of ``2**coarsest_level``.

    ``exponent`` is how the message writes ``coarsest_level`` (``"num_levels - 1"`` for a config).
    """
    align = 2**coarsest_level
    if tile is None or tile % align == 0:
        return
    nearest = max(align, (tile + align // 2) // align * align)
    raise ValueError(
        f"{where}: backward_tile must be a multiple of 2**({exponent}) = {align} pixels so that every level's tile "
        f"edges are whole pixels, got {tile}; use {nearest}."
    )


def check_tile_unsynchronised(tile: Optional[int], process_group: object, where: str) -> None:
    """Raise a ValueError for a tiled coupling whose volume normalisation is synchronised across ranks."""
    if tile is not None and process_group is not None:
        raise ValueError(
            f"{where}: backward_tile does not support volume normalisation synchronised across ranks (the "
            "per-pixel mean would need one all-reduce per tile); train in one process, or leave backward_tile=None."
        )


# NOTE [tiles on meta]
# The planner runs the real step on the meta device, where an op costs the
# same Python time whatever its size, so thousands of tiles would take
# minutes for nothing: every tile frees what it made before the next starts,
# and what stays (the level-sized outputs and gradient accumulators) is made
# before the first. On meta only the tiles of each kind of position run: the
# first two and last two rows and columns (a border tile, an inner one with a
# whole halo, the one before the last, the narrower last), which gives the
# same peak. Values never exist on meta, so none is skipped that matters.
def _representatives(starts: List[int]) -> List[int]:
    return sorted({*starts[:2], *starts[-2:]})


# NOTE [tiles and halos]
# F is two k×k convs with zero padding p = k // 2, the affine step and CVN act
# pixel by pixel, and the pyramid's resizes between levels are nearest by
# powers of two. So F's output on a window of level f needs its hidden
# activation on that window widened by p, and that the conditioning input
# widened by p more (`halo` = 2p), both cut at the true image border. The
# convs run without padding on exactly that: the input window is padded with
# zeros only where it meets the image border (the first conv's own padding),
# and the hidden activation likewise (the second conv's padding: zero there,
# not the first conv applied to zeros). Nothing outside the tile is computed
# but the hidden margin. The conditioning levels are read as the untiled code
# reads them: a finer level by taking every m-th pixel (what nearest resizing
# by 1/m picks), a coarser one by repeating each pixel m times from a window
# that starts on a whole coarse pixel. A "down" block's F runs on level k-1
# and its output is resized after, keeping the even pixels, so a tile of
# level k is rows 2a..2b of level k-1 and the second conv runs with stride 2:
# only the kept pixels are computed. Tiles never overlap at level k; their
# windows of the conditioning levels do, and their gradients add up there.
@dataclass(frozen=True)
class TileWindow:
    """What F reads for one tile, at level f: the conditioning window (cut at the image border), the zeros
    the model's padding puts around it and around the hidden activation (``F.pad`` order), the stride."""

    rows: slice
    cols: slice
    input_pad: Tuple[int, int, int, int]
    hidden_pad: Tuple[int, int, int, int]
    stride: int


@dataclass(frozen=True)
class TileLayout:
    """Where one coupling's tiles fall: the transformed level, F's level, the conditioning levels, the halo."""

    level: int
    net_level: int
    cond_levels: Tuple[int, ...]
    halo: int
    tile: Optional[int]  # None: the whole level is one tile

    # NOTE [tile side]
    # A tile's working set is F's window: its hidden activation and input at
    # level f. So every block's tiles make F's window T×T at level f (T at
    # level k, T/2 for a "down" block), the same working set as a level-0
    # block's tile: a coarse level is cut into as few tiles as level 0's
    # working set allows (one, for a level of side T or less), not into
    # tiles of T / 2**k whose halos would cost more than the tiles.
    @property
    def side(self) -> int:
        """The side of the tiles at level k (NOTE [tile side])."""
        if self.tile is None:
            return 1 << 62
        return max(1, self.tile >> (self.level - self.net_level))

    def tiles(self, height: int, width: int, meta: bool = False) -> Iterator[Tuple[slice, slice]]:
        """The tiles of level ``k`` (``height×width``), row-major; the last row and column may be narrower.

        ``meta``: only the first two and the last two rows and columns of tiles (NOTE [tiles on meta]).
        """
        side = self.side
        tops, lefts = list(range(0, height, side)), list(range(0, width, side))
        if meta:
            tops, lefts = _representatives(tops), _representatives(lefts)
        for top in tops:
            for left in lefts:
                yield slice(top, min(top + side, height)), slice(left, min(left + side, width))

    def window(self, rows: slice, cols: slice, net_size: Tuple[int, int]) -> TileWindow:
        """What F reads at level f (of ``net_size``) for a tile ``rows×cols`` of level k (NOTE [tiles and halos])."""
        scale = 2 ** (self.level - self.net_level)
        reach = self.halo // 2  # one conv's
        windows, input_pad, hidden_pad = [], [], []
        for s, extent in ((rows, net_size[0]), (cols, net_size[1])):
            start, stop = s.start * scale, s.stop * scale
            hidden_lo, hidden_hi = max(0, start - reach), min(extent, stop + reach)  # inside the image
            lo, hi = max(0, hidden_lo - reach), min(extent, hidden_hi + reach)
            windows.append(slice(lo, hi))
            input_pad.append((lo - (hidden_lo - reach), hidden_hi + reach - hi))
            hidden_pad.append((hidden_lo - (start - reach), stop + reach - hidden_hi))
        (top, bottom), (left, right) = input_pad
        (h_top, h_bottom), (h_left, h_right) = hidden_pad
        return TileWindow(windows[0], windows[1], (left, right, top, bottom), (h_left, h_right, h_top, h_bottom), scale)


def part_window(part: Tensor, part_level: int, net_level: int, rows: slice, cols: slice) -> Tuple[Tensor, Tuple[slice, slice]]:
    """The window of a conditioning level that F's window ``rows×cols`` of level f reads, and its slices of ``part``."""
    if part_level <= net_level:  # finer (or the same): every m-th pixel, as nearest resizing by 1/m picks
        m = 2 ** (net_level - part_level)
        index = (slice(rows.start * m, rows.stop * m, m), slice(cols.start * m, cols.stop * m, m))
        return part[(..., *index)], index
    m = 2 ** (part_level - net_level)  # coarser: whole coarse pixels, each repeated m times, then cropped
    index = (slice(rows.start // m, -(-rows.stop // m)), slice(cols.start // m, -(-cols.stop // m)))
    return part[(..., *index)], index


def upsampled(window: Tensor, part_level: int, net_level: int, rows: slice, cols: slice) -> Tensor:
    """A coarser level's window at F's resolution, cropped to ``rows×cols`` (identity for finer levels)."""
    if part_level <= net_level:
        return window
    m = 2 ** (part_level - net_level)
    big = F.interpolate(window, scale_factor=m, mode="nearest")  # each pixel repeated m×m times (m a power of 2: exact)
    top, left = rows.start - (rows.start // m) * m, cols.start - (cols.start // m) * m
    if (top, left) == (0, 0) and big.shape[-2:] == (rows.stop - rows.start, cols.stop - cols.start):
        return big
    return big[..., top : top + rows.stop - rows.start, left : left + cols.stop - cols.start]
