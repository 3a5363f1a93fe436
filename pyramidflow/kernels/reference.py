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
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._meta import samples_to_run

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
    return clamp * _TWO_OVER_PI * torch.atan(r / clamp)


def _soft_clamp_grad(r: Tensor, clamp: float) -> Tensor:
    """Derivative of :func:`soft_clamp` with respect to ``r``."""
    return _TWO_OVER_PI / (1.0 + (r / clamp) ** 2)


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


def _affine(scale: Tensor, x: Tensor, t: Tensor) -> Tensor:
    return scale * x + t


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
# over slices (a sample and a few channels at a time, _slices), and a slice's
# operands are all read before any of its results is written, so `out` may
# alias the operands element for element (x over y, grad_x over grad_y, grad_r
# over r, grad_t over t); the temporaries are one slice's. A batch mean
# (training VN) needs every sample first: a read-only pass sums the clamped r
# and grad_s, then the pass that writes. On meta only the first and last
# samples' slices run (NOTE [samples on meta]).
_SLICE_FRACTION = 8  # a slice holds at most 1/8 of a tensor (and at least one channel plane)


def _slices(like: Tensor):
    """``(n, channel slice)`` pairs covering an ``(N, C, H, W)`` tensor, each about 1/8 of it or one plane."""
    batch, channels = like.shape[0], like.shape[1]
    step = max(1, (batch * channels) // _SLICE_FRACTION)
    step = min(step, channels)
    for n in samples_to_run(batch, like):
        for start in range(0, channels, step):
            yield n, slice(start, min(start + step, channels))


def _channel_part(mean: Tensor, c: slice) -> Tensor:
    """The part of a VN mean ``(1, 1, H, W)`` (CVN) or ``(1, C, 1, 1)`` (SVN) that channels ``c`` use."""
    return mean[:, c] if mean.shape[1] > 1 else mean


def _sliced_mean(value, like: Tensor, dims: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Mean over ``dims`` of ``value(index)`` for the slices of ``like``, summed a slice at a time (:func:`_slices`)."""
    shape = tuple(like.shape)
    reduce_channels = 1 in dims
    mean_shape = [1, 1 if reduce_channels else shape[1], 1 if 2 in dims else shape[2], 1 if 3 in dims else shape[3]]
    total = torch.zeros(mean_shape, dtype=dtype, device=like.device)
    for n, c in _slices(like):
        total[:, slice(None) if reduce_channels else c] += value((slice(n, n + 1), c)).sum(dim=dims, keepdim=True)
    return total / math.prod(shape[d] for d in dims)


def _batch_means(y: Tensor, r: Tensor, t: Tensor, grad_y: Tensor, dims: Tuple[int, ...], clamp: float) -> Tuple[Tensor, Tensor]:
    """Batch means of the clamped ``r`` and of ``grad_s = g (y - t)`` over ``dims``, a slice at a time."""
    clamped = _sliced_mean(lambda i: soft_clamp(r[i], clamp), r, dims, r.dtype)
    dtype = torch.promote_types(r.dtype, grad_y.dtype)
    return clamped, _sliced_mean(lambda i: grad_y[i] * (y[i] - t[i]), r, dims, dtype)


def affine_coupling_into(
    x: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    out: Tensor,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """:func:`affine_coupling` without grad, into ``out`` (which may be ``x``), a slice at a time.

    Returns:
        The detached batch mean, as :func:`affine_coupling` (``None`` in eval or without VN).
    """
    dims = volume_norm_dims(volume_norm)
    with torch.no_grad():
        batch_mean = None
        if dims and running_mean is None:
            batch_mean = _sliced_mean(lambda i: soft_clamp(r[i], clamp), r, dims, r.dtype)
        mean = batch_mean if batch_mean is not None else (running_mean if dims else None)
        for n, c in _slices(r):
            index = (slice(n, n + 1), c)
            s = soft_clamp(r[index], clamp)
            if mean is not None:
                s = s - _channel_part(mean, c)
            out[index].copy_(_affine(s.exp_(), x[index], t[index]))
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
    x_out, grad_x_out, grad_r_out, grad_t_out = out
    with torch.no_grad():
        clamped_mean = grad_s_mean = None
        if dims and running_mean is None:  # training VN: the batch means, from a read-only pass
            clamped_mean, grad_s_mean = _batch_means(y, r, t, grad_y, dims, clamp)
        elif dims:
            clamped_mean = running_mean
        for n, c in _slices(r):
            index = (slice(n, n + 1), c)
            r_n, g_n = r[index], grad_y[index]
            s = soft_clamp(r_n, clamp)
            if clamped_mean is not None:
                s = s - _channel_part(clamped_mean, c)
            shifted = y[index] - t[index]
            grad_r = g_n * shifted  # grad_s
            if grad_s_mean is not None:
                grad_r = grad_r - _channel_part(grad_s_mean, c)
            grad_r = grad_r * _soft_clamp_grad(r_n, clamp)
            x = shifted.mul_(torch.exp(-s))
            grad_x = g_n * s.exp_()
            del s
            grad_t_out[index].copy_(g_n)  # before grad_x may overwrite g
            grad_r_out[index].copy_(grad_r)
            x_out[index].copy_(x)
            grad_x_out[index].copy_(grad_x)
