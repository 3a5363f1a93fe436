"""A pyramid coupling run region by region: its no-grad forward, rebuild and invertible backward.

A region is a tile of the transformed level (all samples), and inside it the samples F runs on at a
time (NOTE [regions]). A coupling is local (NOTE [tiles and halos] in :mod:`.tiles`), so each tile is
done alone from a window of the conditioning levels; untiled, the whole level is the one tile and F
runs sample by sample. The network is the module's own (:meth:`.network.AffineParameterNet.window`
and its ``window_backward``: NOTE [F written once]); the affine step is :mod:`pyramidflow.kernels`'s.
The no-grad forward writes ``y_k`` region by region (:func:`forward_regions`); invertible backward
rebuilds ``x_k`` and backpropagates region by region (:func:`transformed_level`, :func:`from_input`).
F's hidden activation never spans more than a region and its output ``(r, t)`` more than a tile, made
inside backward; what spans the whole level is the state the engine keeps anyway (the levels and
their gradients).

Only CVN is tiled: its mean runs over batch and channels at each pixel, so a tile holds all it
needs. SVN's mean runs over the whole level per channel and the log-det without VN sums over it
(:func:`.tiles.check_tile_support`): untiled, the affine step runs on the whole level.

notation: ``k`` the transformed level, ``f`` the level whose resolution the
network F runs at (``k``, or ``k - 1`` for a ``"down"`` block, whose output is
nearest-resized after), ``halo`` F's reach at level ``f`` (two k×k convs:
``2 · (kernel // 2)``), ``u = W⁻¹ y_k``, ``g`` the incoming gradient of ``y_k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from .._meta import samples_to_run
from .tiles import TileLayout, TileWindow, part_window, upsampled

if TYPE_CHECKING:
    from .network import AffineParameterNet

__all__ = ["Regions", "forward_regions", "transformed_level", "from_input", "log_scale_sum"]


# NOTE [regions]
# A region is the samples F runs on at a time within one tile of level k.
# Tiled, that is every sample: the affine step's CVN mean runs over the batch
# at each pixel, so a tile with all its samples is done alone. Untiled, the
# whole level is the one tile (its windows are the image with the model's own
# padding: no padded copy) and F runs one sample at a time, so its hidden
# activation (twice the level per sample) never exists for the whole batch;
# the affine step runs on the whole level, whose batch statistics (CVN or
# SVN) it needs. In backward, F runs each region without a graph, keeping the
# hidden activation of the last region only (and, where the tile is one
# region, its input window); the affine backward turns (r, t) into their
# gradients in place, and F's backward then does the kept region first and
# makes the hidden activation again for each other one (conv_in only). So a
# tiled block makes nothing twice; an untiled one runs conv_in again for all
# samples but one, because (r, t) of the whole batch exist before any
# region's gradient is known. Running F on the whole batch where the level is
# small would save that conv_in, but costs a hidden activation per sample
# more at the block's peak at every size (the hidden activation grows with
# the level): the measured step peak at 64 px (tests/model/test_step_memory.py)
# rose 40%.
@dataclass(frozen=True)
class Regions:
    """How one coupling is run region by region (NOTE [regions]): its tiles, the size of level f, the
    samples F runs on at a time."""

    layout: TileLayout
    net_size: Tuple[int, int]
    samples: int

    def tiles(self, like: Tensor) -> Iterator[Tuple[slice, slice]]:
        """The tiles of level k (``like`` ``(N, C, H, W)``); on meta a few of each position (NOTE [tiles on meta])."""
        return self.layout.tiles(*like.shape[-2:], meta=like.is_meta)

    def chunks(self, like: Tensor) -> List[slice]:
        """The samples of each region of a tile; on meta the first and the last (NOTE [samples on meta])."""
        batch = like.shape[0]
        starts = range(0, batch, self.samples)
        return [slice(starts[i], min(starts[i] + self.samples, batch)) for i in samples_to_run(len(starts), like)]

    @staticmethod
    def whole(like: Tensor, rows: slice, cols: slice) -> bool:
        """Whether the tile ``rows×cols`` is all of ``like``'s level."""
        return (rows.stop - rows.start, cols.stop - cols.start) == tuple(like.shape[-2:])


