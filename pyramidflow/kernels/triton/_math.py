"""Device-side helpers shared by the Triton kernels: atan, the soft clamp, element indices.

Everything here is a ``@triton.jit`` function inlined into the kernels of
:mod:`.affine_coupling` and :mod:`.volume_norm`, plus :func:`atan`, a small
launcher used to test the arctangent against ``torch.atan``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["atan", "launch_variants"]

_ATAN_BLOCK = 1024  # elements per program of atan()


# NOTE [atan without libdevice]
# Triton's interpreter has no libdevice, so ``atan`` is written here from
# operations both the interpreter and the compiler support, and the same
# source runs in both. With a = |x|, two identities reduce the argument to
# |u| <= 0.66:
#   a > tan(3pi/8) ~ 2.414:    atan(a) = pi/2 + atan(-1/a)         (|u| <= 0.414)
#   0.66 < a <= tan(3pi/8):    atan(a) = pi/4 + atan((a - 1)/(a + 1)) (-0.205 < u <= 0.414)
# and atan(u) = u + u^3 P(u^2), P of degree 6 fitted here (iteratively
# reweighted least squares) for the smallest maximum relative error on
# [0, 0.66^2]: 5.9e-10 in exact arithmetic, far below float32's 6e-8. It is
# evaluated by Horner's rule in float32 and the sign restored at the end.
# The split at 0.66 rather than tan(pi/8) keeps a - 1 exact (a >= 1/2), and
# pi/2, pi/4 are added as a float32 head plus a tail (their rounding error):
# together these take the worst error from 2.5 ulps to about 1 ulp.
# Edge cases: +-inf -> +-pi/2 (1/inf = 0), +-0 -> 0, NaN -> NaN; 1/a and
# (a - 1)/(a + 1) are evaluated on a harmless 1 where unused, so nothing
# divides by zero or makes inf/inf. Divisions use ``tl.math.div_rn`` (IEEE
# round-to-nearest): a plain ``/`` compiles to an approximate float32 division
# on NVIDIA GPUs, whose error would add to the result's.
@triton.jit
def _atan(x):
    """Arctangent of a float32 block, accurate to a few float32 ulps (NOTE [atan without libdevice])."""
    a = tl.abs(x)
    big = a > 2.414213562373095  # tan(3pi/8)
    mid = (a > 0.66) & (a <= 2.414213562373095)
    a_big = tl.where(big, a, 1.0)  # keeps 1/a and (a - 1)/(a + 1) finite where they are not used
    a_mid = tl.where(mid, a, 1.0)
    u = tl.where(big, -tl.math.div_rn(1.0, a_big), tl.where(mid, tl.math.div_rn(a_mid - 1.0, a_mid + 1.0), a))
    # pi/2 and pi/4 as float32 head + tail, so that the offset adds no rounding error of its own
    offset_head = tl.where(big, 1.5707963705062866, tl.where(mid, 0.7853981852531433, 0.0))
    offset_tail = tl.where(big, -4.371139e-08, tl.where(mid, -2.1855694e-08, 0.0))
    z = u * u
    p = -1.7820036e-02
    p = p * z + 5.16291e-02
    p = p * z - 8.305821e-02
    p = p * z + 1.0968604e-01
    p = p * z - 1.4271444e-01
    p = p * z + 1.999931e-01
    p = p * z - 3.3333322e-01
    result = offset_head + (offset_tail + (u + u * z * p))
    return tl.where(x < 0, -result, result)


@triton.jit
def soft_clamp(r, clamp):
    """``clamp * (2/pi) * atan(r / clamp)`` in float32, as ``reference.soft_clamp``."""
    return clamp * 0.6366197723675814 * _atan(tl.math.div_rn(r, clamp))


@triton.jit
def soft_clamp_grad(r, clamp):
    """Derivative of :func:`soft_clamp` with respect to ``r``: ``(2/pi) / (1 + (r/c)^2)``."""
    q = tl.math.div_rn(r, clamp)
    return tl.math.div_rn(0.6366197723675814, 1.0 + q * q)


@triton.jit
def nchw_index(idx, C, H, W, CHANNELS_LAST: tl.constexpr):
    """The ``(n, c, h, w)`` coordinates of flat indices in the visiting order.

    ``CHANNELS_LAST`` visits ``(n, h, w, c)`` with ``c`` fastest; otherwise
    ``(n, c, h, w)`` with ``w`` fastest.
    """
    if CHANNELS_LAST:
        c = idx % C
        rest = idx // C
        w = rest % W
        rest = rest // W
        h = rest % H
        n = rest // H
    else:
        w = idx % W
        rest = idx // W
        h = rest % H
        rest = rest // H
        c = rest % C
        n = rest // C
    return n, c, h, w


@triton.jit
def _atan_kernel(
    x_ptr,  # input, float32, contiguous
    out_ptr,  # output, float32, contiguous
    n_elements,  # number of elements
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    # one program per BLOCK_SIZE consecutive elements
    idx = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = idx < n_elements
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, _atan(x), mask=mask)


def atan(x: Tensor) -> Tensor:
    """Elementwise arctangent of a float32 tensor with the kernels' :func:`_atan` (for tests).

    Args:
        x: any float32 tensor; it is read as a flat contiguous copy.

    Returns:
        ``atan(x)``, float32, shape of ``x``.
    """
    if not isinstance(x, Tensor) or x.dtype != torch.float32:
        raise TypeError(f"atan: x must be a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}; cast it with .float().")
    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat)
    _atan_kernel[(triton.cdiv(flat.numel(), _ATAN_BLOCK),)](flat, out, flat.numel(), BLOCK_SIZE=_ATAN_BLOCK)
    return out.view(x.shape)


def launch_variants() -> list:
    """The one variant :func:`atan` launches (float32, 1024 elements per program)."""
    from ._launch import KernelVariant  # noqa: PLC0415

    return [KernelVariant.make(__name__, "_atan_kernel", "fp32", 4, BLOCK_SIZE=_ATAN_BLOCK)]
