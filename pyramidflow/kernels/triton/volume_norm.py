"""Triton: the batch means of volume normalisation (VN), and of the gradient through them.

In training, VN subtracts the batch mean of the clamped log-scale,
``mean(soft_clamp(r))``, and the backward subtracts the batch mean of
``grad_s = g * (y - t)``; both run over the VN dimensions of an
``(N, C, H, W)`` tensor (see :mod:`..reference`):

* CVN: over batch and channel, one mean per pixel (``H * W`` groups of ``N * C`` members);
* SVN: over batch and space, one mean per channel (``C`` groups of ``N * H * W`` members).

A mean is computed in two stages. Stage 1 (:func:`_volume_norm_partial_kernel`):
one program owns a tile of groups and one of ``splits`` ranges of members and
writes their float32 partial sums; the splits keep the GPU busy when there are
few groups (SVN). Stage 2 (:func:`_volume_norm_finish_kernel`) adds the
partial sums of each group and divides by the member count. The order of
additions is fixed, so results are deterministic (no atomics). Stage 1 reads
each input once (4 bytes per float32 element per input); stage 2 touches only
``splits * groups`` floats.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._math import soft_clamp

__all__ = ["volume_norm_means", "VN_CODES", "launch_variants"]

# Compile-time code of each VN mode in the kernels.
VN_CODES = {None: 0, "CVN": 1, "SVN": 2}


@triton.jit
def _volume_norm_partial_kernel(
    r_ptr,  # raw log-scale r, (N, C, H, W), any strides (read when SUM_CLAMP)
    y_ptr,  # output of the coupling y (read when SUM_GRAD)
    t_ptr,  # shift t (read when SUM_GRAD)
    g_ptr,  # incoming gradient g = dL/dy (read when SUM_GRAD)
    partial_ptr,  # float32 partial sums, (n_sums, splits, n_groups), contiguous
    stride_r_n, stride_r_c, stride_r_h, stride_r_w,  # strides of r
    stride_y_n, stride_y_c, stride_y_h, stride_y_w,  # strides of y
    stride_t_n, stride_t_c, stride_t_h, stride_t_w,  # strides of t
    stride_g_n, stride_g_c, stride_g_h, stride_g_w,  # strides of g
    C, H, W,  # sizes of the channel and spatial dimensions
    n_groups,  # number of means: H * W (CVN) or C (SVN)
    n_members,  # values per mean: N * C (CVN) or N * H * W (SVN)
    chunk,  # members per split, a multiple of BLOCK_M
    clamp,  # soft-clamp bound c
    VN: tl.constexpr,  # 1 CVN, 2 SVN
    SUM_CLAMP: tl.constexpr,  # sum soft_clamp(r) (into partial sum 0)
    SUM_GRAD: tl.constexpr,  # sum g * (y - t) (into the next partial sum)
    USE_INT64: tl.constexpr,  # 64-bit offsets
    BLOCK_G: tl.constexpr,  # groups per program
    BLOCK_M: tl.constexpr,  # members per step
):
    # one program per (BLOCK_G groups, one split of the members)
    pid_g = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    groups = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    if USE_INT64:
        groups = groups.to(tl.int64)
    group_mask = groups < n_groups
    if VN == 1:  # a group is a pixel (h, w)
        gh = groups // W
        gw = groups % W
    else:  # a group is a channel
        gc = groups
    acc_clamp = tl.zeros((BLOCK_G, BLOCK_M), dtype=tl.float32)
    acc_grad = tl.zeros((BLOCK_G, BLOCK_M), dtype=tl.float32)
    m_start = split * chunk
    m_end = tl.minimum(m_start + chunk, n_members)
    for m0 in range(m_start, m_end, BLOCK_M):
        members = m0 + tl.arange(0, BLOCK_M)
        if USE_INT64:
            members = members.to(tl.int64)
        mask = group_mask[:, None] & (members < m_end)[None, :]
        if VN == 1:  # a member is (n, c)
            n = (members // C)[None, :]
            c = (members % C)[None, :]
            h = gh[:, None]
            w = gw[:, None]
        else:  # a member is (n, h, w)
            n = (members // (H * W))[None, :]
            h = ((members // W) % H)[None, :]
            w = (members % W)[None, :]
            c = gc[:, None]
        if SUM_CLAMP:
            r = tl.load(r_ptr + n * stride_r_n + c * stride_r_c + h * stride_r_h + w * stride_r_w, mask=mask, other=0.0)
            s = soft_clamp(r.to(tl.float32), clamp)
            acc_clamp += tl.where(mask, s, 0.0)
        if SUM_GRAD:
            y = tl.load(y_ptr + n * stride_y_n + c * stride_y_c + h * stride_y_h + w * stride_y_w, mask=mask, other=0.0)
            t = tl.load(t_ptr + n * stride_t_n + c * stride_t_c + h * stride_t_h + w * stride_t_w, mask=mask, other=0.0)
            g = tl.load(g_ptr + n * stride_g_n + c * stride_g_c + h * stride_g_h + w * stride_g_w, mask=mask, other=0.0)
            acc_grad += g.to(tl.float32) * (y.to(tl.float32) - t.to(tl.float32))
    slot = split * n_groups + groups
    if SUM_CLAMP:
        tl.store(partial_ptr + slot, tl.sum(acc_clamp, axis=1), mask=group_mask)
    if SUM_GRAD:
        offset = n_splits * n_groups if SUM_CLAMP else 0
        tl.store(partial_ptr + offset + slot, tl.sum(acc_grad, axis=1), mask=group_mask)


@triton.jit
def _volume_norm_finish_kernel(
    partial_ptr,  # float32 partial sums, (n_sums, n_splits, n_groups), contiguous
    mean_ptr,  # float32 means, (n_sums, n_groups), contiguous
    n_splits,  # partial sums per group
    n_groups,  # groups per sum
    n_members,  # values per group (the divisor)
    BLOCK_SIZE: tl.constexpr,  # groups per program
):
    # one program per (BLOCK_SIZE groups, one of the sums)
    groups = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    which = tl.program_id(1)
    mask = groups < n_groups
    base = partial_ptr + which * n_splits * n_groups
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for split in range(0, n_splits):
        acc += tl.load(base + split * n_groups + groups, mask=mask, other=0.0)
    count = tl.zeros((BLOCK_SIZE,), dtype=tl.float32) + n_members
    tl.store(mean_ptr + which * n_groups + groups, tl.math.div_rn(acc, count), mask=mask)


def volume_norm_means(
    volume_norm: str,
    clamp: float,
    *,
    r: Optional[Tensor] = None,
    y: Optional[Tensor] = None,
    t: Optional[Tensor] = None,
    g: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Batch means of ``soft_clamp(r)`` and of ``g * (y - t)`` over the VN dimensions, in one pass.

    The launchers of :mod:`.affine_coupling` check the operands before calling this.

    Args:
        volume_norm: ``"CVN"`` or ``"SVN"``.
        clamp: soft-clamp bound ``c``.
        r: raw log-scale ``(N, C, H, W)``; ``None`` to skip its mean.
        y, t, g: output, shift and incoming gradient ``(N, C, H, W)``; all
            ``None`` to skip the gradient's mean.

    Returns:
        ``(mean_s, mean_grad)``: float32, flat (``H * W`` or ``C`` values,
        in the order of :func:`._launch.mean_shape`), or ``None`` where skipped.
    """
    sum_clamp = r is not None
    sum_grad = g is not None
    first = r if sum_clamp else g
    n, c, h, w = first.shape
    n_groups, n_members = (h * w, n * c) if volume_norm == "CVN" else (c, n * h * w)
    n_sums = int(sum_clamp) + int(sum_grad)
    block_g, block_m, splits, chunk = _launch.reduction_blocks(n_groups, n_members, first.device)
    partial = torch.empty((n_sums, splits, n_groups), dtype=torch.float32, device=first.device)
    means = torch.empty((n_sums, n_groups), dtype=torch.float32, device=first.device)
    r_, y_, t_, g_ = (x if x is not None else first for x in (r, y, t, g))
    _volume_norm_partial_kernel[(triton.cdiv(n_groups, block_g), splits)](
        r_, y_, t_, g_, partial,
        *_launch.strides(r_), *_launch.strides(y_), *_launch.strides(t_), *_launch.strides(g_),
        c, h, w, n_groups, n_members, chunk, float(clamp),
        VN=VN_CODES[volume_norm],
        SUM_CLAMP=sum_clamp,
        SUM_GRAD=sum_grad,
        USE_INT64=_launch.needs_int64(r_, y_, t_, g_, partial),
        BLOCK_G=block_g,
        BLOCK_M=block_m,
        num_warps=_launch.REDUCTION_WARPS,
    )  # fmt: skip
    finish_block = _finish_block(n_groups)
    _volume_norm_finish_kernel[(triton.cdiv(n_groups, finish_block), n_sums)](
        partial, means, splits, n_groups, n_members, BLOCK_SIZE=finish_block
    )
    mean_s = means[0] if sum_clamp else None
    mean_grad = means[n_sums - 1] if sum_grad else None
    return mean_s, mean_grad


