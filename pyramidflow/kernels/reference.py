"""PyTorch reference of every kernel op: the single definition of their maths.

The Triton kernels are tested against these functions, and CPU users run them.
They are written to be read first and fast second; they never import triton.

notation: ``x`` the level being transformed, ``r`` the raw log-scale and ``t``
the shift from the coupling network (all ``(N, C, H, W)``, same shape),
``s`` the clamped, volume-normalised log-scale, ``y = exp(s) * x + t``.

Volume normalisation (VN) subtracts a mean of the clamped log-scale so that
the block preserves volume over the batch (method note, "volume normalisation"):

* ``"CVN"``: mean over batch and channel, per pixel; the mean has shape ``(1, 1, H, W)``.
* ``"SVN"``: mean over batch and space, per channel; the mean has shape ``(1, C, 1, 1)``.
* ``None``: no normalisation; the block then has a log-determinant ``sum(s)`` per sample.

In training the batch mean is used (and returned, detached, so that the caller
can update its running mean); in eval the caller passes ``running_mean``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor


__all__ = [
    "VOLUME_NORMS",
    "soft_clamp",
    "volume_norm_dims",
    "log_scale",
    "scale_shift",
    "scale_shift_inverse",
    "affine_coupling",
    "affine_coupling_into",
    "affine_coupling_inverse",
    "affine_coupling_reconstruct",
    "affine_coupling_bwd",
    "affine_coupling_bwd_into",
]

VOLUME_NORMS = (None, "CVN", "SVN")
_TWO_OVER_PI = 2.0 / math.pi  # the reference implementation rounds this to 0.636


def soft_clamp(r: Tensor, clamp: float) -> Tensor:
    """Smoothly bound ``r`` to ``(-clamp, clamp)``: ``clamp * (2/pi) * atan(r / clamp)``."""
    return _soft_clamp_of_ratio(r / clamp, clamp)


def _soft_clamp_of_ratio(ratio: Tensor, clamp: float, out: Optional[Tensor] = None) -> Tensor:
    """:func:`soft_clamp` from ``ratio = r / clamp``, into ``out`` (which may be ``ratio``: no graph) if given."""
    return torch.mul(torch.atan(ratio, out=out), clamp * _TWO_OVER_PI, out=out)


def volume_norm_dims(volume_norm: Optional[str]) -> Tuple[int, ...]:
    """Dimensions of an ``(N, C, H, W)`` log-scale that the VN mean runs over."""
    if volume_norm == "CVN":
        return (0, 1)
    if volume_norm == "SVN":
        return (0, 2, 3)
    if volume_norm is None:
        return ()
    raise ValueError(f"volume_norm must be one of {VOLUME_NORMS}, got {volume_norm!r}.")


def log_scale(
    r: Tensor,
    *,
    volume_norm: Optional[str],
    clamp: float,
    running_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The clamped, volume-normalised log-scale ``s`` and the detached batch mean.

    Args:
        r: raw log-scale, ``(N, C, H, W)``.
        volume_norm: ``"CVN"``, ``"SVN"`` or ``None``.
        clamp: soft-clamp bound ``c``.
        running_mean: ``None`` to normalise with the batch mean (training);
            otherwise the mean to subtract (eval), broadcastable to ``r``.

    Returns:
        ``(s, batch_mean)``; ``batch_mean`` is ``None`` in eval or without VN.
    """
    dims = volume_norm_dims(volume_norm)
    s = soft_clamp(r, clamp)
    if not dims:
        return s, None
    if running_mean is not None:
        return s - running_mean, None
    mean = s.mean(dim=dims, keepdim=True)  # the gradient flows through the batch mean
    return s - mean, mean.detach()


