"""Triton: the coupling's affine transform fused with volume normalisation.

notation: ``x`` the level being transformed, ``r`` the raw log-scale, ``t``
the shift, ``g = dL/dy`` (all ``(N, C, H, W)``), ``c`` the clamp,
``m`` the VN mean (a batch mean in training, the running mean in eval, 0 without VN).

Maths (:mod:`..reference` is the definition):
``s = c (2/pi) atan(r/c) - m``, forward ``y = exp(s) x + t``, inverse
``x = (y - t) exp(-s)``; the fused backward rebuilds ``x`` from ``y`` and
writes ``grad_x = g exp(s)``, ``grad_t = g`` and
``grad_r = (grad_s - mean(grad_s)) (2/pi) / (1 + (r/c)^2)`` with
``grad_s = g (y - t)`` (the mean only for a batch mean in training).

Bytes moved, in tensor-sized passes (one pass = N*C*H*W elements of the
dtype: 4 bytes each in float32, 2 in bfloat16 / float16). The minimum is
what an op must read and write once; the benchmark's GB/s divide it by the time.

* forward: minimum 4 (read x, r, t; write y). Fused kernels: 4, plus 1 (read
  r) for a batch mean. Reference: about 14, 17 with a batch mean.
* fused backward ``affine_coupling_bwd``: minimum 8 (read y, r, t, g; write
  x, grad_x, grad_r, grad_t). Fused kernels: 8, plus 4 (read r, y, t, g; both
  batch means in one pass) for a batch mean. Reference: about 40, 46 with a batch mean.
* backward of the autograd binding: 6 (read y, r, t, g; write grad_x,
  grad_r; grad_t is g itself), plus 3 (read y, t, g) for a batch mean.
* ``affine_coupling_reconstruct`` then its backward: 7 (read y, r, t, g;
  write x, grad_x, grad_r), plus 4 for a batch mean, where the Triton inverse,
  then forward and backward through the binding would take 4 + 4 + 6.
* the ``*_into`` launchers (``affine_coupling_into``, ``affine_coupling_bwd_into``)
  move the same bytes as the forward and the fused backward, written
  straight into the caller's ``out`` (which may be the operands: NOTE
  [writing over the operands]); they allocate nothing of a level's size,
  where the allocating ops followed by a copy into ``out`` would add 2 per
  result (read the result, write ``out``) and a level-sized tensor per result.

The reference counts one read per operand and one write per result of each
eager op (``r / c``, ``atan``, ``* c 2/pi``, ``- m``, ``exp``, ``*``, ``+``...).
The VN means themselves (``H*W`` or ``C`` floats) are negligible.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._math import nchw_index, soft_clamp, soft_clamp_grad
from ._launch import mean_shape
from .volume_norm import VN_CODES, volume_norm_means

__all__ = [
    "affine_coupling",
    "affine_coupling_into",
    "affine_coupling_inverse",
    "affine_coupling_bwd",
    "affine_coupling_bwd_into",
    "affine_coupling_reconstruct",
    "launch_variants",
]

_ELEMENTWISE_KEY = ("n_elements", "VN", "CHANNELS_LAST", "DENSE")

# NOTE [memory order]
# Every kernel visits the elements in one flat order, (n, c, h, w) or, when
# the first operand is channels-last (c has the smallest stride),
# (n, h, w, c); each operand and each output is read or written through its
# own four strides, so contiguous, channels-last and sliced views (the engine
# passes channel slices of a level, and r, t are chunks of the network's
# output) need no copy. The outputs the launchers allocate are dense in the
# visiting order, so every write is coalesced; when every tensor of a launch
# is, the flat index is their offset (DENSE).

# NOTE [writing over the operands]
# The *_into launchers write into the caller's `out` tensors, which may be the
# operands themselves, as in the reference (NOTE [backward into the operands]
# in kernels/reference.py): y over x; x over y, grad_x over grad_y, grad_r
# over r, grad_t over t. It is safe because the kernels are elementwise in one
# visiting order: the element (n, c, h, w) of every operand and every output
# belongs to one program, which loads all its elements before it stores any
# (the batch means come from a read-only pass launched before). The rule: an
# output is either exactly an operand (the same elements at the same strides)
# or shares no element with any operand; outputs share no element with each
# other. An output that overlaps an operand shifted (x[1:] into x[:-1]) would
# read elements another program has already written: the launchers refuse it
# where the tensors are dense (_launch.check_out), the case that can be checked
# without enumerating elements. Compiled for sm_90, the fused backward's PTX
# issues every operand load before its first store, and Triton marks no
# pointer argument noalias, so neither the compiler nor ptxas may move a store
# above a load of the same address; tests/kernels/test_into.py checks the
# values with out over the operands under the interpreter.


@triton.jit
def _load_nchw(ptr, idx, n, c, h, w, stride_n, stride_c, stride_h, stride_w, mask, DENSE: tl.constexpr):
    """Load elements at ``(n, c, h, w)`` of a strided tensor, as float32 (0 where masked).

    ``DENSE``: every operand is dense in the visiting order, so the flat index
    is the offset and the index arithmetic is dropped (NOTE [memory order]).
    """
    if DENSE:
        offset = idx
    else:
        offset = n * stride_n + c * stride_c + h * stride_h + w * stride_w
    return tl.load(ptr + offset, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_nchw(ptr, value, idx, n, c, h, w, stride_n, stride_c, stride_h, stride_w, mask, DENSE: tl.constexpr):
    """Store float32 ``value`` at ``(n, c, h, w)`` of a strided tensor, rounded to its dtype (as :func:`_load_nchw`)."""
    if DENSE:
        offset = idx
    else:
        offset = n * stride_n + c * stride_c + h * stride_h + w * stride_w
    tl.store(ptr + offset, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _log_scale(r, mean_ptr, c, h, w, W, mask, clamp, VN: tl.constexpr):
    """``s = soft_clamp(r) - m`` with ``m`` read from the flat float32 VN mean (``VN`` 0: no mean)."""
    s = soft_clamp(r, clamp)
    if VN == 1:  # CVN: one mean per pixel
        s -= tl.load(mean_ptr + h * W + w, mask=mask, other=0.0)
    if VN == 2:  # SVN: one mean per channel
        s -= tl.load(mean_ptr + c, mask=mask, other=0.0)
    return s


@triton.jit
def _element_block(n_elements, BLOCK_SIZE: tl.constexpr, USE_INT64: tl.constexpr):
    """Flat indices of this program's block, and their mask."""
    pid = tl.program_id(0)
    if USE_INT64:
        pid = pid.to(tl.int64)
    idx = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return idx, idx < n_elements