def _finish_block(n_groups: int) -> int:
    """Groups per program of the finishing stage."""
    return min(1024, triton.next_power_of_2(n_groups))


def launch_variants() -> List[_launch.KernelVariant]:
    """Every variant of this module's kernels that :func:`volume_norm_means` can start on a GPU.

    Partial sums: VN mode, which sums (the clamped log-scale, the gradient's,
    or both), 32- or 64-bit offsets, the operands' dtype and every tile of
    :func:`._launch.reduction_tiles`; the finishing stage: every block size.
    """
    variants = []
    sums = ((True, False), (False, True), (True, True))
    for (block_g, block_m), dtype, vn, (sum_clamp, sum_grad), wide in itertools.product(
        _launch.reduction_tiles(), _launch.TRITON_DTYPES, ("CVN", "SVN"), sums, (False, True)
    ):
        variants.append(_launch.KernelVariant.make(
            __name__, "_volume_norm_partial_kernel", dtype, _launch.REDUCTION_WARPS, ("partial_ptr",), VN=VN_CODES[vn], SUM_CLAMP=sum_clamp,
            SUM_GRAD=sum_grad, USE_INT64=wide, BLOCK_G=block_g, BLOCK_M=block_m,
        ))  # fmt: skip
    for n_groups in sorted({_finish_block(1 << i) for i in range(25)}):
        variants.append(_launch.KernelVariant.make(
            __name__, "_volume_norm_finish_kernel", "fp32", 4, ("partial_ptr", "mean_ptr"), BLOCK_SIZE=n_groups
        ))  # fmt: skip
    return variants
