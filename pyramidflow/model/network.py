"""The coupling network F (:class:`AffineParameterNet`): its definition, on the whole image or a window,
and its backward on a window written out (NOTE [F written once]).

notation: ``cond`` F's input, ``hidden`` its hidden activation, ``rt`` its output (``r`` then ``t``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.errors import _internal_assert

__all__ = ["AffineParameterNet", "WindowState"]


Pads = Tuple[int, int, int, int]  # zeros around a tensor, in F.pad order (left, right, top, bottom)


def _conv(x: Tensor, weight: Tensor, pad: Pads, stride: int) -> Tensor:
    """``conv2d(x, weight)`` over ``x`` with ``pad`` zeros around it: the conv's own padding where it is the
    same on every side (no padded copy), ``F.pad`` otherwise (a tile at the image border)."""
    if len(set(pad)) == 1:
        return F.conv2d(x, weight, stride=stride, padding=pad[0])
    return F.conv2d(F.pad(x, pad), weight, stride=stride)


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, pad: Pads, stride: int, mask: Tuple[bool, bool]):
    """Gradients of :func:`_conv` for ``x`` and ``weight``, as autograd computes them (``None`` where ``mask``
    says not wanted; for the input gradient only ``x``'s shape is read)."""
    symmetric = len(set(pad)) == 1
    left, right, top, bottom = pad
    x_in = x if symmetric else (F.pad(x, pad) if mask[1] else x.new_empty(1).expand(
        *x.shape[:-2], x.shape[-2] + top + bottom, x.shape[-1] + left + right))
    padding = [pad[0], pad[0]] if symmetric else [0, 0]
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x_in, weight, None, [stride, stride], padding, [1, 1], False, [0, 0], 1, [mask[0], mask[1], False]
    )
    if grad_x is not None and not symmetric:
        grad_x = grad_x[..., top : grad_x.shape[-2] - bottom, left : grad_x.shape[-1] - right]
    return grad_x, grad_w


#: LeakyReLU's backward makes a temporary of the mask in the gradient's dtype at most this large (bytes).
_MASK_BYTES = 8 * 2**20


