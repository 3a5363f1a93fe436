"""Pyramid coupling blocks: one level transformed, conditioned on its neighbour level(s).

Each block takes the whole pyramid (a tuple of L level tensors), changes one
level and passes the others through as the very same tensor objects (Sec. 3.2
of the PyramidFlow paper):

* :class:`TwoLevelCoupling` ``"up"``: level ``start`` from level ``start+1``
  (nearest-upsampled to level ``start``'s size before the network);
* :class:`TwoLevelCoupling` ``"down"``: level ``start+1`` from level ``start``
  (the network runs at level ``start``'s resolution and its outputs are
  nearest-resized to level ``start+1``: "interpolate after");
* :class:`ThreeLevelCoupling`: level ``start+1`` from levels ``start`` and
  ``start+2``, both nearest-resized to its size and concatenated.

The affine transform (soft clamp, volume normalisation, ``exp(s)·x + t``) is
the op of :mod:`pyramidflow.kernels`; an invertible 1×1 conv follows it.

notation: ``k`` the transformed level, ``r`` and ``t`` the raw log-scale and
the shift from the network F, ``s`` the clamped volume-normalised log-scale,
``W`` the 1×1 conv; ``y_k = W · (exp(s) · x_k + t)``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..engine.block import CallContext, InvertibleModule, LogDet, Tensors, Writable
from .conv1x1 import InvertibleConv1x1
from .network import AffineParameterNet
from .coupling_regions import Regions, forward_regions, from_input, log_scale_sum, transformed_level
from .tiles import TileLayout, check_tile_alignment, check_tile_support, check_tile_unsynchronised
from .volume_norm import VolumeNorm

__all__ = ["AffineParameterNet", "PyramidCoupling", "TwoLevelCoupling", "ThreeLevelCoupling", "DIRECTIONS"]

DIRECTIONS = ("up", "down")


def _leaf(y: Tensor) -> Tensor:
    """A detached, copy-free leaf of ``y`` that requires grad."""
    return y.detach().requires_grad_(True)


def _resized(parts: Sequence[Tensor], size: Optional[Tuple[int, int]]) -> Tensor:
    """F's input: each part nearest-resized to ``size`` (``None``: kept), concatenated over channels."""
    resized = [p if size is None or tuple(p.shape[-2:]) == tuple(size) else F.interpolate(p, size=size, mode="nearest") for p in parts]
    return resized[0] if len(resized) == 1 else torch.cat(resized, dim=1)


def _autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (never for ``meta``, where the planner counts bytes)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


