"""A ready affine coupling block for plain (single-tensor) flows, with the fused backward path.

The maths (soft clamp, ``exp(s) * x + t`` and its inverse) is the kernels'
reference; this module only splits channels and owns the network. The clamped
log-scale is computed once per call and serves the map and the log-determinant.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import kernels
from .block import InvertibleModule, LogDet, Tensors, Writable

__all__ = ["AffineCoupling"]


class AffineCoupling(InvertibleModule):
    """Affine coupling over channels: ``y_b = exp(s(x_a)) * x_b + t(x_a)``, ``y_a = x_a``.

    One half of the channels (``x_a``, the conditioning half) passes through
    unchanged and feeds a small conv network giving the raw log-scale ``r``
    and shift ``t`` of the other half ``x_b``; ``s = clamp * (2/pi) * atan(r / clamp)``.
    The last conv is zero-initialised, so the block starts as the identity.

    In backward, :meth:`reconstruct` evaluates the network once: the
    conditioning half is read from the output, the network runs with grad on
    it, and the same ``(r, t)`` serve the reconstruction and the local graph.

    Args:
        channels: channels of the input ``(N, channels, H, W)``; at least 2.
        hidden_channels: width of the network's hidden layer.
        kernel_size: odd kernel size of the network's convolutions.
        clamp: soft-clamp bound of the log-scale.
        parity: 0 transforms the second half of the channels, 1 the first;
            alternate it between consecutive blocks.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        clamp: float = 2.0,
        parity: int = 0,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"AffineCoupling: channels must be at least 2, got {channels}.")
        if kernel_size % 2 != 1:
            raise ValueError(f"AffineCoupling: kernel_size must be odd, got {kernel_size}.")
        if parity not in (0, 1):
            raise ValueError(f"AffineCoupling: parity must be 0 or 1, got {parity}.")
        half = channels // 2
        self.channels = channels
        self.parity = parity
        self.clamp = clamp
        # notation: a the conditioning channels, b the transformed ones.
        self._a = slice(0, half) if parity == 0 else slice(half, channels)
        self._b = slice(half, channels) if parity == 0 else slice(0, half)
        c_a, c_b = half if parity == 0 else channels - half, channels - half if parity == 0 else half
        padding = kernel_size // 2
        self.net = nn.Sequential(
            nn.Conv2d(c_a, hidden_channels, kernel_size, padding=padding),
            nn.LeakyReLU(inplace=True),  # saves its output only: one hidden activation less per block
            nn.Conv2d(hidden_channels, 2 * c_b, kernel_size, padding=padding),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _log_scale(self, x_a: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(s, t, logdet)`` from the conditioning half: the network, then the soft clamp, once."""
        r, t = self.net(x_a).chunk(2, dim=1)
        s, _ = kernels.log_scale(r, volume_norm=None, clamp=self.clamp)
        return s, t, s.flatten(1).sum(dim=1)

    def _check_channels(self, x: Tensor, method: str) -> None:
        """A shape comparison only: the channel slices would otherwise silently cut another input."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"AffineCoupling.{method}: built for (N, {self.channels}, H, W) inputs, got shape {tuple(x.shape)}; "
                f"build it with channels={x.shape[1] if x.dim() == 4 else '<C>'} or fix the input."
            )

    def _join(self, y_a: Tensor, y_b: Tensor) -> Tensor:
        return torch.cat((y_a, y_b) if self.parity == 0 else (y_b, y_a), dim=1)

    def forward(self, xs: Tensors) -> Tuple[Tensors, LogDet]:
        (x,) = xs
        self._check_channels(x, "forward")
        s, t, logdet = self._log_scale(x[:, self._a])
        return (self._join(x[:, self._a], kernels.scale_shift(x[:, self._b], s, t)),), logdet

    def inverse(self, ys: Tensors) -> Tuple[Tensors, LogDet]:
        (y,) = ys
        self._check_channels(y, "inverse")
        s, t, logdet = self._log_scale(y[:, self._a])
        return (self._join(y[:, self._a], kernels.scale_shift_inverse(y[:, self._b], s, t)),), -logdet

    def reconstruct(self, ys: Tensors, writable: Optional[Writable] = None) -> Tuple[Tensors, Tensors, LogDet]:
        (y,) = ys
        # NOTE [filling the input leaf]
        # The input leaf x starts as y (its storage when the engine owns it,
        # else a copy): its conditioning half is already right. The network
        # runs once, with grad, on that half; the transformed half is then
        # written into x through `.data`, which does not bump x's version
        # counter that the network's graph has recorded (the conditioning half
        # it saved is not touched by the write). The local output is a
        # placeholder view of y whose backward routes the two halves of the
        # gradient (NOTE [placeholder outputs] in pyramidflow.model.coupling_regions): the
        # concatenation is never made again.
        owned = writable is not None and writable.outputs[0]
        x = (y.detach() if owned else y.detach().clone()).requires_grad_(True)
        s, t, logdet = self._log_scale(x[:, self._a])
        with torch.no_grad():
            x.data[:, self._b].copy_(kernels.scale_shift_inverse(y[:, self._b], s, t))
        y_b = kernels.scale_shift(x[:, self._b], s, t)
        y_local = _Join.apply(self._a, self._b, x[:, self._a], y_b, y.detach())
        return (x,), (y_local,), logdet


class _Join(torch.autograd.Function):
    """``y`` from its halves for backward only: returns a view of the given ``y`` and splits the gradient."""

    @staticmethod
    def forward(ctx, a, b, y_a, y_b, y):  # type: ignore[override]
        ctx.a, ctx.b = a, b
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return None, None, grad[:, ctx.a], grad[:, ctx.b], None