def _leaky_relu_backward_(grad: Tensor, positive: Tensor, slope: float) -> None:
    """LeakyReLU's backward over ``grad`` in place, as autograd computes it (``grad`` where the input was
    positive, ``grad * slope`` elsewhere), in as few chunks of channels as keep the mask's temporary under
    :data:`_MASK_BYTES` (one for a small window: fewer, larger ops)."""
    chunks = min(grad.shape[1], -(-grad.numel() * grad.element_size() // _MASK_BYTES))
    step = -(-grad.shape[1] // max(1, chunks))
    for start in range(0, grad.shape[1], step):
        part, sign = grad[:, start : start + step], positive[:, start : start + step]
        torch.ops.aten.leaky_relu_backward.grad_input(part, sign.to(grad.dtype), slope, True, grad_input=part)


def _accumulated(grad: Tensor, into: Optional[Tuple[Tensor, Tensor]], which: int) -> Tensor:
    """``grad`` added into ``into[which]`` (returned), or ``grad`` itself without ``into``."""
    return grad if into is None else into[which].add_(grad)


class WindowState:
    """What F's backward on a window needs of its hidden layer, held until :meth:`AffineParameterNet.window_backward`
    takes it: the activation (LeakyReLU, whose backward needs only its sign) or the pre-activation (any other)."""

    __slots__ = ("hidden",)

    def __init__(self, hidden: Tensor) -> None:
        self.hidden: Optional[Tensor] = hidden

    def take(self) -> Tensor:
        hidden, self.hidden = self.hidden, None
        _internal_assert(hidden is not None, "a WindowState was used for two backward passes")
        return hidden


# NOTE [F written once]
# F's maths lives in AffineParameterNet alone: its modules (conv_in, activation,
# conv_out) are read on every path, so changing the activation or the width there
# changes the plain, lean and tiled paths alike. `window` runs F on a window of
# the conditioning input with the zeros the model's padding puts around it
# (the whole image is the window with k // 2 on every side: `joint`), and
# `window_backward` is its backward written out: conv_out's weight gradient
# first, then only the sign of the hidden activation is kept (LeakyReLU's
# backward needs no more) and the activation is freed before its gradient is
# made, so a window never holds two hidden-sized tensors of its own. Any other
# activation keeps its pre-activation and backpropagates through the module by
# autograd: exact, with one hidden-sized tensor more.


class AffineParameterNet(nn.Module):
    """The network F giving the raw log-scale and the shift of a coupling.

    ``conv k×k (in → hidden, no bias) → LeakyReLU → conv k×k (hidden → 2C, no bias)``,
    zero padding. The last conv is zero-initialised, so every coupling starts
    as the identity (before its 1×1 conv) and training starts from a flow
    that is only a channel rotation.

    Args:
        in_channels: channels of the conditioning input (C, or 2C for three-level blocks).
        channels: C, the channels of the transformed level.
        hidden_channels: width of the hidden layer (2C in the method).
        kernel_size: odd kernel size k.
    """

    def __init__(self, in_channels: int, channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"AffineParameterNet: kernel_size must be a positive odd number, got {kernel_size}.")
        padding = kernel_size // 2
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding, bias=False)
        self.activation = nn.LeakyReLU(inplace=True)  # saves its output only: one hidden activation less per block
        self.conv_out = nn.Conv2d(hidden_channels, 2 * channels, kernel_size, padding=padding, bias=False)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, cond: Tensor) -> Tuple[Tensor, Tensor]:
        """``cond`` ``(N, in, H, W)`` -> ``(r, t)``, each ``(N, C, H, W)``."""
        r, t = self.joint(cond).chunk(2, dim=1)
        return r, t

    def joint(self, cond: Tensor) -> Tensor:
        """``cond`` ``(N, in, H, W)`` -> ``rt`` ``(N, 2C, H, W)``: ``r`` then ``t`` in one tensor."""
        return self.window(cond)

    def window(self, cond: Tensor, input_pad: Optional[Pads] = None, hidden_pad: Optional[Pads] = None,
               stride: int = 1) -> Tensor:
        """F on a window (NOTE [F written once]): ``rt`` from ``cond`` ``(N, in, h, w)``.

        Args:
            cond: F's input on the window.
            input_pad, hidden_pad: the zeros around the input and around the hidden activation (``F.pad``
                order), where the window meets the image border; ``None``: ``k // 2`` on every side (the whole image).
            stride: the second conv's stride (2 for a ``"down"`` block's window: only the pixels kept by
                resizing after are computed).
        """
        hidden = self.activation(_conv(cond, self.conv_in.weight, self._pad(input_pad), 1))
        return _conv(hidden, self.conv_out.weight, self._pad(hidden_pad), stride)

    def _pad(self, pad: Optional[Pads]) -> Pads:
        return (self.conv_in.weight.shape[-1] // 2,) * 4 if pad is None else pad

    def _leaky(self) -> bool:
        """Whether the hand-written backward applies: a LeakyReLU (or ReLU-like slope 0) whose sign is its input's."""
        return type(self.activation) is nn.LeakyReLU and self.activation.negative_slope >= 0

    def activation_has_parameters(self) -> bool:
        """Whether the activation has parameters of its own (a PReLU): :meth:`window_backward` gives none of
        their gradients, so such a network runs its backward under plain autograd."""
        return any(True for _ in self.activation.parameters())

    @torch.no_grad()
    def window_state(self, cond: Tensor, input_pad: Optional[Pads] = None) -> WindowState:
        """The hidden layer of :meth:`window` as its backward needs it, without a graph."""
        hidden = _conv(cond, self.conv_in.weight, self._pad(input_pad), 1)
        return WindowState(self.activation(hidden) if self._leaky() else hidden)

    @torch.no_grad()
    def window_with_state(self, cond: Tensor, input_pad: Optional[Pads] = None, hidden_pad: Optional[Pads] = None,
                          stride: int = 1) -> Tuple[Tensor, WindowState]:
        """:meth:`window` without a graph, and the state its backward needs (:meth:`window_backward`)."""
        state = self.window_state(cond, input_pad)
        if self._leaky():
            hidden = state.hidden
        else:  # the state keeps the pre-activation: an in-place activation works on a copy
            hidden = self.activation(state.hidden.clone() if getattr(self.activation, "inplace", False) else state.hidden)
        return _conv(hidden, self.conv_out.weight, self._pad(hidden_pad), stride), state

    def window_backward(self, state: WindowState, cond: Tensor, grad_rt: Tensor, input_pad: Optional[Pads] = None,
                        hidden_pad: Optional[Pads] = None, stride: int = 1, need_cond: bool = True,
                        into: Optional[Tuple[Tensor, Tensor]] = None):
        """The backward of :meth:`window`, by hand (NOTE [F written once]), as autograd computes it.

        Args:
            state: from :meth:`window_with_state` or :meth:`window_state`; emptied here.
            cond: F's input on the window, detached.
            grad_rt: the gradient of ``rt``.
            input_pad, hidden_pad, stride: as given to :meth:`window`.
            need_cond: whether the gradient of ``cond`` is wanted.
            into: the weight gradients of earlier windows, ``(conv_in's, conv_out's)``: this window's are
                added into them as they come (no weight-sized temporary waits for the rest).

        Returns:
            ``(grad_cond or None, grad of conv_in's weight, grad of conv_out's weight)``; the weight
            gradients are ``into``'s tensors when it is given.
        """
        w_in, w_out = self.conv_in.weight.detach(), self.conv_out.weight.detach()
        input_pad, hidden_pad = self._pad(input_pad), self._pad(hidden_pad)
        hidden = state.take()
        shape = hidden.shape
        if self._leaky():
            grad_w_out = _accumulated(_conv_backward(grad_rt, hidden, w_out, hidden_pad, stride, (False, True))[1], into, 1)
            positive = hidden > 0  # all LeakyReLU's backward needs: the activation and its gradient never coexist
            del hidden
            grad_h = _conv_backward(grad_rt, grad_rt.new_empty(1).expand(shape), w_out, hidden_pad, stride, (True, False))[0]
            _leaky_relu_backward_(grad_h, positive, self.activation.negative_slope)
            del positive
        else:
            with torch.enable_grad():
                pre = hidden.detach().requires_grad_(True)
                activation = self.activation(pre.clone() if getattr(self.activation, "inplace", False) else pre)
            grad_w_out = _accumulated(_conv_backward(grad_rt, activation.detach(), w_out, hidden_pad, stride, (False, True))[1], into, 1)
            grad_a = _conv_backward(grad_rt, grad_rt.new_empty(1).expand(shape), w_out, hidden_pad, stride, (True, False))[0]
            (grad_h,) = torch.autograd.grad(activation, pre, grad_a)
            del hidden, pre, activation, grad_a
        grad_cond, grad_w_in = _conv_backward(grad_h, cond, w_in, input_pad, 1, (need_cond, True))
        return grad_cond, _accumulated(grad_w_in, into, 0), grad_w_out
