"""LU-parametrised invertible 1×1 convolution with volume normalisation.

After each coupling the transformed level is mixed across channels by an
invertible C×C matrix W applied at every pixel (Sec. 3.2 of the PyramidFlow
paper, after Glow). W is kept in LU form so that its inverse is two
triangular solves, and its log-diagonal is volume-normalised so that
``det W = ±1``: the conv never changes volume.

notation: ``P`` a fixed permutation, ``L`` unit lower-triangular, ``U`` strict
upper-triangular, ``w_s`` the log-magnitudes of the diagonal and ``sign`` its
fixed signs; ``W = P · L · (U + diag(sign · exp(w_s - mean(w_s))))``.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CONV1X1_INITS", "InvertibleConv1x1"]

CONV1X1_INITS = ("orthogonal", "rotation", "identity")


def _random_orthogonal(channels: int, rotation: bool) -> Tensor:
    """A random orthogonal matrix (Haar-distributed), with ``det = +1`` when ``rotation``."""
    q, r = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]  # makes the draw uniform over the group
    if rotation and torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# NOTE [the factors in one gather]
# L and U are built from the parameters in one op: the vector [lower, upper,
# diagonal, 0, 1] is gathered by a fixed (2, C, C) index, which places each
# entry (a parameter, a diagonal value, or the 0s and 1s of the unit lower
# triangle) where `W = P L U` wants it, in the order the parameters are
# packed. The index and the two constants are shared by every conv of a size
# (cached per size, dtype and device) and made where the module is made or
# moved, not during a step: they are not buffers, because a block's buffers
# are copied and restored around every recomputation (NOTE [running stats
# under recomputation]) and these never change. On meta (the planner) they
# are made at each use, a few KiB, so that every prediction counts the same.
@functools.lru_cache(maxsize=None)
def _gather_constants(channels: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor]:
    """The flat gather index of ``(L, U)`` into ``[lower, upper, diagonal, 0, 1]``, and ``[0, 1]``
    (NOTE [the factors in one gather])."""
    c, pairs = channels, channels * (channels - 1) // 2
    rows, cols = torch.tril_indices(c, c, offset=-1, device="cpu")
    zero, one = 2 * pairs + c, 2 * pairs + c + 1
    lower = torch.full((c, c), zero, dtype=torch.long, device="cpu")
    lower[rows, cols] = torch.arange(pairs, device="cpu")
    lower.fill_diagonal_(one)
    upper = torch.full((c, c), zero, dtype=torch.long, device="cpu")
    upper[cols, rows] = pairs + torch.arange(pairs, device="cpu")
    upper[torch.arange(c, device="cpu"), torch.arange(c, device="cpu")] = 2 * pairs + torch.arange(c, device="cpu")
    index = torch.stack([lower, upper]).flatten().to(device)
    return index, torch.tensor([0.0, 1.0], dtype=dtype, device="cpu").to(device)


# NOTE [volume normalisation of the 1x1 conv]
# Subtracting mean(w_s) from the log-diagonal makes log|det W| =
# Σ (w_s - mean(w_s)) = 0 exactly, whatever the optimiser does to w_s:
# the conv is volume preserving, as the couplings are over the batch.
class InvertibleConv1x1(nn.Module):
    """Invertible channel mixing ``y = W x`` at every pixel, with ``|det W| = 1``.

    The free parameters are the strictly lower entries of ``L``, the strictly
    upper entries of ``U`` and ``w_s``: ``C(C-1)/2 + C(C-1)/2 + C = C²`` numbers.
    ``P`` and the signs are buffers fixed at construction.

    Args:
        channels: C, the channels of the level.
        init: ``"orthogonal"`` (a random orthogonal W, the default), ``"rotation"``
            (a random orthogonal W with ``det = +1``) or ``"identity"``.
        volume_norm: normalise ``w_s`` so that ``|det W| = 1`` (the method); ``False`` leaves ``w_s``
            free, as a plain Glow 1×1 conv (the "without VN" ablation), with log-det :meth:`log_abs_det`.
    """

    def __init__(self, channels: int, init: str = "orthogonal", volume_norm: bool = True) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"InvertibleConv1x1: channels must be at least 1, got {channels}.")
        if init not in CONV1X1_INITS:
            raise ValueError(f"InvertibleConv1x1: init must be one of {CONV1X1_INITS}, got {init!r}.")
        self.channels = channels
        self.volume_norm = bool(volume_norm)
        if init == "identity":
            weight = torch.eye(channels, dtype=torch.float64)
        else:
            weight = _random_orthogonal(channels, rotation=init == "rotation")
        p, lower, upper = torch.linalg.lu(weight)
        diagonal = torch.diagonal(upper)
        rows, cols = torch.tril_indices(channels, channels, offset=-1)
        dtype = torch.get_default_dtype()
        self.register_buffer("permutation", p.to(dtype))
        self.register_buffer("sign", torch.sign(diagonal).to(dtype))
        self.lower = nn.Parameter(lower[rows, cols].to(dtype))
        self.upper = nn.Parameter(upper[cols, rows].to(dtype))
        self.log_diagonal = nn.Parameter(torch.log(diagonal.abs()).to(dtype))
        self._gather_constants()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Moved or cast: the gather's constants for the new device and dtype, made now (NOTE [the factors in one gather])."""
        super()._apply(fn, recurse)
        self._gather_constants()
        return self

    def _gather_constants(self) -> Tuple[Tensor, Tensor]:
        if self.lower.is_meta:  # the planner's step: made at each use, so every prediction counts the same bytes
            return _gather_constants.__wrapped__(self.channels, self.lower.dtype, self.lower.device)
        return _gather_constants(self.channels, self.lower.dtype, self.lower.device)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, volume_norm={self.volume_norm}"

    def _log_magnitudes(self) -> Tensor:
        """``w_s``, volume-normalised or not: NOTE [volume normalisation of the 1x1 conv]."""
        if self.volume_norm:
            return self.log_diagonal - self.log_diagonal.sum() / self.channels  # the mean, in fewer ops
        return self.log_diagonal

    def log_abs_det(self) -> Tensor:
        """``log|det W|`` (a scalar; exactly 0 up to rounding with volume normalisation). Per pixel: multiply by H·W."""
        return self._log_magnitudes().sum()

    def _factors(self) -> Tuple[Tensor, Tensor]:
        """``L`` (unit lower) and ``U`` with its volume-normalised diagonal, as C×C matrices."""
        diagonal = self.sign * torch.exp(self._log_magnitudes())
        index, zero_one = self._gather_constants()
        values = torch.cat([self.lower, self.upper, diagonal, zero_one])
        factors = values.index_select(0, index).view(2, self.channels, self.channels)
        return factors[0], factors[1]

    def weight(self) -> Tensor:
        """``W = P L U``, ``(C, C)``; differentiable in the parameters."""
        return self._weight(*self._factors())

    def inverse_weight(self) -> Tensor:
        """``W⁻¹ = U⁻¹ L⁻¹ Pᵀ`` from two triangular solves, ``(C, C)``."""
        return self._inverse(*self._factors())

    def weight_and_inverse(self) -> Tuple[Tensor, Tensor]:
        """``(W, W⁻¹)`` from one factorisation: a block's rebuild needs both."""
        lower, upper = self._factors()
        return self._weight(lower, upper), self._inverse(lower, upper)

    def _weight(self, lower: Tensor, upper: Tensor) -> Tensor:
        return self.permutation @ lower @ upper

    def _inverse(self, lower: Tensor, upper: Tensor) -> Tensor:
        # W⁻¹ = U⁻¹ (L⁻¹ Pᵀ): two triangular solves with Pᵀ on the right-hand side, no inverse formed apart
        rotated = torch.linalg.solve_triangular(lower, self.permutation.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, rotated, upper=True)

    @staticmethod
    def apply(x: Tensor, matrix: Tensor) -> Tensor:
        """``matrix · x`` at every pixel: ``(C, C)`` on ``(N, C, H, W)``."""
        if matrix.dtype != x.dtype:
            matrix = matrix.to(x.dtype)
        return F.conv2d(x, matrix.view(*matrix.shape, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``y = W x`` at every pixel of ``x`` ``(N, C, H, W)``."""
        return self.apply(x, self.weight())

    def inverse(self, y: Tensor) -> Tensor:
        """``x = W⁻¹ y`` at every pixel of ``y`` ``(N, C, H, W)``."""
        return self.apply(y, self.inverse_weight())