def scale_shift(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """The affine map itself, from a log-scale already clamped and normalised: ``exp(s) * x + t``."""
    return _affine(torch.exp(s), x, t)


def scale_shift_inverse(y: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Inverse of :func:`scale_shift`: ``(y - t) * exp(-s)``."""
    return _affine_inverse(torch.exp(s), y, t)


def _affine(scale: Tensor, x: Tensor, t: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``scale * x + t``; into ``out`` (which may be ``x``: no graph) if given. Two roundings, never a fused
    multiply-add: the lean forward's output is bit for bit autograd's (the running means are compared exactly)."""
    if out is None:
        return scale * x + t
    return torch.mul(scale, x, out=out).add_(t)


# NOTE [inverse in float32]
# The inverse rebuilds a block's input, and its rounding error is what invertible
# backward carries from block to block (reconstruction drift). In 16-bit (a state
# in bfloat16 or float16, as under autocast) `(y - t) / scale` would round twice
# at 8 or 11 bits; computed in float32 and rounded once to the result dtype, the
# rebuilt input is as close to the true one as that dtype allows. The forward map
# keeps the operands' dtype: it is what autograd under the same autocast computes.
def _affine_inverse(scale: Tensor, y: Tensor, t: Tensor) -> Tensor:
    dtype = torch.promote_types(torch.promote_types(scale.dtype, y.dtype), t.dtype)
    if dtype in (torch.bfloat16, torch.float16):
        return ((y.float() - t.float()) / scale.float()).to(dtype)
    return (y - t) / scale


def affine_coupling(
    x: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Forward of the coupling's affine transform: ``y = exp(s) * x + t``.

    Returns:
        ``(y, batch_mean)`` as in :func:`log_scale`.
    """
    s, mean = log_scale(r, volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    return _affine(torch.exp(s), x, t), mean


def affine_coupling_inverse(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Inverse of :func:`affine_coupling`: ``x = (y - t) * exp(-s)``."""
    s, mean = log_scale(r, volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    return _affine_inverse(torch.exp(s), y, t), mean


def affine_coupling_reconstruct(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The engine's fused path for the affine transform: ``x`` from ``y``, and a local graph.

    ``r`` and ``t`` carry the graph of the coupling network (evaluated once).

    Returns:
        ``(x, y_local)``: ``x`` a leaf that requires grad, and ``y_local``
        (equal to ``y``) as a differentiable function of ``x``, ``r`` and ``t``.
        The engine reads ``x`` only after backpropagating through
        ``y_local``, so a fused kernel may fill ``x`` during that backward.
    """
    # The scale is computed once, with its graph, and serves both directions.
    s, _ = log_scale(r, volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    scale = torch.exp(s)
    with torch.no_grad():
        x = _affine_inverse(scale, y, t)
    x.requires_grad_(True)
    return x, _affine(scale, x, t)


def _promote(*tensors: Tensor) -> torch.dtype:
    return functools.reduce(torch.promote_types, (x.dtype for x in tensors))


def affine_coupling_bwd(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    grad_y: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reconstruct ``x`` from ``y`` and backpropagate ``grad_y``, written out by hand.

    The maths the fused backward kernel implements, in one pass over memory:
    ``grad_x = g * exp(s)``, ``grad_t = g``, ``grad_s = g * (y - t)`` (no need
    for ``x``), then through the batch mean (training VN only):
    ``grad_c = grad_s - mean(grad_s)`` over the VN dimensions, and through the
    clamp: ``grad_r = grad_c * (2/pi) / (1 + (r/c)^2)``. Written once, in
    :func:`affine_coupling_bwd_into`; this allocates the results.

    Returns:
        ``(x, grad_x, grad_r, grad_t)``.
    """
    # the dtypes the eager expressions give: x = (y - t) exp(-s), grad_x = g exp(s), grad_r = g (y - t) clamp'(r)
    x = torch.empty_like(y, dtype=_promote(y, t, r))
    grad_x = torch.empty_like(grad_y, dtype=_promote(grad_y, r))
    grad_r = torch.empty_like(r, dtype=_promote(grad_y, y, t, r))
    grad_t = torch.empty_like(grad_y)
    affine_coupling_bwd_into(
        y, r, t, grad_y, out=(x, grad_x, grad_r, grad_t), volume_norm=volume_norm, clamp=clamp, running_mean=running_mean
    )
    return x, grad_x, grad_r, grad_t


# NOTE [backward into the operands]
# Invertible backward holds y (here W^-1 of the block output), r and t (the
# network's output) and g only to turn them into x, grad_r, grad_t and grad_x:
# each result may take the storage of the operand it replaces. The work runs
# over slices (NOTE [slices of the reference ops]), and a slice's operands are
# all read before any of its results is written, so `out` may alias the
# operands element for element (x over y, grad_x over grad_y, grad_r over r,
# grad_t over t). A batch mean (training VN) needs every sample first: a
# pass sums the clamped r and grad_s, then the pass that writes (NOTE [kept
# between the passes]: the first pass writes only where a result goes).
#
# NOTE [slices of the reference ops]
# The no-grad ops work one slice at a time: a band of rows (CVN) or a run of
# channels (SVN, none) of every sample, cut along a dimension the VN mean
# keeps, so that each slice's sum is complete: the batch mean is the one
# autograd's `mean` computes, bit for bit (the modes' running means are
# compared exactly). A slice's temporaries are two slice-sized tensors at
# most where the op's tensors share one dtype (the scale and the divisor of
# the clamp's derivative; in the first pass the clamp and g (y - t): NOTE
# [kept between the passes]) and four with mixed dtypes (y - t and grad_s as
# well), so slices of 1/8 of a large level keep them to 1/4 of it (1/2; a
# slice is at least one row or channel). Each slice costs about a dozen ops
# whatever its size, so a slice is not cut below _SLICE_BYTES where the
# tensor allows: a tensor under 16 MiB (a tile, a coarse level, every level
# at 128 px) runs in 2 MiB slices or whole, with at most 4 MiB of
# temporaries (8 MiB with mixed dtypes), a bound in bytes rather than a
# fraction. Those never set a step's peak: at 64 px
# (tests/model/test_step_memory.py), where a whole step peaks at 2-3 MiB,
# invertible mode measures 0.69 of checkpoint mode's peak with whole tensors
# as with eighths, and `pyramidflow plan --size 1024` gives the same peaks.
# The number of slices does not grow with the batch, so the planner's meta
# step runs them all (no NOTE [samples on meta] shortcut is needed).
_SLICE_FRACTION = 8  # a slice holds at most 1/8 of a tensor, ...
_SLICE_BYTES = 2 * 2**20  # ... unless that is less than this (and at least one row or channel)


@dataclass(frozen=True)
class _Slice:
    """Indices ``start:start + length`` along dimension ``dim`` of an ``(N, C, H, W)`` tensor."""

    dim: int
    start: int
    length: int

    def of(self, x: Tensor) -> Tensor:
        """This slice of ``x``, as one view (one op)."""
        size = list(x.shape)
        size[self.dim] = self.length
        return x.as_strided(size, x.stride(), x.storage_offset() + self.start * x.stride(self.dim))

    def of_mean(self, mean: Tensor) -> Tensor:
        """The part of a VN mean (``(1, 1, H, W)`` CVN, ``(1, C, 1, 1)`` SVN, or a scalar) that this slice uses."""
        return self.of(mean) if mean.dim() == 4 and mean.shape[self.dim] > 1 else mean


def _slices(like: Tensor, dims: Tuple[int, ...]) -> Iterator[_Slice]:
    """Slices covering ``like`` along a dimension the VN mean over ``dims`` keeps (NOTE [slices of the reference ops])."""
    dim = 2 if 1 in dims else 1
    size = like.shape[dim]
    unit = max(1, like.numel() // max(1, size) * like.element_size())  # bytes of one row or channel
    step = max(1, min(size, max(size // _SLICE_FRACTION, _SLICE_BYTES // unit)))
    for start in range(0, size, step):
        yield _Slice(dim, start, min(step, size - start))


def _clamped(r: Tensor, clamp: float) -> Tensor:
    """:func:`soft_clamp` of ``r`` without a graph, as a new tensor."""
    ratio = torch.div(r, clamp)
    return _soft_clamp_of_ratio(ratio, clamp, out=ratio)


def _batch_means(
    r: Tensor,
    dims: Tuple[int, ...],
    clamp: float,
    grad_operands: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    keep: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Batch means over ``dims`` of the clamped ``r`` and, given ``(y, t, grad_y)``, of ``grad_s = g (y - t)``:
    one pass over the slices, each slice's sum complete (NOTE [slices of the reference ops]). ``keep``:
    ``(clamped, shifted)``, where the clamped ``r`` and ``y - t`` are kept for the pass that writes (``None``
    entries: not kept; NOTE [kept between the passes])."""
    clamped_into, shifted_into = (None, None) if keep is None else keep
    shape = [1 if d in dims else size for d, size in enumerate(r.shape)]
    clamped_mean = torch.empty(shape, dtype=r.dtype, device=r.device)
    grad_s = None
    if grad_operands is not None:
        y, t, grad_y = grad_operands
        grad_s = torch.empty(shape, dtype=torch.promote_types(r.dtype, grad_y.dtype), device=r.device)
    for part in _slices(r, dims):
        if grad_s is not None:  # y - t first: its storage may be y's, and the clamped r's may be t's
            shifted = torch.sub(part.of(y), part.of(t), out=None if shifted_into is None else part.of(shifted_into))
            product = _mul_(shifted, part.of(grad_y)) if shifted_into is None else shifted * part.of(grad_y)
            torch.sum(product, dim=dims, keepdim=True, out=part.of_mean(grad_s))
            del shifted, product
        clamped = _clamped(part.of(r), clamp)  # summed as a fresh dense slice: the sum's order is autograd's
        torch.sum(clamped, dim=dims, keepdim=True, out=part.of_mean(clamped_mean))
        if clamped_into is not None:
            part.of(clamped_into).copy_(clamped)
        del clamped
    count = math.prod(r.shape[d] for d in dims)
    return clamped_mean.div_(count), None if grad_s is None else grad_s.div_(count)


def _mul_(a: Tensor, b: Tensor) -> Tensor:
    """``a * b``, in place on ``a`` where that keeps the eager result's dtype."""
    return a.mul_(b) if torch.result_type(a, b) == a.dtype else a * b


def _sub_(a: Tensor, b: Tensor) -> Tensor:
    """``a - b``, in place on ``a`` where that keeps the eager result's dtype."""
    return a.sub_(b) if torch.result_type(a, b) == a.dtype else a - b


def _scale(clamped: Tensor, mean: Optional[Tensor]) -> Tensor:
    """``exp(s)`` of a slice as :func:`log_scale` gives ``s``, from the clamped ``r``, in place over it."""
    s = clamped if mean is None else _sub_(clamped, mean)
    return s.exp_()


# NOTE [kept between the passes]
# With a batch mean (training VN) the ops run two passes over the slices: one
# sums, the other writes. The first keeps what it made for the second where a
# tensor of its size may be overwritten, so that the soft clamp (an atan, the
# costliest op here) and y - t run once per element: the clamped r waits in
# the forward op's `scratch` (r itself where the caller gives it up) and in
# the backward op's grad_t, y - t in the backward op's x (the results that
# replace the operands read for them, or fresh outputs). The clamp is made
# and summed as a fresh dense slice and then copied: the sum's order, and so
# the batch mean's bits, stay those of autograd's `mean` (a sum over a
# strided view of r adds in another order). The backward op keeps them where
# all its tensors share one dtype, so that each result is rounded as the
# eager expression rounds it.
def affine_coupling_into(
    x: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    out: Tensor,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
    scratch: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """:func:`affine_coupling` without grad, into ``out`` (which may be ``x``), a slice at a time.

    ``scratch``: a tensor of ``r``'s shape the op may overwrite (``r`` itself where the caller no longer needs
    it, or ``out`` where it is not ``x``): the clamped log-scale waits there between the batch-mean pass and
    the pass that writes (NOTE [kept between the passes]), where it has ``r``'s dtype.

    Returns:
        The detached batch mean, as :func:`affine_coupling` (``None`` in eval or without VN).
    """
    dims = volume_norm_dims(volume_norm)
    if scratch is not None and scratch.shape != r.shape:
        raise ValueError(
            f"affine_coupling_into: scratch must have r's shape {tuple(r.shape)}, got {tuple(scratch.shape)}; "
            "pass r itself, or leave scratch=None."
        )
    scratch = scratch if scratch is not None and scratch.dtype == r.dtype else None  # the clamp's dtype, or not used
    with torch.no_grad():
        batch_mean = None
        kept = False
        if dims and running_mean is None:
            batch_mean, _ = _batch_means(r, dims, clamp, keep=(scratch, None))
            kept = scratch is not None
        mean = batch_mean if batch_mean is not None else (running_mean if dims else None)
        for part in _slices(r, dims):
            if kept:  # a fresh s from the kept clamp, as the fresh clamp below becomes s in place
                scale = torch.sub(part.of(scratch), part.of_mean(mean)).exp_()
            else:
                scale = _scale(_clamped(part.of(r), clamp), None if mean is None else part.of_mean(mean))
            x_part = part.of(x)
            _affine(scale, x_part, part.of(t), out=x_part if out is x else part.of(out))
            del scale
    return batch_mean


def affine_coupling_bwd_into(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    grad_y: Tensor,
    *,
    out: Tuple[Tensor, Tensor, Tensor, Tensor],
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> None:
    """:func:`affine_coupling_bwd` writing ``(x, grad_x, grad_r, grad_t)`` into ``out``, which may alias the operands.

    ``out`` entries may be ``y``, ``grad_y``, ``r`` and ``t`` themselves (NOTE [backward into the operands]).
    """
    dims = volume_norm_dims(volume_norm)
    x, grad_x, grad_r, grad_t = out
    dtypes = {a.dtype for a in (y, r, t, grad_y, *out, *(() if running_mean is None else (running_mean,)))}
    keep = (grad_t, x) if len(dtypes) == 1 else None  # NOTE [kept between the passes]
    with torch.no_grad():
        clamped_mean = grad_s_mean = None
        kept = False
        if dims and running_mean is None:  # training VN: the batch means, from a first pass
            clamped_mean, grad_s_mean = _batch_means(r, dims, clamp, (y, t, grad_y), keep)
            kept = keep is not None
        elif dims:
            clamped_mean = running_mean
        one = r.new_ones(())
        # grad_r = (2/pi) (grad_s - mean(grad_s)) / (1 + (r/c)^2): the clamp's derivative in two factors
        shift = r.new_zeros(()) if grad_s_mean is None else grad_s_mean.mul_(-_TWO_OVER_PI)
        for part in _slices(r, dims):
            y_n, r_n, t_n, g_n = (part.of(a) for a in (y, r, t, grad_y))
            x_n, grad_x_n, grad_r_n, grad_t_n = (
                operand if result is whole else part.of(result)
                for result, whole, operand in zip(out, (y, grad_y, r, t), (y_n, g_n, r_n, t_n))
            )
            mean_n = None if clamped_mean is None else part.of_mean(clamped_mean)
            if kept:
                shifted, scale = x_n, torch.sub(grad_t_n, mean_n).exp_()
            else:  # y - t first: its storage may be y's
                shifted = torch.sub(y_n, t_n, out=None if keep is None else x_n)
                scale = _scale(_clamped(r_n, clamp), mean_n)
            divisor = torch.div(r_n, clamp)
            torch.addcmul(one, divisor, divisor, out=divisor)
            grad_s = torch.addcmul(part.of_mean(shift), shifted, g_n, value=_TWO_OVER_PI, out=None if keep is None else grad_r_n)
            torch.div(grad_s, divisor, out=grad_r_n)  # over r
            del grad_s
            torch.div(shifted, scale, out=x_n)  # x = (y - t) / exp(s), over y
            grad_t_n.copy_(g_n)  # over t, before grad_x may overwrite g
            torch.mul(g_n, scale, out=grad_x_n)
            del shifted, scale, divisor