def _conditioning(regions: Regions, parts: Sequence[Tensor], window: TileWindow, samples: slice,
                  need_parts: Sequence[bool]) -> Tuple[Tensor, List[Tensor], List[Tuple[slice, slice]]]:
    """F's input window for the samples ``samples``, and the conditioning windows it is made of (fresh leaves,
    requiring grad where ``need_parts`` says and grad is on), with their slices of each part."""
    layout = regions.layout
    leaves, indices, resized = [], [], []
    for part, level, need in zip(parts, layout.cond_levels, need_parts):
        read, index = part_window(part[samples], level, layout.net_level, window.rows, window.cols)
        leaf = read.detach().requires_grad_(need and torch.is_grad_enabled())
        leaves.append(leaf)
        indices.append(index)
        resized.append(upsampled(leaf, level, layout.net_level, window.rows, window.cols))
    return (resized[0] if len(resized) == 1 else torch.cat(resized, dim=1)), leaves, indices


@torch.no_grad()
def _network(regions: Regions, net: "AffineParameterNet", parts: Sequence[Tensor], window: TileWindow,
             like: Tensor, need_parts: Optional[Sequence[bool]] = None) -> Tuple[Tensor, Optional[tuple]]:
    """F's output ``rt`` ``(N, 2C, h, w)`` on one tile, region by region, without a graph; with ``need_parts``
    (for backward) also what F's backward keeps of the last region (NOTE [regions]): its hidden state and,
    where the tile is one region, its input window with the conditioning leaves (``None`` otherwise)."""
    chunks = regions.chunks(like)
    rt, kept = None, None
    for i, samples in enumerate(chunks):
        kept = None  # the region before's hidden activation goes before this one's is made
        if need_parts is not None and i == len(chunks) - 1:
            with torch.enable_grad():
                window_input = _conditioning(regions, parts, window, samples, need_parts)
            out, state = net.window_with_state(window_input[0].detach(), window.input_pad, window.hidden_pad, window.stride)
            kept = (state, window_input if len(chunks) == 1 else None)
            del window_input
        else:
            cond, _, _ = _conditioning(regions, parts, window, samples, (False,) * len(parts))
            out = net.window(cond, window.input_pad, window.hidden_pad, window.stride)
            del cond
        if samples == slice(0, like.shape[0]):
            rt = out
        else:
            if rt is None:
                rt = out.new_empty((like.shape[0], *out.shape[1:]))
            rt[samples] = out
        del out
    return rt, kept


def _tile_kwargs(affine_kwargs: dict, rows: slice, cols: slice) -> dict:
    """The affine op's settings for one tile: a given CVN mean ``(1, 1, H, W)`` cut to it."""
    mean = affine_kwargs.get("running_mean")
    return {**affine_kwargs, "running_mean": None if mean is None else mean[..., rows, cols]}