# NOTE [volume preserving over the batch]
# In training, volume normalisation makes Σ s = 0 over the batch and the 1×1
# conv has |det W| = 1, so the map of the whole batch has log-determinant
# exactly 0 (a single sample's need not be 0): blocks return logdet=None and
# the engine carries no log-det at all. In eval the running mean is
# subtracted instead; the block is then volume preserving only on average,
# which is how the method defines it.
#
# NOTE [log-det without volume normalisation]
# With volume_norm=None (the paper's "without VN" ablation) nothing is
# subtracted from s and the 1×1 conv's w_s is free, so the block changes
# volume: per sample, logdet = Σ_{C,H,W} s + H·W·log|det W|. The block then
# returns that (N,) tensor from forward (minus it from inverse, and with its
# graph from reconstruct), and the engine carries it.
class PyramidCoupling(InvertibleModule):
    """Base of the pyramid couplings: affine transform of one level, then a 1×1 conv.

    Subclasses say which level they transform (``self.level``) and how the
    network's ``(r, t)`` come from the untouched levels (:meth:`_affine_parameters`).

    The block returns ``logdet=None``: see NOTE [volume preserving over the batch]
    (with ``volume_norm=None``, a log-det: NOTE [log-det without volume normalisation]).

    Args:
        level: the transformed level k.
        cond_levels: the levels F reads; they pass through unchanged.
        in_channels: channels of F's input.
        channels: C, channels of every level.
        hidden_channels: F's hidden width; ``None`` for 2C.
        kernel_size: F's kernel size k.
        volume_norm: ``"CVN"``, ``"SVN"``, or ``None`` (no VN: the block returns a log-det,
            NOTE [log-det without volume normalisation]).
        clamp: soft-clamp bound c of the log-scale.
        momentum: running-mean momentum of the volume normalisation.
        conv1x1_init: init of the 1×1 conv, see :class:`InvertibleConv1x1`.
        backend: backend of the affine op, see :mod:`pyramidflow.kernels` (``"auto"``).
        tile: ``None``, or the side T (at the level F runs at: NOTE [tile side]) of the tiles the
            no-grad forward and the rebuild and backward run in (:mod:`.coupling_regions`); T must be a multiple of ``2**level`` of
            every level the block touches, and needs ``volume_norm="CVN"``.
    """

    volume_preserving = True

    def __init__(
        self,
        level: int,
        cond_levels: Tuple[int, ...],
        in_channels: int,
        channels: int,
        hidden_channels: int | None = None,
        kernel_size: int = 7,
        volume_norm: str = "CVN",
        clamp: float = 2.0,
        momentum: float = 0.1,
        conv1x1_init: str = "orthogonal",
        backend: str = "auto",
        tile: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_tile_support(tile, volume_norm, type(self).__name__)
        if channels < 1:
            raise ValueError(f"{type(self).__name__}: channels must be at least 1, got {channels}.")
        if not clamp > 0:
            raise ValueError(f"{type(self).__name__}: clamp must be positive, got {clamp}.")
        self.level = level
        self.cond_levels = tuple(cond_levels)
        self.channels = channels
        self.clamp = float(clamp)
        self.backend = backend
        hidden = 2 * channels if hidden_channels is None else hidden_channels
        self.net = AffineParameterNet(in_channels, channels, hidden, kernel_size)
        self.volume_norm = VolumeNorm(volume_norm, channels, momentum)
        self.volume_preserving = volume_norm is not None
        self.conv = InvertibleConv1x1(channels, init=conv1x1_init, volume_norm=volume_norm is not None)
        self._needed = max((level,) + self.cond_levels) + 1
        check_tile_alignment(tile, self._needed - 1, type(self).__name__, str(self._needed - 1))  # its coarsest level
        self.tile = tile

    def extra_repr(self) -> str:
        tile = "" if self.tile is None else f", tile={self.tile}"
        return f"level={self.level}, cond_levels={self.cond_levels}, clamp={self.clamp}{tile}"

    @property
    def rebuilds_before_backward(self) -> bool:  # type: ignore[override]
        """A tiled coupling can rebuild its input before its local backward (see :class:`~pyramidflow.engine.Writable`)."""
        return self.tile is not None

    def _regions(self, xs: Tensors) -> Regions:
        """How this block runs region by region (NOTE [regions] in :mod:`.coupling_regions`): its tiles (NOTE [tiles and
        halos]; the whole level untiled), the size of F's level, and the samples F runs on at a time."""
        _, before = self._conditioning(xs)
        net_level = self.level if before else self.cond_levels[0]
        halo = 2 * (self.net.conv_in.weight.shape[-1] // 2)
        layout = TileLayout(self.level, net_level, self.cond_levels, halo, self.tile)
        samples = xs[self.level].shape[0] if self.tile is not None else 1
        return Regions(layout, tuple(xs[net_level].shape[-2:]), samples)

    def _region_kwargs(self, xs: Tensors) -> dict:
        """The affine op's settings for the whole level, from a stand-in of ``r``'s shape (no mean with a graph:
        :meth:`_runs_regions`)."""
        if self.volume_norm.training:
            check_tile_unsynchronised(self.tile, self.volume_norm.process_group, type(self).__name__)
        x = xs[self.level]
        r_like = torch.empty((), dtype=self.net.conv_in.weight.dtype, device=x.device).expand(x.shape)
        return self._coupling_kwargs(r_like)

    def _conditioning(self, xs: Tensors) -> Tuple[Tuple[Tensor, ...], bool]:  # pragma: no cover - abstract
        """F's input levels, and whether they are resized to the transformed level before F (else F's output after)."""
        raise NotImplementedError

    def _affine_parameters(self, xs: Tensors) -> Tuple[Tensor, Tensor]:
        """F's ``(r, t)``, each ``(N, C, H_k, W_k)``, under plain autograd."""
        parts, before = self._conditioning(xs)
        target = tuple(xs[self.level].shape[-2:])
        rt = self.net.joint(_resized(parts, target if before else None))
        r, t = (rt if before else _resized((rt,), target)).chunk(2, dim=1)  # "interpolate after"
        return r, t

    def _check(self, xs: Tensors) -> None:
        if len(xs) < self._needed:
            raise ValueError(
                f"{type(self).__name__}: got a pyramid of {len(xs)} levels but this block reads level "
                f"{self._needed - 1}; build the blocks for the pyramid's number of levels."
            )

    def _coupling_kwargs(self, r: Tensor) -> dict:
        return dict(
            volume_norm=self.volume_norm.mode,
            clamp=self.clamp,
            running_mean=self.volume_norm.mean_for(r, self.clamp),
            backend=self.backend,
        )

    def _logdet(self, r: Tensor) -> LogDet:
        """NOTE [log-det without volume normalisation]: ``(N,)``, or ``None`` for a volume-preserving block."""
        return None if self.volume_preserving else self._region_logdet(log_scale_sum(r, self.clamp), r)

    # NOTE [one path per call]
    # Each call chooses its path once, here, from the engine's context of the
    # call (NOTE [call context] in pyramidflow/engine/_state.py): the region
    # executor (.coupling_regions) or the plain autograd ops on whole levels.
    # The regions run where they save memory and can: not on small levels (NOTE
    # [plain where the level is small]), not for a graph being traced or
    # exported (the executor is an autograd Function writing into given
    # tensors, which tracers do not record), not under autocast (the executor
    # runs each op in the operands' dtype), not with grad where F's activation
    # has parameters (its backward gives the gradients of F's two convs only),
    # and in reconstruct not where the volume-norm mean carries a graph the
    # executor does not keep (synchronised over ranks). The forward without a
    # graph (invertible mode's, inference) runs the regions, the forward with
    # one only as the rebuild of an exact input of a tiled block (NOTE
    # [rebuilding in backward]).
    def _runs_regions(self, xs: Tensors, context: CallContext, reconstruct: bool = False) -> bool:
        """Whether this call runs the region executor (NOTE [one path per call])."""
        if self._plain(xs) or context.tracing:
            return False
        if not reconstruct and not context.grad:
            return True
        if self.net.activation_has_parameters() or _autocast_enabled(xs[self.level].device):
            return False
        if reconstruct:
            return not (self.volume_norm.training and self.volume_norm.process_group is not None)
        return self.tile is not None and context.rebuild

    def forward(self, xs: Tensors, context: Optional[CallContext] = None) -> Tuple[Tensors, LogDet]:
        """Transform level ``self.level``; every other level is returned as the same object.

        Args:
            xs: the pyramid, one ``(N, C, H_l, W_l)`` tensor per level.
            context: how the engine calls the block (:class:`~pyramidflow.engine.CallContext`); ``None``:
                a call by hand (``CallContext.now()``).
        """
        self._check(xs)
        context = CallContext.now() if context is None else context
        if self._runs_regions(xs, context):
            return self._region_forward(xs, context)
        k = self.level
        r, t = self._affine_parameters(xs)
        kwargs = self._coupling_kwargs(r)
        y, batch_mean = kernels.affine_coupling(xs[k], r, t, **kwargs)
        # NOTE [running mean updated once per step]; a synchronized mean comes in as `running_mean`.
        self.volume_norm.update(kwargs["running_mean"] if batch_mean is None else batch_mean)
        logdet = self._logdet(r)
        del r, t
        ys = list(xs)
        ys[k] = self.conv(y)
        return tuple(ys), logdet

    @staticmethod
    def _output_level(x: Tensor, dtype: torch.dtype, overwritable: bool) -> Tensor:
        """Where the lean forward writes ``y_k``: over ``x_k`` itself where the engine allows it (``overwritable``)
        and the dtype is kept (NOTE [forward in place] in :mod:`pyramidflow.engine._state`), else a new level."""
        out_dtype = torch.promote_types(x.dtype, dtype)
        return x if out_dtype == x.dtype and overwritable else torch.empty_like(x, dtype=out_dtype)

    # NOTE [plain where the level is small]
    # The region executor exists for the finest level, whose block sets the
    # step's peak: there F's hidden activation is made a region at a time and
    # never kept for the whole batch. A block that neither transforms level
    # 0 nor runs F on it holds a quarter of that level at most, so its whole
    # working set under plain autograd (F's hidden activation for the whole
    # batch, the affine op's graph) stays below the finest block's regions,
    # whatever the batch: it runs the plain ops, a few whole-level calls
    # instead of many small ones, and F's backward reuses the forward's hidden
    # activation instead of computing it again (no rebuild before the local
    # backward either). A tiled block's working set is bounded by a tile
    # instead: it runs the plain ops where every level it touches is
    # (T/2)×(T/2) or less (its own level is one tile: NOTE [tile side] in
    # .tiles), and its tiles otherwise. The bound is half a tile's side
    # because the plain ops hold more per pixel than a tile does: the
    # conditioning levels' gradients come as new whole levels (a tile adds
    # them into their buffers in place), and a "down" block's second conv
    # runs on every pixel (a tile's, with stride 2, on those resizing keeps);
    # at T the planner's peak rose by the difference.
    def _plain(self, xs: Tensors) -> bool:
        """Whether this block runs the plain ops on whole levels (NOTE [plain where the level is small])."""
        if self.tile is not None:
            return all(max(xs[j].shape[-2:]) <= self.tile // 2 for j in (self.level, *self.cond_levels))
        _, before = self._conditioning(xs)
        net_level = self.level if before else self.cond_levels[0]
        return min(self.level, net_level) > 0

    def _region_forward(self, xs: Tensors, context: CallContext) -> Tuple[Tensors, LogDet]:
        """The forward, region by region (:mod:`.coupling_regions`). Without grad the lean forward, writing over ``x_k``
        where the engine allows it (F never reads ``x_k``: NOTE [forward in place]); with grad the rebuild of an
        exact input (an anchor) of a tiled block, whose graph is run by regions too."""
        regions = self._regions(xs)
        parts = [xs[j] for j in self.cond_levels]
        x = xs[self.level]
        ys = list(xs)
        if context.grad:  # buffers are restored by the engine after a rebuild: no update
            local = from_input(regions, self.net, x, parts, self.conv.weight(), self._region_kwargs(xs))
            for j, y_local in zip((self.level, *self.cond_levels), local):
                ys[j] = y_local
            return tuple(ys), None
        size = tuple(x.shape[-2:])

        def fold_mean(mean: Tensor, region: Optional[Tuple[slice, slice]]) -> None:
            self.volume_norm.update(mean, region=region, size=None if region is None else size)  # NOTE [running mean updated once per step]

        base = self._region_kwargs(xs) if self.tile is not None else None
        kwargs_for = (lambda r: base) if base is not None else self._coupling_kwargs  # untiled: a synchronised mean needs r
        out = self._output_level(x, self.net.conv_in.weight.dtype, context.may_overwrite(self.level))
        ys[self.level], log_scale = forward_regions(regions, self.net, x, parts, self.conv.weight(), kwargs_for, out=out,
                                                    fold_mean=fold_mean, sum_log_scale=not self.volume_preserving)
        return tuple(ys), self._region_logdet(log_scale, x)

    def _region_logdet(self, log_scale: Optional[Tensor], level: Tensor) -> LogDet:
        """NOTE [log-det without volume normalisation] from the regions' Σ s ``(N,)`` (``None``: volume preserving)."""
        if log_scale is None:
            return None
        return log_scale + level.shape[-2] * level.shape[-1] * self.conv.log_abs_det().to(log_scale.dtype)

    def inverse(self, ys: Tensors) -> Tuple[Tensors, LogDet]:
        """Undo :meth:`forward`: undo ``W``, recompute ``(r, t)`` from the untouched levels, undo the affine map."""
        self._check(ys)
        k = self.level
        r, t = self._affine_parameters(ys)
        x, _ = kernels.affine_coupling_inverse(self.conv.inverse(ys[k]), r, t, **self._coupling_kwargs(r))
        xs = list(ys)
        xs[k] = x
        logdet = self._logdet(r)
        return tuple(xs), None if logdet is None else -logdet

    def reconstruct(self, ys: Tensors, writable: Optional[Writable] = None,
                    context: Optional[CallContext] = None) -> Tuple[Tensors, Tensors, LogDet]:
        """Fused reconstruct-and-backward path: the network F runs once (the generic path runs it twice).

        Args:
            ys: the block's outputs, detached.
            writable: what the engine lets the block overwrite (:class:`~pyramidflow.engine.Writable`);
                ``None``: nothing.
            context: how the engine calls the block (:class:`~pyramidflow.engine.CallContext`); ``None``:
                a call by hand (``CallContext.now(rebuild=True)``).

        Returns:
            ``(xs, ys_local, logdet_local)`` as :meth:`InvertibleModule.reconstruct` (``logdet_local``
            is ``None`` for a volume-preserving block).
        """
        # NOTE [fused pyramid reconstruct]
        # The untouched levels are the same in input and output, so they become
        # leaves that require grad and F runs once on them. The region executor
        # (NOTE [placeholder outputs] in .coupling_regions) keeps no hidden activation of F
        # and no (r, t) beyond a region, never computes y_k again, and reuses the
        # storages the engine allows; x_k is filled during the local backward. The
        # plain path (NOTE [one path per call]) runs F with grad on whole levels:
        # its (r, t) serve twice, x_k rebuilt from u = W⁻¹ y_k and the local graph
        # of y_k = W · affine(x_k; r, t). The untouched leaves are returned as the
        # very objects in both tuples, so the engine routes their gradient
        # directly. The running mean is not touched (NOTE [running mean updated
        # once per step]); the batch mean of VN is recomputed from r, exactly.
        self._check(ys)
        context = CallContext.now(rebuild=True) if context is None else context
        k = self.level
        leaves = [_leaf(y) if i != k else y.detach() for i, y in enumerate(ys)]
        flags = (False, False) if writable is None else (writable.outputs[k], writable.gradients[k])
        weight, inverse = self.conv.weight_and_inverse()  # every path needs both
        xs, ys_local = list(leaves), list(leaves)
        if self._runs_regions(ys, context, reconstruct=True):
            gradients = tuple(False if writable is None else writable.gradients[j] for j in self.cond_levels)
            xs[k], local = transformed_level(
                self._regions(ys), self.net, leaves[k], [leaves[j] for j in self.cond_levels], weight.to(ys[k].dtype),
                inverse, writable=(*flags, *gradients), affine_kwargs=self._region_kwargs(ys),
                rebuild_first=writable is not None and writable.rebuild_first, log_scale=not self.volume_preserving,
            )
            for j, y_local in zip((k, *self.cond_levels), local):
                ys_local[j] = y_local
            return tuple(xs), tuple(ys_local), self._region_logdet(local[-1] if not self.volume_preserving else None, ys[k])
        r, t = self._affine_parameters(tuple(leaves))
        kwargs = self._coupling_kwargs(r)
        logdet = self._logdet(r)
        with torch.no_grad():
            y_affine = self.conv.apply(ys[k].detach(), inverse)
        if writable is not None and writable.rebuild_first:  # x is read before the local backward: made now
            with torch.no_grad():
                xs[k] = _leaf(kernels.affine_coupling_inverse(y_affine, r, t, **kwargs)[0])
            y_affine_local, _ = kernels.affine_coupling(xs[k], r, t, **kwargs)
        else:  # x may be filled during the local backward (the Triton op's lazy reconstruction)
            xs[k], y_affine_local = kernels.affine_coupling_reconstruct(y_affine, r, t, **kwargs)
        ys_local[k] = self.conv.apply(y_affine_local, weight)
        return tuple(xs), tuple(ys_local), logdet


class TwoLevelCoupling(PyramidCoupling):
    """Coupling of the adjacent levels ``(start, start+1)``: one transformed from the other.

    Args:
        start: the finer level of the pair.
        direction: ``"up"`` transforms level ``start`` from the coarser level
            ``start+1`` (nearest-upsampled before F); ``"down"`` transforms level
            ``start+1`` from level ``start`` (F at level ``start``'s resolution, its
            outputs nearest-resized after: "interpolate after").
        channels: C, channels of every level.
        **kwargs: the remaining settings of :class:`PyramidCoupling`.
    """

    def __init__(self, start: int, direction: str, channels: int, **kwargs) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"TwoLevelCoupling: direction must be one of {DIRECTIONS}, got {direction!r}.")
        if start < 0:
            raise ValueError(f"TwoLevelCoupling: start must be a level index >= 0, got {start}.")
        level, cond = (start, start + 1) if direction == "up" else (start + 1, start)
        super().__init__(level, (cond,), channels, channels, **kwargs)
        self.direction = direction

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, " + super().extra_repr()

    def _conditioning(self, xs: Tensors) -> Tuple[Tuple[Tensor, ...], bool]:
        # "down": F at the finer level's resolution, its output interpolated after
        return (xs[self.cond_levels[0]],), self.direction == "up"


class ThreeLevelCoupling(PyramidCoupling):
    """Coupling of the levels ``(start, start+1, start+2)``: the middle one from both neighbours.

    F reads ``concat(resize(x_start), resize(x_{start+2}))`` at level
    ``start+1``'s size, 2C channels.

    Args:
        start: the finest of the three levels.
        channels: C, channels of every level.
        **kwargs: the remaining settings of :class:`PyramidCoupling`.
    """

    def __init__(self, start: int, channels: int, **kwargs) -> None:
        if start < 0:
            raise ValueError(f"ThreeLevelCoupling: start must be a level index >= 0, got {start}.")
        super().__init__(start + 1, (start, start + 2), 2 * channels, channels, **kwargs)

    def _conditioning(self, xs: Tensors) -> Tuple[Tuple[Tensor, ...], bool]:
        return tuple(xs[j] for j in self.cond_levels), True
