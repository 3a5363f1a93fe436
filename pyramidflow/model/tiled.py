"""A pyramid coupling run tile by tile: its no-grad forward, rebuild and backward in one tile's memory.

A coupling is local (NOTE [tiles and halos]), so the transformed level can be
cut into tiles (of ``T`` pixels at the level F runs at: NOTE [tile side]) and each
tile done alone from a window of the conditioning levels: the no-grad forward
writes ``y_k`` tile by tile (:func:`tiled_forward`), and invertible backward
rebuilds ``x_k`` and backpropagates tile by tile (:func:`tiled_transformed_level`).
No tensor of the network ever spans the whole level; what does is the state
the engine keeps anyway (the levels and their gradients) and, for the
conditioning levels, their gradients' accumulators.

Only CVN is tiled: its mean runs over batch and channels at each pixel, so a
tile holds all it needs. SVN's mean runs over the whole level per channel and
the log-det without VN sums over it (:func:`check_tile_support`).

notation: ``k`` the transformed level, ``f`` the level whose resolution the
network F runs at (``k``, or ``k - 1`` for a ``"down"`` block, whose output is
nearest-resized after), ``halo`` F's reach at level ``f`` (two k×k convs:
``2 · (kernel // 2)``), ``u = W⁻¹ y_k``, ``g`` the incoming gradient of ``y_k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels

__all__ = ["TileLayout", "TileWindow", "check_tile_support", "check_tile_alignment", "check_tile_unsynchronised", "tiled_forward", "tiled_transformed_level", "tiled_from_input"]


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
    tile: int

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


def _part_window(part: Tensor, part_level: int, net_level: int, rows: slice, cols: slice) -> Tuple[Tensor, Tuple[slice, slice]]:
    """The window of a conditioning level that F's window ``rows×cols`` of level f reads, and its slices of ``part``."""
    if part_level <= net_level:  # finer (or the same): every m-th pixel, as nearest resizing by 1/m picks
        m = 2 ** (net_level - part_level)
        index = (slice(rows.start * m, rows.stop * m, m), slice(cols.start * m, cols.stop * m, m))
        return part[(..., *index)], index
    m = 2 ** (part_level - net_level)  # coarser: whole coarse pixels, each repeated m times, then cropped
    index = (slice(rows.start // m, -(-rows.stop // m)), slice(cols.start // m, -(-cols.stop // m)))
    return part[(..., *index)], index


def _upsampled(window: Tensor, part_level: int, net_level: int, rows: slice, cols: slice) -> Tensor:
    """A coarser level's window at F's resolution, cropped to ``rows×cols`` (identity for finer levels)."""
    if part_level <= net_level:
        return window
    m = 2 ** (part_level - net_level)
    big = window.repeat_interleave(m, dim=-2).repeat_interleave(m, dim=-1)
    top, left = rows.start - (rows.start // m) * m, cols.start - (cols.start // m) * m
    return big[..., top : top + rows.stop - rows.start, left : left + cols.stop - cols.start]


def _tile_rt(layout: TileLayout, parts: Sequence[Tensor], net_size: Tuple[int, int], rows: slice, cols: slice,
             w_in: Tensor, w_out: Tensor, slope: float, need_parts: Sequence[bool]):
    """F's output ``rt`` on one tile of level k, and the conditioning windows it was computed from.

    Runs with whatever grad mode is on; the windows are fresh leaves (requiring grad where
    ``need_parts`` says), so a backward through ``rt`` gives tile-sized gradients.
    """
    window = layout.window(rows, cols, net_size)
    leaves, indices, resized = [], [], []
    for part, level, need in zip(parts, layout.cond_levels, need_parts):
        part_window, index = _part_window(part, level, layout.net_level, window.rows, window.cols)
        leaf = part_window.detach().requires_grad_(need and torch.is_grad_enabled())
        leaves.append(leaf)
        indices.append(index)
        resized.append(_upsampled(leaf, level, layout.net_level, window.rows, window.cols))
    cond = resized[0] if len(resized) == 1 else torch.cat(resized, dim=1)
    hidden = F.leaky_relu(F.conv2d(_padded(cond, window.input_pad), w_in), slope, inplace=True)
    rt = F.conv2d(_padded(hidden, window.hidden_pad), w_out, stride=window.stride)
    return rt, leaves, indices


def _padded(x: Tensor, pad: Tuple[int, int, int, int]) -> Tensor:
    """``x`` with zeros around it (``F.pad`` order); ``x`` itself for none (an inner tile)."""
    return F.pad(x, pad) if any(pad) else x


def _tile_kwargs(affine_kwargs: dict, rows: slice, cols: slice) -> dict:
    """The affine op's settings for one tile: a given CVN mean ``(1, 1, H, W)`` cut to it."""
    mean = affine_kwargs.get("running_mean")
    return {**affine_kwargs, "running_mean": None if mean is None else mean[..., rows, cols]}


def _affine_tile(x: Tensor, rows: slice, cols: slice, r: Tensor, t: Tensor, dtype: torch.dtype,
                 tile_kwargs: dict) -> Tuple[Tensor, Optional[Tensor]]:
    """The affine step on one tile of ``x``, into a fresh copy (even when the tile is the whole level: ``x``
    is not ours to overwrite): ``(a, batch_mean)`` as :func:`pyramidflow.kernels.affine_coupling_into`."""
    a = torch.empty_like(x[..., rows, cols], dtype=dtype, memory_format=torch.contiguous_format)
    a.copy_(x[..., rows, cols])
    return a, kernels.affine_coupling_into(a, r, t, out=a, **tile_kwargs)


def _apply_1x1(x: Tensor, weight: Tensor) -> Tensor:
    """``weight · x`` at every pixel: ``(C, C)`` on ``(N, C, h, w)``."""
    return F.conv2d(x, weight.to(x.dtype)[:, :, None, None])


@torch.no_grad()
def tiled_forward(layout: TileLayout, x: Tensor, parts: Sequence[Tensor], net_size: Tuple[int, int],
                  w_in: Tensor, w_out: Tensor, slope: float, weight: Tensor, affine_kwargs: dict,
                  out: Optional[Tensor] = None, fold_mean: Optional[Callable[[Tensor, slice, slice], None]] = None) -> Tensor:
    """The coupling's no-grad forward, tile by tile: ``y_k``.

    ``out``: where ``y_k`` is written (a new level if ``None``); it may be ``x`` itself, since F never
    reads ``x`` and each tile of ``x`` is read before its own tile of ``y`` is written.
    ``fold_mean(mean, rows, cols)`` takes each tile's CVN batch mean ``(1, 1, h, w)`` as it comes (none
    comes when a mean was given), so that no level-sized mean is assembled.
    """
    dtype = torch.promote_types(x.dtype, w_in.dtype)
    y = torch.empty_like(x, dtype=dtype) if out is None else out
    for rows, cols in layout.tiles(*x.shape[-2:], meta=x.is_meta):
        rt, _, _ = _tile_rt(layout, parts, net_size, rows, cols, w_in, w_out, slope, (False,) * len(parts))
        r, t = rt.chunk(2, dim=1)
        a, tile_mean = _affine_tile(x, rows, cols, r, t, dtype, _tile_kwargs(affine_kwargs, rows, cols))
        if tile_mean is not None and fold_mean is not None:
            fold_mean(tile_mean, rows, cols)
        del rt, r, t, tile_mean
        y[..., rows, cols] = _apply_1x1(a, weight)
        del a
    return y


# NOTE [tiled backward]
# As the untiled transformed level (NOTE [placeholder outputs] in lean.py),
# the op returns views of its inputs as the block's local outputs (y_k and the
# conditioning levels), x_k is a leaf on u's storage filled during backward,
# and F's output is never kept: it is recomputed per tile, with grad, inside
# backward. Per tile: dW += g·uᵀ (u read before it becomes x), grad_a = Wᵀg,
# the affine backward rebuilds x and gives grad_x, grad_r, grad_t (CVN's batch
# mean is per pixel, so the tile's is exact), and grad_(r, t) goes back
# through the tile's F into the conditioning windows and F's weights. x and
# grad_x are written back into u's and (where the engine allows) g's storage.
# The conditioning levels are outputs of the op too, so their incoming
# gradients come in here and the windows' gradients add into them (into a
# copy where the engine does not allow overwriting): no zero-filled buffer and
# no second sum of a whole level.
@dataclass(frozen=True)
class _Options:
    layout: TileLayout
    net_size: Tuple[int, int]
    slope: float
    writable: Tuple[bool, ...]  # per input: x's gradient, then each conditioning level's
    affine_kwargs: dict
    input_final: bool = False  # x's storage holds x already (rebuilt first, or exact): u is recomputed per tile


def _gradient_into(g: Optional[Tensor], like: Tensor, writable: bool) -> Tensor:
    """Where a level's gradient is accumulated: ``g`` itself if it may be overwritten, else a copy (zeros without ``g``)."""
    if g is None:
        return torch.zeros_like(like)
    if writable and g.dtype == like.dtype and g.is_contiguous() and not g.requires_grad:
        return g
    return g.to(like.dtype, copy=True)


class _TiledLevel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options, x, w_in, w_out, weight, y, *parts):  # type: ignore[override]
        ctx.options = options
        ctx.u = x.detach()  # u until backward turns it into x; x itself when options.input_final
        ctx.save_for_backward(w_in, w_out, weight, *parts)
        return (y.view_as(y), *(p.view_as(p) for p in parts))

    @staticmethod
    def backward(ctx, g, *grad_levels):  # type: ignore[override]
        w_in, w_out, weight, *parts = ctx.saved_tensors
        options: _Options = ctx.options
        layout, net_size, slope = options.layout, options.net_size, options.slope
        u = ctx.u
        del ctx.u
        need_parts = ctx.needs_input_grad[6:]
        grad_x = _gradient_into(g, u, options.writable[0])
        grad_parts: List[Optional[Tensor]] = [
            _gradient_into(gp, p, w) if need else None for gp, p, w, need in zip(grad_levels, parts, options.writable[1:], need_parts)
        ]
        grad_w_in, grad_w_out = torch.zeros_like(w_in), torch.zeros_like(w_out)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[4] else None
        w_in_local, w_out_local = w_in.detach().requires_grad_(True), w_out.detach().requires_grad_(True)
        weight_t = weight.detach().T
        for rows, cols in layout.tiles(*u.shape[-2:], meta=u.is_meta):
            with torch.enable_grad():
                rt, leaves, indices = _tile_rt(layout, parts, net_size, rows, cols, w_in_local, w_out_local, slope, need_parts)
            grad_rt = rt.detach().clone()
            r, t = grad_rt.chunk(2, dim=1)
            tile_kwargs = _tile_kwargs(options.affine_kwargs, rows, cols)
            if options.input_final:  # u = affine(x) again on this tile; x stays as it is
                a, _ = _affine_tile(u, rows, cols, r, t, u.dtype, tile_kwargs)
            else:
                a = u[..., rows, cols].contiguous()
            g_tile = grad_x[..., rows, cols].contiguous()  # still the incoming gradient on this tile
            if grad_weight is not None:
                grad_weight += torch.einsum("nihw,njhw->ij", g_tile, a)
            grad_a = _apply_1x1(g_tile, weight_t)
            del g_tile
            # NOTE [backward into the operands] (kernels/reference.py): x over a, grad_x over grad_a, grad_r, grad_t over r, t.
            kernels.affine_coupling_bwd_into(a, r, t, grad_a, out=(a, grad_a, r, t), **tile_kwargs)
            if not options.input_final:
                u[..., rows, cols] = a
            grad_x[..., rows, cols] = grad_a
            del a, grad_a, r, t
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = torch.autograd.grad(rt, [*wanted, w_in_local, w_out_local], grad_rt)
            del rt, grad_rt
            grad_w_in += grads[-2]
            grad_w_out += grads[-1]
            found = iter(grads[:-2])
            for i, leaf in enumerate(leaves):
                if leaf.requires_grad:
                    grad_parts[i][(..., *indices[i])] += next(found)
            del grads, found, leaves
        return (None, grad_x, grad_w_in, grad_w_out, grad_weight, None, *grad_parts)


def tiled_transformed_level(layout: TileLayout, y: Tensor, parts: Sequence[Tensor], net_size: Tuple[int, int],
                            w_in: Tensor, w_out: Tensor, slope: float, weight: Tensor, inverse_weight: Tensor, *,
                            writable: Tuple[bool, ...], affine_kwargs: dict,
                            rebuild_first: bool = False) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """The tiled reconstruct: ``(x, local_outputs)``, as :func:`.lean.transformed_level` (NOTE [tiled backward]).

    Args:
        layout: the coupling's tiles.
        y: the transformed level's output ``(N, C, H, W)``, detached.
        parts: the conditioning levels, leaves (requiring grad where their gradient is wanted).
        net_size: the size of level f, where F runs.
        w_in, w_out, slope: F's weights and LeakyReLU slope.
        weight: ``W`` with its graph to the 1×1 conv's parameters; ``inverse_weight``: ``W⁻¹``.
        writable: whether ``y``'s storage may be overwritten, then whether the incoming gradient of
            ``y`` and of each conditioning level may be.
        affine_kwargs: ``volume_norm``, ``clamp``, ``running_mean``, ``backend`` of the affine op.
        rebuild_first: rebuild ``x`` now (one more pass of F, without grad), so its values can be
            checked before the local backward (:class:`~pyramidflow.engine.Writable`).

    Returns:
        ``x``, a leaf filled now or during the local backward, and the local outputs ``(y_local, *parts_local)``,
        differentiable in ``x``, the conditioning levels, F's weights and ``weight``.
    """
    storage_writable, gradients = writable[0], tuple(writable[1:])
    inverse = inverse_weight.detach()
    with torch.no_grad():
        u = y if storage_writable else torch.empty_like(y)
        for rows, cols in layout.tiles(*y.shape[-2:], meta=y.is_meta):
            u[..., rows, cols] = _apply_1x1(y[..., rows, cols], inverse)
            if rebuild_first:  # x now, over u: F runs once more per tile, in backward
                rt, _, _ = _tile_rt(layout, parts, net_size, rows, cols, w_in, w_out, slope, (False,) * len(parts))
                r, t = rt.chunk(2, dim=1)
                u[..., rows, cols] = kernels.affine_coupling_inverse(u[..., rows, cols], r, t, **_tile_kwargs(affine_kwargs, rows, cols))[0]
                del rt, r, t
    x = u.detach().requires_grad_(True)
    options = _Options(layout, tuple(net_size), slope, gradients, affine_kwargs, input_final=rebuild_first)
    return x, _TiledLevel.apply(options, x, w_in, w_out, weight, y, *parts)


def tiled_from_input(layout: TileLayout, x: Tensor, parts: Sequence[Tensor], net_size: Tuple[int, int],
                     w_in: Tensor, w_out: Tensor, slope: float, weight: Tensor, affine_kwargs: dict) -> Tuple[Tensor, ...]:
    """The local outputs ``(y_local, *parts_local)`` from the exact input ``x`` (a leaf): the rebuild of an anchor.

    The forward runs tile by tile without grad; backward is :class:`_TiledLevel`'s with ``x`` as the
    final input (``u`` recomputed per tile), so its gradients are those at ``x`` and no whole-level
    graph exists (NOTE [rebuilding in backward] in :mod:`pyramidflow.engine._state`).
    """
    y = tiled_forward(layout, x.detach(), parts, net_size, w_in, w_out, slope, weight.detach(), affine_kwargs)
    options = _Options(layout, tuple(net_size), slope, (False,) * (1 + len(parts)), affine_kwargs, input_final=True)
    return _TiledLevel.apply(options, x, w_in, w_out, weight, y, *parts)