def _tile_of(x: Tensor, rows: slice, cols: slice, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The tile ``rows×cols`` of ``x``, contiguous: ``x`` itself for the whole level, else a fresh copy."""
    if Regions.whole(x, rows, cols) and x.is_contiguous() and dtype in (None, x.dtype):
        return x
    tile = torch.empty_like(x[..., rows, cols], dtype=dtype, memory_format=torch.contiguous_format)
    return tile.copy_(x[..., rows, cols])


def log_scale_sum(r: Tensor, clamp: float) -> Tensor:
    """Σ s per sample over ``r``'s pixels and channels: the log-det's share of a region (NOTE [log-det without
    volume normalisation] in :mod:`.coupling`)."""
    return kernels.soft_clamp(r, clamp).flatten(1).sum(dim=1)


def _log_scale_grad(r: Tensor, grad: Tensor, clamp: float) -> Tensor:
    """The gradient of ``grad · log_scale_sum(r)`` for ``r``, by autograd on that definition."""
    with torch.enable_grad():
        leaf = r.detach().requires_grad_(True)
        total = log_scale_sum(leaf, clamp)
    return torch.autograd.grad(total, leaf, grad.to(total.dtype))[0]


def _apply_1x1_(x: Tensor, weight: Tensor, chunks: Sequence[slice], out: Optional[Tensor] = None) -> Tensor:
    """``weight · x`` at every pixel, ``(C, C)`` on ``(N, C, h, w)``, a region of samples at a time into ``out``
    (``x`` itself if ``None``): one region's temporary at a time."""
    out = x if out is None else out
    kernel = weight.to(x.dtype)[:, :, None, None]
    for samples in chunks:
        out[samples] = F.conv2d(x[samples], kernel)
    return out


@torch.no_grad()
def forward_regions(regions: Regions, net: "AffineParameterNet", x: Tensor, parts: Sequence[Tensor], weight: Tensor,
                    kwargs_for: Callable[[Tensor], dict], *, out: Tensor,
                    fold_mean: Optional[Callable[[Tensor, Optional[Tuple[slice, slice]]], None]] = None,
                    sum_log_scale: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """The coupling's no-grad forward, region by region: ``(y_k, Σ s per sample or None)``.

    ``out``: where ``y_k`` is written; it may be ``x`` itself, since F never reads ``x`` and each tile of
    ``x`` is read before its own tile of ``y`` is written. ``kwargs_for(r)``: the affine op's settings for
    the whole level's ``r`` (a tile's are cut from them). ``fold_mean(mean, region)`` takes each tile's
    batch mean as it comes, or the mean given to the op (``region`` ``None`` for the whole level), so no
    level-sized mean is assembled.
    ``sum_log_scale``: also sum the clamped log-scale per sample (NOTE [log-det without volume normalisation]).
    """
    log_scale = None
    for rows, cols in regions.tiles(x):
        window = regions.layout.window(rows, cols, regions.net_size)
        rt, _ = _network(regions, net, parts, window, x)
        r, t = rt.chunk(2, dim=1)
        whole = Regions.whole(x, rows, cols)
        kwargs = kwargs_for(r) if whole else _tile_kwargs(kwargs_for(r), rows, cols)
        if sum_log_scale:
            s = log_scale_sum(r, kwargs["clamp"])
            log_scale = s if log_scale is None else log_scale + s
        # r is not read again: the clamped log-scale waits over it (NOTE [kept between the passes] in kernels/reference.py)
        if whole:  # into out directly, then the 1x1 conv over it
            a = out
            mean = kernels.affine_coupling_into(x, r, t, out=a, scratch=r, **kwargs)
        else:
            a = _tile_of(x, rows, cols, dtype=out.dtype)  # x is not ours to overwrite
            mean = kernels.affine_coupling_into(a, r, t, out=a, scratch=r, **kwargs)
        mean = kwargs["running_mean"] if mean is None else mean  # a given mean (synchronised, or eval's) comes back
        if mean is not None and fold_mean is not None:  # NOTE [running mean updated once per step]
            fold_mean(mean, None if whole else (rows, cols))
        del rt, r, t, mean
        if whole:
            _apply_1x1_(a, weight, regions.chunks(a))
        else:
            out[..., rows, cols] = _apply_1x1_(a, weight, [slice(None)])
        del a
    return out, log_scale


# NOTE [placeholder outputs]
# The engine backpropagates through a block's local outputs and never reads
# their values (InvertibleModule.reconstruct), so the op's local outputs are
# views of its inputs (y_k, equal to W · affine(x; r, t) until its storage is
# reused, and the conditioning levels) whose backward is the exact backward of
# the block. x_k is a leaf on u's storage, filled during backward, and F's
# output exists for one tile at a time, made inside backward. Per tile: F without a
# graph (NOTE [regions]), dW += g·uᵀ (u read before it becomes x), grad_a =
# Wᵀg, the affine backward rebuilds x and gives grad_x, grad_r, grad_t over
# its operands (NOTE [backward into the operands] in kernels/reference.py;
# CVN's batch mean is per pixel, so a tile's is exact), and grad_(r, t) goes
# back through F (its window_backward) into the conditioning windows and F's
# weights. x and grad_x are written back into u's and (where the engine
# allows) g's storage. The conditioning levels are outputs of the op too, so
# their incoming gradients come in here and the windows' gradients add into
# them (into a copy where the engine does not allow overwriting): no
# zero-filled buffer and no second sum of a whole level.
@dataclass(frozen=True)
class _Options:
    regions: Regions
    net: "AffineParameterNet"
    writable: Tuple[bool, ...]  # per input: x's gradient, then each conditioning level's
    affine_kwargs: dict
    input_final: bool = False  # x's storage holds x already (rebuilt first, or exact): u is recomputed per tile


def _gradient_into(g: Optional[Tensor], like: Tensor, writable: bool) -> Tensor:
    """Where a level's gradient is accumulated: ``g`` itself if it may be overwritten, else a copy (zeros without ``g``)."""
    if g is None:
        return torch.zeros_like(like)
    if writable and g.dtype == like.dtype and g.is_contiguous() and not g.requires_grad:
        return g
    return g.to(like.dtype, copy=True, memory_format=torch.contiguous_format)


class _RegionLevel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options, x, w_in, w_out, weight, y, log_scale, *parts):  # type: ignore[override]
        ctx.options = options
        ctx.u = x.detach()  # u until backward turns it into x; x itself when options.input_final
        ctx.save_for_backward(weight, *parts)
        ctx.has_log_scale = log_scale is not None
        extra = () if log_scale is None else (log_scale.view_as(log_scale),)
        return (y.view_as(y), *(p.view_as(p) for p in parts), *extra)

    @staticmethod
    def backward(ctx, g, *grad_levels):  # type: ignore[override]
        grad_log_scale = None
        if ctx.has_log_scale:
            *grad_levels, grad_log_scale = grad_levels
        weight, *parts = ctx.saved_tensors
        options: _Options = ctx.options
        regions, net = options.regions, options.net
        u = ctx.u
        del ctx.u
        need_parts = ctx.needs_input_grad[7:]
        # The gradients' buffers are made once the first tile's F has run: untiled, its regions' temporaries
        # come and go before the buffers (a copy where the engine does not allow overwriting) exist.
        grad_x: Optional[Tensor] = None
        grad_parts: Optional[List[Optional[Tensor]]] = None
        grad_w_in = grad_w_out = None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[4] else None
        weight_t = weight.detach().T
        for rows, cols in regions.tiles(u):
            window = regions.layout.window(rows, cols, regions.net_size)
            rt, kept = _network(regions, net, parts, window, u, need_parts)
            r, t = rt.chunk(2, dim=1)
            whole = Regions.whole(u, rows, cols)
            kwargs = options.affine_kwargs if whole else _tile_kwargs(options.affine_kwargs, rows, cols)
            log_scale_grad = None if grad_log_scale is None else _log_scale_grad(r, grad_log_scale, kwargs["clamp"])
            if grad_x is None:
                grad_x = _gradient_into(g, u, options.writable[0])
                del g
            if options.input_final:  # u = affine(x) again on this tile; x stays as it is
                a = torch.empty_like(u[..., rows, cols], memory_format=torch.contiguous_format)
                kernels.affine_coupling_into(u[..., rows, cols], r, t, out=a, scratch=a, **kwargs)
            else:
                a = _tile_of(u, rows, cols)
            g_tile = _tile_of(grad_x, rows, cols)  # still the incoming gradient on this tile; ours to overwrite
            chunks = regions.chunks(g_tile) if whole else [slice(None)]
            for samples in chunks:
                if grad_weight is not None:  # y = W a at every pixel: dW = sum over pixels of g aᵀ
                    g_n, a_n = g_tile[samples].transpose(0, 1).flatten(1), a[samples].transpose(0, 1).flatten(1)
                    grad_weight += g_n @ a_n.T
                    del g_n, a_n
                g_tile[samples] = F.conv2d(g_tile[samples], weight_t.to(g_tile.dtype)[:, :, None, None])
            # NOTE [backward into the operands] (kernels/reference.py): x over a, grad_x over grad_a, grad_r, grad_t over r, t.
            kernels.affine_coupling_bwd_into(a, r, t, g_tile, out=(a, g_tile, r, t), **kwargs)
            if log_scale_grad is not None:  # r holds its gradient now
                r.add_(log_scale_grad)
                del log_scale_grad
            if not whole:
                if not options.input_final:
                    u[..., rows, cols] = a
                grad_x[..., rows, cols] = g_tile
            del a, g_tile, r, t
            if grad_parts is None:
                grad_parts = [_gradient_into(gp, p, w) if need else None
                              for gp, p, w, need in zip(grad_levels, parts, options.writable[1:], need_parts)]
                del grad_levels
            grads = _network_backward(regions, net, parts, window, rt, kept, grad_parts, u)
            del rt, kept
            grad_w_in = grads[0] if grad_w_in is None else grad_w_in.add_(grads[0])
            grad_w_out = grads[1] if grad_w_out is None else grad_w_out.add_(grads[1])
            del grads
        return (None, grad_x, grad_w_in, grad_w_out, grad_weight, None, None, *grad_parts)


def _network_backward(regions: Regions, net: "AffineParameterNet", parts: Sequence[Tensor], window: TileWindow,
                      grad_rt: Tensor, kept: tuple, grad_parts: Sequence[Optional[Tensor]], like: Tensor):
    """F's backward on one tile, region by region, the kept region first (NOTE [regions]): adds the conditioning
    windows' gradients into ``grad_parts`` (``None`` where not wanted); returns ``(grad_w_in, grad_w_out)``."""
    chunks = regions.chunks(like)
    need_parts = [g is not None for g in grad_parts]
    grad_w_in = grad_w_out = None
    state, window_input = kept
    del kept
    for samples in [chunks[-1], *chunks[:-1]]:
        if window_input is None:
            with torch.enable_grad():
                window_input = _conditioning(regions, parts, window, samples, need_parts)
        cond, leaves, indices = window_input
        del window_input
        want = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
        if state is None:
            state = net.window_state(cond.detach(), window.input_pad)
        into = None if grad_w_in is None else (grad_w_in, grad_w_out)
        grad_cond, grad_w_in, grad_w_out = net.window_backward(state, cond.detach(), grad_rt[samples], window.input_pad,
                                                               window.hidden_pad, window.stride, need_cond=bool(want), into=into)
        state = window_input = into = None
        if want:
            grads = torch.autograd.grad(cond, [leaves[i] for i in want], grad_cond)
            for i, grad in zip(want, grads):
                grad_parts[i][samples][(..., *indices[i])] += grad
            del grads
        del cond, leaves, grad_cond
    return grad_w_in, grad_w_out


def transformed_level(regions: Regions, net: "AffineParameterNet", y: Tensor, parts: Sequence[Tensor], weight: Tensor,
                      inverse_weight: Tensor, *, writable: Tuple[bool, ...], affine_kwargs: dict,
                      rebuild_first: bool = False, log_scale: bool = False) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """The coupling's reconstruct, region by region: ``(x, local_outputs)`` (NOTE [placeholder outputs]).

    Args:
        regions: how the coupling is run (NOTE [regions]).
        net: the coupling's network F.
        y: the transformed level's output ``(N, C, H, W)``, detached.
        parts: the conditioning levels, leaves (requiring grad where their gradient is wanted).
        weight: ``W`` with its graph to the 1×1 conv's parameters; ``inverse_weight``: ``W⁻¹``.
        writable: whether ``y``'s storage may be overwritten, then whether the incoming gradient of
            ``y`` and of each conditioning level may be.
        affine_kwargs: ``volume_norm``, ``clamp``, ``running_mean``, ``backend`` of the affine op.
        rebuild_first: rebuild ``x`` now (one more pass of F, without grad), so its values can be
            checked before the local backward (:class:`~pyramidflow.engine.Writable`).
        log_scale: also give Σ s per sample ``(N,)`` as a last local output (the log-det without VN: one
            more pass of F now, without grad, for its value).

    Returns:
        ``x``, a leaf filled now or during the local backward, and the local outputs ``(y_local, *parts_local)``
        (and Σ s), differentiable in ``x``, the conditioning levels, F's weights and ``weight``.
    """
    storage_writable, gradients = writable[0], tuple(writable[1:])
    inverse = inverse_weight.detach()
    total = None
    with torch.no_grad():
        u = y if storage_writable else torch.empty_like(y)
        for rows, cols in regions.tiles(y):
            if Regions.whole(y, rows, cols):
                _apply_1x1_(y, inverse, regions.chunks(y), out=u)
            else:
                u[..., rows, cols] = _apply_1x1_(y[..., rows, cols], inverse, [slice(None)], out=torch.empty_like(y[..., rows, cols]))
            if rebuild_first:  # x now, over u: F runs once more per tile, in backward
                window = regions.layout.window(rows, cols, regions.net_size)
                rt, _ = _network(regions, net, parts, window, y)
                r, t = rt.chunk(2, dim=1)
                u[..., rows, cols] = kernels.affine_coupling_inverse(u[..., rows, cols], r, t, **_tile_kwargs(affine_kwargs, rows, cols))[0]
                del rt, r, t
            if log_scale:
                rt, _ = _network(regions, net, parts, regions.layout.window(rows, cols, regions.net_size), y)
                s = log_scale_sum(rt.chunk(2, dim=1)[0], affine_kwargs["clamp"])
                total = s if total is None else total + s
                del rt, s
    x = u.detach().requires_grad_(True)
    options = _Options(regions, net, gradients, affine_kwargs, input_final=rebuild_first)
    return x, _RegionLevel.apply(options, x, net.conv_in.weight, net.conv_out.weight, weight, y, total, *parts)


def from_input(regions: Regions, net: "AffineParameterNet", x: Tensor, parts: Sequence[Tensor], weight: Tensor,
               affine_kwargs: dict) -> Tuple[Tensor, ...]:
    """The local outputs ``(y_local, *parts_local)`` from the exact input ``x`` (a leaf): the rebuild of an anchor.

    The forward runs region by region without grad; backward is :class:`_RegionLevel`'s with ``x`` as
    the final input (``u`` recomputed per tile), so its gradients are those at ``x`` and no whole-level
    graph exists (NOTE [rebuilding in backward] in :mod:`pyramidflow.engine._state`).
    """
    x_in = x.detach()
    out = torch.empty_like(x_in, dtype=torch.promote_types(x_in.dtype, net.conv_in.weight.dtype))
    y, _ = forward_regions(regions, net, x_in, parts, weight.detach(), lambda r: affine_kwargs, out=out)
    options = _Options(regions, net, (False,) * (1 + len(parts)), affine_kwargs, input_final=True)
    return _RegionLevel.apply(options, x, net.conv_in.weight, net.conv_out.weight, weight, y, None, *parts)