@triton.jit
def _affine_coupling_kernel(
    in_ptr,  # x (forward) or y (INVERSE), (N, C, H, W), any strides
    r_ptr,  # raw log-scale r, any strides
    t_ptr,  # shift t, any strides
    mean_ptr,  # float32 VN mean, flat (H*W for CVN, C for SVN); unused without VN
    out_ptr,  # y (forward) or x (INVERSE), any strides; may be in_ptr, r_ptr or t_ptr (NOTE [writing over the operands])
    stride_in_n, stride_in_c, stride_in_h, stride_in_w,  # strides of the input
    stride_r_n, stride_r_c, stride_r_h, stride_r_w,  # strides of r
    stride_t_n, stride_t_c, stride_t_h, stride_t_w,  # strides of t
    stride_out_n, stride_out_c, stride_out_h, stride_out_w,  # strides of the output
    n_elements,  # N * C * H * W
    C, H, W,  # sizes
    clamp,  # soft-clamp bound c
    INVERSE: tl.constexpr,  # False: y = exp(s) x + t; True: x = (y - t) exp(-s)
    VN: tl.constexpr,  # 0 none, 1 CVN, 2 SVN
    CHANNELS_LAST: tl.constexpr,  # visiting order (n, h, w, c) instead of (n, c, h, w)
    DENSE: tl.constexpr,  # every operand and output is dense in the visiting order: offsets are flat indices
    USE_INT64: tl.constexpr,  # 64-bit offsets
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    # one program per BLOCK_SIZE consecutive elements of the visiting order; it loads them all before it stores
    idx, mask = _element_block(n_elements, BLOCK_SIZE, USE_INT64)
    n, c, h, w = nchw_index(idx, C, H, W, CHANNELS_LAST)
    a = _load_nchw(in_ptr, idx, n, c, h, w, stride_in_n, stride_in_c, stride_in_h, stride_in_w, mask, DENSE)
    r = _load_nchw(r_ptr, idx, n, c, h, w, stride_r_n, stride_r_c, stride_r_h, stride_r_w, mask, DENSE)
    t = _load_nchw(t_ptr, idx, n, c, h, w, stride_t_n, stride_t_c, stride_t_h, stride_t_w, mask, DENSE)
    s = _log_scale(r, mean_ptr, c, h, w, W, mask, clamp, VN)
    if INVERSE:
        out = (a - t) * tl.exp(-s)
    else:
        out = tl.exp(s) * a + t
    _store_nchw(out_ptr, out, idx, n, c, h, w, stride_out_n, stride_out_c, stride_out_h, stride_out_w, mask, DENSE)


@triton.jit
def _affine_coupling_bwd_kernel(
    y_ptr,  # output of the forward y, (N, C, H, W), any strides
    r_ptr,  # raw log-scale r, any strides
    t_ptr,  # shift t, any strides
    g_ptr,  # incoming gradient g = dL/dy, any strides
    mean_ptr,  # float32 VN mean of s, flat; unused without VN
    mean_grad_ptr,  # float32 batch mean of grad_s, flat; read when SUBTRACT_GRAD_MEAN
    x_ptr,  # rebuilt input x (WRITE_X); the outputs have any strides and may be operands (NOTE [writing over the operands])
    grad_x_ptr,  # dL/dx (WRITE_GRAD_X)
    grad_r_ptr,  # dL/dr (WRITE_GRAD_R)
    grad_t_ptr,  # dL/dt (WRITE_GRAD_T)
    stride_y_n, stride_y_c, stride_y_h, stride_y_w,  # strides of y
    stride_r_n, stride_r_c, stride_r_h, stride_r_w,  # strides of r
    stride_t_n, stride_t_c, stride_t_h, stride_t_w,  # strides of t
    stride_g_n, stride_g_c, stride_g_h, stride_g_w,  # strides of g
    stride_x_n, stride_x_c, stride_x_h, stride_x_w,  # strides of x
    stride_grad_x_n, stride_grad_x_c, stride_grad_x_h, stride_grad_x_w,  # strides of dL/dx
    stride_grad_r_n, stride_grad_r_c, stride_grad_r_h, stride_grad_r_w,  # strides of dL/dr
    stride_grad_t_n, stride_grad_t_c, stride_grad_t_h, stride_grad_t_w,  # strides of dL/dt
    n_elements,  # N * C * H * W
    C, H, W,  # sizes
    clamp,  # soft-clamp bound c
    VN: tl.constexpr,  # 0 none, 1 CVN, 2 SVN
    SUBTRACT_GRAD_MEAN: tl.constexpr,  # the mean of s was a batch mean: backprop through it
    WRITE_X: tl.constexpr,  # write the rebuilt x
    WRITE_GRAD_X: tl.constexpr,  # write dL/dx
    WRITE_GRAD_R: tl.constexpr,  # write dL/dr
    WRITE_GRAD_T: tl.constexpr,  # write dL/dt (a copy of g)
    CHANNELS_LAST: tl.constexpr,  # visiting order (n, h, w, c) instead of (n, c, h, w)
    DENSE: tl.constexpr,  # every operand and output is dense in the visiting order: offsets are flat indices
    USE_INT64: tl.constexpr,  # 64-bit offsets
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    # one program per BLOCK_SIZE consecutive elements of the visiting order; it loads them all before it stores
    idx, mask = _element_block(n_elements, BLOCK_SIZE, USE_INT64)
    n, c, h, w = nchw_index(idx, C, H, W, CHANNELS_LAST)
    y = _load_nchw(y_ptr, idx, n, c, h, w, stride_y_n, stride_y_c, stride_y_h, stride_y_w, mask, DENSE)
    t = _load_nchw(t_ptr, idx, n, c, h, w, stride_t_n, stride_t_c, stride_t_h, stride_t_w, mask, DENSE)
    g = _load_nchw(g_ptr, idx, n, c, h, w, stride_g_n, stride_g_c, stride_g_h, stride_g_w, mask, DENSE)
    d = y - t
    if WRITE_X or WRITE_GRAD_X or WRITE_GRAD_R:
        r = _load_nchw(r_ptr, idx, n, c, h, w, stride_r_n, stride_r_c, stride_r_h, stride_r_w, mask, DENSE)
    if WRITE_X or WRITE_GRAD_X:
        s = _log_scale(r, mean_ptr, c, h, w, W, mask, clamp, VN)
    if WRITE_X:
        x = d * tl.exp(-s)
        _store_nchw(x_ptr, x, idx, n, c, h, w, stride_x_n, stride_x_c, stride_x_h, stride_x_w, mask, DENSE)
    if WRITE_GRAD_X:
        grad_x = g * tl.exp(s)
        _store_nchw(grad_x_ptr, grad_x, idx, n, c, h, w, stride_grad_x_n, stride_grad_x_c, stride_grad_x_h, stride_grad_x_w, mask, DENSE)
    if WRITE_GRAD_R:
        grad_s = g * d  # dL/ds without x: y - t = exp(s) x
        if SUBTRACT_GRAD_MEAN:
            if VN == 1:
                grad_s -= tl.load(mean_grad_ptr + h * W + w, mask=mask, other=0.0)
            if VN == 2:
                grad_s -= tl.load(mean_grad_ptr + c, mask=mask, other=0.0)
        grad_r = grad_s * soft_clamp_grad(r, clamp)
        _store_nchw(grad_r_ptr, grad_r, idx, n, c, h, w, stride_grad_r_n, stride_grad_r_c, stride_grad_r_h, stride_grad_r_w, mask, DENSE)
    if WRITE_GRAD_T:
        _store_nchw(grad_t_ptr, g, idx, n, c, h, w, stride_grad_t_n, stride_grad_t_c, stride_grad_t_h, stride_grad_t_w, mask, DENSE)


# ----------------------------------------------------------------------------- launchers


def _mean(where: str, r: Tensor, volume_norm: Optional[str], clamp: float, running_mean: Optional[Tensor]) -> Tuple[Optional[Tensor], bool]:
    """``(m, is_batch_mean)``: the flat float32 mean to subtract from the clamped log-scale (``None``: none)."""
    if volume_norm is None:
        return None, False
    if running_mean is not None:
        return _launch.flat_running_mean(where, running_mean, volume_norm, r), False
    mean, _ = volume_norm_means(volume_norm, clamp, r=r)
    return mean, True


def _batch_mean_output(mean: Optional[Tensor], is_batch_mean: bool, volume_norm: Optional[str], r: Tensor) -> Optional[Tensor]:
    """The batch mean as the reference returns it: ``(1, 1, H, W)`` or ``(1, C, 1, 1)``, dtype of ``r``."""
    if not is_batch_mean:
        return None
    return mean.view(mean_shape(volume_norm, r.shape)).to(r.dtype)


def _strides(name: str, x: Tensor) -> dict:
    """The ``stride_{name}_{n,c,h,w}`` arguments of a kernel."""
    return {f"stride_{name}_{dim}": stride for dim, stride in zip("nchw", _launch.strides(x))}


def _shape_args(
    clamp: float, volume_norm: Optional[str], channels_last: bool, inputs: Tuple[Tensor, ...], outputs: Tuple[Tensor, ...]
) -> dict:
    """Sizes and compile-time flags of an elementwise kernel; ``inputs[0]`` sets the shape."""
    n, c, h, w = inputs[0].shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return dict(
        n_elements=inputs[0].numel(), C=c, H=h, W=w, clamp=float(clamp), VN=VN_CODES[volume_norm],
        CHANNELS_LAST=channels_last, DENSE=all(a.is_contiguous(memory_format=fmt) for a in (*inputs, *outputs)),
        USE_INT64=_launch.needs_int64(*inputs, *outputs),
    )  # fmt: skip


def _result_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _empty_like_order(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A result tensor shaped like ``like``, dense in its visiting order (NOTE [memory order])."""
    return _launch.empty_in_order(like.shape, dtype, like.device, _launch.channels_last_order(like))


def _launch_affine(
    a: Tensor, r: Tensor, t: Tensor, mean: Optional[Tensor], volume_norm: Optional[str], clamp: float, *, inverse: bool, out: Tensor
) -> Tensor:
    """Launch :func:`_affine_coupling_kernel` on ``a`` (``x``, or ``y`` when ``inverse``), writing into ``out``; returns ``out``."""
    order = _launch.channels_last_order(a)
    args = dict(in_ptr=a, r_ptr=r, t_ptr=t, mean_ptr=_launch.optional(mean, out), out_ptr=out, INVERSE=inverse)
    args.update(**_strides("in", a), **_strides("r", r), **_strides("t", t), **_strides("out", out))
    args.update(_shape_args(clamp, volume_norm, order, (a, r, t), (out,)))
    _launch.elementwise_launch(_affine_coupling_kernel, a.numel(), _ELEMENTWISE_KEY + ("INVERSE",), args)
    return out


_OUTPUT_NAMES = ("x", "grad_x", "grad_r", "grad_t")


def _backward(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    g: Tensor,
    mean: Optional[Tensor],
    mean_grad: Optional[Tensor],
    *,
    volume_norm: Optional[str],
    clamp: float,
    out: Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]],
) -> None:
    """Launch the fused backward, writing ``(x, grad_x, grad_r, grad_t)`` into ``out`` (``None``: not written).

    ``mean`` is the flat float32 mean the forward subtracted (``None``
    without VN) and ``mean_grad`` the batch mean of ``grad_s`` (``None``
    unless the forward used a batch mean). ``out`` may alias the operands
    (NOTE [writing over the operands]).
    """
    order = _launch.channels_last_order(y)
    args = {f"{name}_ptr": _launch.optional(target, y) for name, target in zip(_OUTPUT_NAMES, out)}
    for name, target in zip(_OUTPUT_NAMES, out):
        args.update(_strides(name, _launch.optional(target, y)))
    args.update(y_ptr=y, r_ptr=r, t_ptr=t, g_ptr=g, mean_ptr=_launch.optional(mean, y), mean_grad_ptr=_launch.optional(mean_grad, y))
    args.update(**_strides("y", y), **_strides("r", r), **_strides("t", t), **_strides("g", g))
    args.update(_shape_args(clamp, volume_norm, order, (y, r, t, g), tuple(target for target in out if target is not None)))
    flags = _backward_flags(out[0] is not None, tuple(target is not None for target in out[1:]), mean_grad is not None)
    args.update(flags)
    _launch.elementwise_launch(_affine_coupling_bwd_kernel, y.numel(), _ELEMENTWISE_KEY + tuple(flags), args)


def _backward_flags(write_x: bool, want: Tuple[bool, bool, bool], subtract_grad_mean: bool) -> dict:
    """The write flags of :func:`_affine_coupling_bwd_kernel` for a call of :func:`_backward`."""
    return dict(SUBTRACT_GRAD_MEAN=subtract_grad_mean, WRITE_X=write_x, WRITE_GRAD_X=want[0], WRITE_GRAD_R=want[1], WRITE_GRAD_T=want[2])


# The calls of _backward in this module, as (write_x, want, may subtract the
# batch mean of grad_s): affine_coupling_bwd_into (and affine_coupling_bwd,
# which allocates and calls it); the autograd binding (grad_t is g itself;
# grad_x, grad_r as needed); the backward of reconstruct. A new
# call must be added here, or the compile matrix will not compile it
# (tests/kernels/test_compile_matrix.py checks the launches against this list).
_BACKWARD_CALLS = (
    [(True, (True, True, True), True)]
    + [(False, (want_x, want_r, False), want_r) for want_x in (True, False) for want_r in (True, False)]
    + [(True, (True, want_r, False), True) for want_r in (True, False)]
)


def launch_variants() -> List[_launch.KernelVariant]:
    """Every variant of this module's kernels that its launchers can start on a GPU.

    The product of each launcher's compile-time choices: direction, VN mode,
    the backward's write flags (:data:`_BACKWARD_CALLS`), visiting order,
    dense or strided operands, 32- or 64-bit offsets, the operands' dtype and
    the autotuner's ``(BLOCK_SIZE, num_warps)`` configurations.
    """
    variants = []
    layouts = list(itertools.product((False, True), (False, True), (False, True)))  # CHANNELS_LAST, DENSE, USE_INT64
    backward_flags = []
    for write_x, want, may_subtract in _BACKWARD_CALLS:
        for vn in VN_CODES.values():
            for subtract in sorted({False, may_subtract and vn != 0}):
                flags = dict(VN=vn, **_backward_flags(write_x, want, subtract))
                if flags not in backward_flags:
                    backward_flags.append(flags)
    for (block, warps), dtype, (cl, dense, wide) in itertools.product(_launch.elementwise_configs(), _launch.TRITON_DTYPES, layouts):
        common = dict(CHANNELS_LAST=cl, DENSE=dense, USE_INT64=wide, BLOCK_SIZE=block)
        for inverse, vn in itertools.product((False, True), VN_CODES.values()):
            fp32 = ("mean_ptr",) if vn else ()
            variants.append(_launch.KernelVariant.make(__name__, "_affine_coupling_kernel", dtype, warps, fp32, INVERSE=inverse, VN=vn, **common))
        for flags in backward_flags:
            fp32 = (("mean_ptr",) if flags["VN"] else ()) + (("mean_grad_ptr",) if flags["SUBTRACT_GRAD_MEAN"] else ())
            variants.append(_launch.KernelVariant.make(__name__, "_affine_coupling_bwd_kernel", dtype, warps, fp32, **flags, **common))
    return variants


def _refuse_grad(where: str, *tensors: Tensor) -> None:
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        raise NotImplementedError(
            f"{where}: the Triton version is not differentiable; call it under torch.no_grad(), "
            "or use backend='reference' to backpropagate through it."
        )


def affine_coupling_inverse(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Inverse of :func:`affine_coupling`, ``x = (y - t) exp(-s)``: one pass, two with a batch mean.

    Not differentiable: call it under ``torch.no_grad()`` (the engine does).

    Returns:
        ``(x, batch_mean)`` as :func:`..reference.affine_coupling_inverse`.

    Raises:
        TypeError, ValueError: a bad argument (the message names it and the fix).
        NotImplementedError: grad mode is on and an operand requires grad.
    """
    where = "affine_coupling_inverse"
    _launch.check_operands(where, "y", y, r=r, t=t)
    _launch.check_options(where, volume_norm, clamp)
    _refuse_grad(where, y, r, t)
    mean, is_batch_mean = _mean(where, r, volume_norm, clamp, running_mean)
    x = _launch_affine(y, r, t, mean, volume_norm, clamp, inverse=True, out=_empty_like_order(y, _result_dtype(y, r, t)))
    return x, _batch_mean_output(mean, is_batch_mean, volume_norm, r)


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
    """:func:`affine_coupling` without grad, written straight into ``out``: one pass, two with a batch mean.

    ``out`` may be ``x`` itself (or ``r`` or ``t``), any strides and dtype the
    kernels take (NOTE [writing over the operands]); nothing of its size is
    allocated: the only temporaries are the VN mean's (``H*W`` or ``C``
    float32 values and their partial sums).

    Returns:
        The detached batch mean, as :func:`..reference.affine_coupling_into`.

    Raises:
        TypeError, ValueError: a bad argument, or an ``out`` that overlaps an operand shifted.
    """
    where = "affine_coupling_into"
    _launch.check_operands(where, "x", x, r=r, t=t)
    _launch.check_out(where, "x", x, {"out": out}, dict(x=x, r=r, t=t))
    _launch.check_options(where, volume_norm, clamp)
    x, r, t = (a.detach() for a in (x, r, t))
    mean, is_batch_mean = _mean(where, r, volume_norm, clamp, running_mean)
    _launch_affine(x, r, t, mean, volume_norm, clamp, inverse=False, out=out.detach())
    _launch.mark_written(out)
    return _batch_mean_output(mean, is_batch_mean, volume_norm, r)


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
    """Rebuild ``x`` from ``y`` and backpropagate ``grad_y``, in one pass over memory, into new tensors.

    :func:`affine_coupling_bwd_into` on results allocated dense in the
    visiting order, with the reference's dtypes. Not differentiable, like the reference.

    Returns:
        ``(x, grad_x, grad_r, grad_t)`` as :func:`..reference.affine_coupling_bwd`.

    Raises:
        TypeError, ValueError: a bad argument (the message names it and the fix).
    """
    _launch.check_operands("affine_coupling_bwd", "y", y, r=r, t=t, grad_y=grad_y)
    dtypes = (_result_dtype(y, r, t), _result_dtype(grad_y, r), _result_dtype(grad_y, y, t, r), grad_y.dtype)  # as the reference's
    out = tuple(_empty_like_order(y, dtype) for dtype in dtypes)
    _fused_backward("affine_coupling_bwd", y, r, t, grad_y, out, volume_norm, clamp, running_mean)
    return out


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
    """Rebuild ``x`` and backpropagate ``grad_y`` straight into ``out = (x, grad_x, grad_r, grad_t)``.

    One pass over memory; with a batch mean (training VN), a read-only first
    pass computes together the mean of the clamped log-scale and the mean of
    ``grad_s``. ``out`` may be ``(y, grad_y, r, t)`` themselves, as in the
    engine's backward (NOTE [writing over the operands]); nothing of their
    size is allocated. Not differentiable, like the reference.

    Raises:
        TypeError, ValueError: a bad argument, or an output that overlaps an operand shifted or another output.
    """
    _fused_backward("affine_coupling_bwd_into", y, r, t, grad_y, out, volume_norm, clamp, running_mean)


def _fused_backward(
    where: str, y: Tensor, r: Tensor, t: Tensor, grad_y: Tensor, out: Tuple[Tensor, Tensor, Tensor, Tensor],
    volume_norm: Optional[str], clamp: float, running_mean: Optional[Tensor],
) -> None:
    """:func:`affine_coupling_bwd_into`, its checks' messages naming the op ``where`` the user called."""
    _launch.check_operands(where, "y", y, r=r, t=t, grad_y=grad_y)
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise TypeError(f"{where}: out must be a tuple of 4 tensors (x, grad_x, grad_r, grad_t), got {type(out).__name__}.")
    _launch.check_out(where, "y", y, dict(zip(_OUTPUT_NAMES, out)), dict(y=y, r=r, t=t, grad_y=grad_y))
    _launch.check_options(where, volume_norm, clamp)
    y, r, t, grad_y = (a.detach() for a in (y, r, t, grad_y))
    if volume_norm is not None and running_mean is None:
        mean, mean_grad = volume_norm_means(volume_norm, clamp, r=r, y=y, t=t, g=grad_y)
    else:
        (mean, _), mean_grad = _mean(where, r, volume_norm, clamp, running_mean), None
    _backward(y, r, t, grad_y, mean, mean_grad, volume_norm=volume_norm, clamp=clamp, out=tuple(a.detach() for a in out))
    for target in out:
        _launch.mark_written(target)


# ----------------------------------------------------------------------------- autograd binding


class _AffineCouplingFunction(torch.autograd.Function):
    """``y = exp(s) x + t`` differentiable in ``x``, ``r`` and ``t``; saves ``y`` (not ``x``) for backward."""

    @staticmethod
    def forward(ctx, x, r, t, volume_norm, clamp, running_mean):
        where = "affine_coupling"
        _launch.check_operands(where, "x", x, r=r, t=t)
        _launch.check_options(where, volume_norm, clamp)
        mean, is_batch_mean = _mean(where, r, volume_norm, clamp, running_mean)
        y = _launch_affine(x, r, t, mean, volume_norm, clamp, inverse=False, out=_empty_like_order(x, _result_dtype(x, r, t)))
        ctx.save_for_backward(y, r, t, mean)
        ctx.volume_norm, ctx.clamp, ctx.is_batch_mean, ctx.x_dtype = volume_norm, clamp, is_batch_mean, x.dtype
        batch_mean = _batch_mean_output(mean, is_batch_mean, volume_norm, r)
        if batch_mean is not None:
            ctx.mark_non_differentiable(batch_mean)
        return y, batch_mean

    @staticmethod
    def backward(ctx, grad_y, _grad_batch_mean):
        y, r, t, mean = ctx.saved_tensors
        want_x, want_r, want_t = ctx.needs_input_grad[:3]
        mean_grad = None
        if ctx.is_batch_mean and want_r:
            _, mean_grad = volume_norm_means(ctx.volume_norm, ctx.clamp, y=y, t=t, g=grad_y)
        # NOTE [grad_t is g]
        # dL/dt = g exactly, so the incoming gradient is
        # passed on as it is (autograd allows it) rather than copied by the kernel.
        grad_x = _empty_like_order(y, ctx.x_dtype) if want_x else None
        grad_r = _empty_like_order(y, r.dtype) if want_r else None
        _backward(y, r, t, grad_y, mean, mean_grad, volume_norm=ctx.volume_norm, clamp=ctx.clamp, out=(None, grad_x, grad_r, None))
        grad_t = grad_y.to(t.dtype) if want_t else None
        return grad_x, grad_r, grad_t, None, None, None


def affine_coupling(
    x: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Forward of the coupling's affine transform, ``y = exp(s) x + t``, differentiable in ``x``, ``r``, ``t``.

    One pass over memory (two with a batch mean). The backward runs the fused
    kernel on the saved ``y`` (``x`` is not kept).

    Args:
        x: the level being transformed, ``(N, C, H, W)``, float32 / bfloat16 / float16, on CUDA.
        r: raw log-scale, same shape and device.
        t: shift, same shape and device.
        volume_norm: ``"CVN"``, ``"SVN"`` or ``None``.
        clamp: soft-clamp bound ``c`` (> 0).
        running_mean: ``None`` to use the batch mean (training), else the VN
            mean to subtract (eval), broadcastable to ``(1, 1, H, W)`` (CVN) or ``(1, C, 1, 1)`` (SVN).

    Returns:
        ``(y, batch_mean)`` as :func:`..reference.affine_coupling`; ``y`` has the
        promoted dtype of the operands and the memory format of ``x``.

    Raises:
        TypeError, ValueError: a bad argument (the message names it and the fix).
    """
    return _AffineCouplingFunction.apply(x, r, t, volume_norm, clamp, running_mean)


# NOTE [lazy reconstruction]
# The engine's fused path (reference.affine_coupling_reconstruct) asks for x,
# a leaf, and y_local, equal to y and differentiable in (x, r, t). It reads x
# only after it has backpropagated through y_local. So here x is allocated
# EMPTY and y_local is a view of y; nothing is computed in forward. The
# backward through y_local runs the fused kernel once: it reads y, r, t, g
# and writes x (into the leaf's storage, through its pointer: its version
# counter does not change), grad_x and grad_r, and passes g on as grad_t. In
# training VN a first pass reduces both batch means (of the clamped r and of
# grad_s) together. Reconstruct plus backward is thus a single pass over
# memory (two with a batch mean), where inverse-then-recompute takes three.
# Contract: x holds garbage until that backward has run; a caller that does
# not backpropagate through y_local (no gradient for it) must not read x, or
# must call affine_coupling_inverse instead.
class _ReconstructFunction(torch.autograd.Function):
    """``y_local`` (a view of ``y``) whose backward fills the leaf ``x`` (NOTE [lazy reconstruction])."""

    @staticmethod
    def forward(ctx, x, r, t, y, volume_norm, clamp, mean):
        ctx.save_for_backward(r, t, y, mean)
        ctx.x = x  # the leaf to fill: written in backward, so not a saved tensor
        ctx.volume_norm, ctx.clamp = volume_norm, clamp
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        r, t, y, mean = ctx.saved_tensors
        mean_grad = None
        if ctx.volume_norm is not None and mean is None:  # training: both batch means in one pass
            mean, mean_grad = volume_norm_means(ctx.volume_norm, ctx.clamp, r=r, y=y, t=t, g=grad_y)
        want_r, want_t = ctx.needs_input_grad[1:3]
        x = ctx.x.detach()
        grad_x = _empty_like_order(y, x.dtype)
        grad_r = _empty_like_order(y, r.dtype) if want_r else None
        _backward(y, r, t, grad_y, mean, mean_grad, volume_norm=ctx.volume_norm, clamp=ctx.clamp, out=(x, grad_x, grad_r, None))
        grad_t = grad_y.to(t.dtype) if want_t else None
        return grad_x, grad_r, grad_t, None, None, None, None


def affine_coupling_reconstruct(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The engine's fused path: ``x`` from ``y`` and a local graph, computed lazily in one backward.

    See NOTE [lazy reconstruction]: ``x`` is filled during the backward
    through ``y_local`` and must not be read before.

    Returns:
        ``(x, y_local)``: ``x`` a leaf that requires grad, ``y_local`` a view
        of ``y`` differentiable in ``x``, ``r`` and ``t``.

    Raises:
        TypeError, ValueError: a bad argument (the message names it and the fix).
    """
    where = "affine_coupling_reconstruct"
    _launch.check_operands(where, "y", y, r=r, t=t)
    _launch.check_options(where, volume_norm, clamp)
    mean = None
    if volume_norm is not None and running_mean is not None:
        mean = _launch.flat_running_mean(where, running_mean, volume_norm, r)
    x = _empty_like_order(y, _result_dtype(y, r, t))
    x.requires_grad_(True)
    y_local = _ReconstructFunction.apply(x, r, t, y.detach(), volume_norm, clamp, mean)
    return x, y_local
