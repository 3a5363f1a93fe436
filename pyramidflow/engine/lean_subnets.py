"""A subnet's recorded evaluation with fewer hidden activations alive in its backward (NOTE [lean recorded evaluation]).

The coupling-aware rebuild evaluates each subnet once with a graph and backpropagates through it once
(NOTE [recorded subnets] in :mod:`.subnets`). At a batch of one that backward is the block's peak, and
autograd holds three hidden activations at once in it. Here an activation followed by a convolution
runs as one autograd step that keeps only the activation's output and drops it early. The modules'
own forwards compute the values; the backward calls torch's own ops (the convolution's backward, the
activation's backward), so the gradients are autograd's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.modules.module as _module_hooks
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .block import gradients_used
from .errors import _internal_assert
from .sample_chunks import treats_samples_alone

__all__ = ["lean_evaluation"]

# NOTE [lean recorded evaluation]
# Under autograd, the backward of conv(act(h)) computes the gradient of act's
# output r (convolution_backward) while act still saves r, then act's backward
# allocates h's gradient: three hidden activations alive at once, and at batch
# 1 the 64-channel layer of a conv3x3-ReLU-conv3x3 subnet at 256 px is the
# block's peak. Here the pair is one autograd step. Its forward runs act (in
# place where its input is a convolution's output, which nothing else reads:
# a convolution saves its input, not its output) and conv, and keeps r alone.
# Its backward, where oneDNN runs both the convolution's backward and the
# transposed convolution (torch's own choice of backend, asked first):
# 1. the weight and bias gradients: aten.convolution_backward, autograd's call,
#    asked for those two;
# 2. where act passes the gradient, from r, as a bool (a quarter of r in
#    float32); r is dropped;
# 3. r's gradient: the transposed convolution of the incoming gradient, which
#    oneDNN runs with its convolution-backward-data kernel (ONEDNN_VERBOSE:
#    brg_conv_fwd behind both, with AVX-512 and AVX2; equal to the bit);
# 4. act's backward in place on it: h's gradient. For LeakyReLU its own op
#    (leaky_relu_backward), given, a piece at a time, 1.0 / 0.0 where r passes
#    / does not in place of r; for ReLU the bits of the gradient multiplied
#    by the bool as integers: the gradient where it passes, +0.0 elsewhere
#    (NaN or not), which is what threshold_backward writes.
# One hidden activation and the bool are alive at a time. Elsewhere (float64,
# and small images, where torch picks its im2col kernels, whose transposed
# convolution takes scratch ten times r for a 3x3 kernel) step 1 also computes
# r's gradient, as autograd's one call does, and act's own backward op runs in
# place on it with r: two hidden activations instead of three. Read from r as
# torch reads it: ReLU passes where not r <= 0, i.e. where r != 0 for a
# ReLU's output (a NaN r passes; a dead unit gets exactly +0.0, a NaN incoming
# gradient included), LeakyReLU where r > 0 (for a slope >= 0 exactly where
# h > 0; a NaN is scaled, as torch does). Only where it is safe: the
# backward runs once (the engine's recorded graph is never retained; a second
# run is an internal error), r has no other user (consecutive modules of an
# nn.Sequential tree, every module a known class of NOTE [samples alone] in
# .sample_chunks, no container but nn.Sequential, no hooks below the subnet
# itself, none global), float32 or float64 on CPU without autocast (not
# measured on CUDA), a convolution with zero padding given as numbers, an
# activation not in place on the subnet's own input. Everything else runs as
# autograd would. The pair's modules stand in place for one call: the subnet's
# own forward and its hooks run as written.

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class _Derivative:
    """An activation's backward, read from its output ``r`` as torch reads it, run in place on a gradient."""

    backward_: Callable[[Tensor, Tensor], Any]  # (grad, r): torch's own backward op; grad becomes h's gradient
    passes: Callable[[Tensor, Tensor], Any]  # (r, out): out (bool) True where torch's backward passes the gradient
    from_passes_: Callable[[Tensor, Tensor], Any]  # (grad, passes): the same result as backward_, without r


def _relu_backward_(grad: Tensor, r: Tensor) -> None:
    torch.ops.aten.threshold_backward.grad_input(grad, r, 0, grad_input=grad)  # autograd's: 0 where r <= 0


def _relu_passes(r: Tensor, out: Tensor) -> None:
    torch.ne(r, 0, out=out)  # r <= 0 is r == 0 for a ReLU's output; a NaN passes


#: The integer type of each float type's bits.
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def _relu_from_passes_(grad: Tensor, passes: Tensor) -> None:
    grad.view(_BITS[grad.dtype]).mul_(passes)  # the gradient's bits, or those of +0.0: threshold_backward's result
    # (the bool is widened to the integer type on the way: a piece at a time, see _in_pieces)


def _leaky_passes(r: Tensor, out: Tensor) -> None:
    torch.gt(r, 0, out=out)  # leaky_relu_backward(grad, self, slope): self > 0 ? grad : grad * slope


def _leaky_backward_(slope: float) -> Callable[[Tensor, Tensor], Any]:
    def backward_(grad: Tensor, r: Tensor) -> None:
        torch.ops.aten.leaky_relu_backward.grad_input(grad, r, slope, False, grad_input=grad)

    return backward_


def _derivative_of(activation: nn.Module) -> Optional[_Derivative]:
    """The rule for ``activation`` (matched exactly: a subclass may change the maths), or ``None``."""
    if type(activation) is nn.ReLU:
        return _Derivative(_relu_backward_, _relu_passes, lambda grad, passes: _in_pieces(_relu_from_passes_, grad, passes))
    if type(activation) is nn.LeakyReLU and activation.negative_slope >= 0:  # then r > 0 exactly where its input is
        backward_ = _leaky_backward_(activation.negative_slope)

        def from_passes_(grad: Tensor, passes: Tensor) -> None:
            backward_(grad, passes.to(grad.dtype))  # 1.0 / 0.0 in place of r

        return _Derivative(backward_, _leaky_passes, lambda grad, passes: _in_pieces(from_passes_, grad, passes))
    return None


#: Pieces of the backward from the bool: what it is widened to (the gradient's type, or its bits' integer type) is
#: made a piece at a time, each an eighth of ``r`` (half the bool's bytes in float32), in few enough ATen calls to
#: cost nothing beside the convolutions.
_PIECES = 8


def _in_pieces(from_passes_: Callable[[Tensor, Tensor], Any], grad: Tensor, passes: Tensor) -> None:
    """``from_passes_(grad, passes)`` a piece at a time (at once where ``grad`` and ``passes`` differ in layout)."""
    if grad.stride() != passes.stride() or not _dense(grad):
        from_passes_(grad, passes)
        return
    for piece, live in zip(_flat(grad).chunk(_PIECES), _flat(passes).chunk(_PIECES)):
        from_passes_(piece, live)


def _dense(x: Tensor) -> bool:
    return x.untyped_storage().nbytes() == x.numel() * x.element_size() and (
        x.is_contiguous() or any(x.is_contiguous(memory_format=f) for f in _layouts(x))
    )


def _flat(x: Tensor) -> Tensor:
    """``x``'s elements in memory order (``x`` dense)."""
    return x.as_strided((x.numel(),), (1,), x.storage_offset())


def _layouts(x: Tensor) -> Tuple[torch.memory_format, ...]:
    return {4: (torch.channels_last,), 5: (torch.channels_last_3d,)}.get(x.dim(), ())


def _layout_of(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is dense in (channels-last where it is that and not also plain contiguous)."""
    if not x.is_contiguous():
        for layout in _layouts(x):
            if x.is_contiguous(memory_format=layout):
                return layout
    return torch.contiguous_format


@dataclass
class _Pair:
    """An activation and the convolution after it, as one step."""

    activation: nn.Module
    convolution: nn.Module
    derivative: _Derivative
    in_place: bool  # the activation may write over its input (NOTE [lean recorded evaluation])


@contextlib.contextmanager
def _in_place(activation: nn.Module, in_place: bool) -> Iterator[None]:
    """The activation's own forward, in place when asked (ReLU's and LeakyReLU's ``inplace``)."""
    before = activation.inplace
    activation.inplace = before or in_place
    try:
        yield
    finally:
        activation.inplace = before


class _ActivationConvolution(torch.autograd.Function):
    """``convolution(activation(x))``, keeping only the activation's output (NOTE [lean recorded evaluation])."""

    @staticmethod
    def forward(ctx, pair: _Pair, x: Tensor, *weight_and_bias: Tensor) -> Tensor:  # type: ignore[override]
        with _in_place(pair.activation, pair.in_place):
            r = pair.activation(x)
        ctx.pair = pair
        ctx.r = r  # not save_for_backward: the backward drops it before it allocates the next gradient
        return pair.convolution(r)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        r, ctx.r = ctx.r, None
        _internal_assert(r is not None, "a lean recorded evaluation was backpropagated twice")
        pair: _Pair = ctx.pair
        conv = pair.convolution
        need_x, *need_params = gradients_used(ctx, 1)
        need_w = need_params[0]
        need_b = len(need_params) > 1 and need_params[1]
        spatial = r.dim() - 2
        output_padding = _output_padding(conv, r.shape[2:], grad.shape[2:])
        transposed = need_x and _both_on_onednn(r, grad, conv, output_padding)
        if transposed:  # once for both calls, as oneDNN's convolution backward would for itself
            grad = grad.contiguous(memory_format=_layout_of(r))
        grad_x = grad_w = grad_b = None
        if need_w or need_b or (need_x and not transposed):
            bias_sizes = [conv.out_channels] if conv.bias is not None else None
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, r, conv.weight, bias_sizes, conv.stride, conv.padding, conv.dilation, False,
                [0] * spatial, conv.groups, [need_x and not transposed, need_w, need_b],
            )
        if need_x and not transposed:
            pair.derivative.backward_(grad_x, r)  # torch's own backward, in place
        elif need_x:
            passes = torch.empty_like(r, dtype=torch.bool)
            pair.derivative.passes(r, passes)
            del r
            grad_x = torch.ops.aten.convolution(
                grad, conv.weight, None, conv.stride, conv.padding, conv.dilation, True, output_padding, conv.groups
            )
            del grad
            pair.derivative.from_passes_(grad_x, passes)
        grads = (grad_x, grad_w, grad_b)
        return (None, *grads[: 1 + len(need_params)])


#: The backends of a transposed convolution that run im2col kernels: scratch ten times the result (3x3).
_SLOW_TRANSPOSED = tuple(
    getattr(torch._C._ConvBackend, name)
    for name in ("SlowTranspose2d", "SlowTranspose3d", "Empty", "MkldnnEmpty", "Overrideable")
    if hasattr(torch._C, "_ConvBackend") and hasattr(torch._C._ConvBackend, name)
)


def _both_on_onednn(r: Tensor, grad: Tensor, conv: nn.Module, output_padding: List[int]) -> bool:
    """Whether oneDNN runs both the convolution's backward on ``r`` and the transposed convolution of ``grad``
    (then both run its convolution kernel: NOTE [lean recorded evaluation])."""
    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None or not _SLOW_TRANSPOSED:
        return False
    args = (conv.weight, None, list(conv.stride), list(conv.padding), list(conv.dilation))
    try:
        forward = select(r, *args, False, [0] * (r.dim() - 2), conv.groups, None)
        transposed = select(grad, *args, True, output_padding, conv.groups, None)
    except (RuntimeError, TypeError):
        return False
    return forward == torch._C._ConvBackend.Mkldnn and transposed not in _SLOW_TRANSPOSED


def _output_padding(conv: nn.Module, size: Sequence[int], out_size: Sequence[int]) -> List[int]:
    """The transposed convolution's ``output_padding`` that gives back the input's size ``size`` (strides > 1
    drop trailing rows)."""
    return [
        n - ((m - 1) * s - 2 * p + d * (k - 1) + 1)
        for n, m, s, p, d, k in zip(size, out_size, conv.stride, conv.padding, conv.dilation, conv.kernel_size)
    ]


class _Lean(nn.Module):
    """Stands in for the activation of a pair during one call; the convolution's place holds an identity."""

    def __init__(self, pair: _Pair) -> None:
        super().__init__()
        self.pair = (pair,)  # a tuple: not registered as submodules, nothing else changes in the module tree

    def forward(self, x: Tensor) -> Tensor:
        (pair,) = self.pair
        params = (pair.convolution.weight,) + ((pair.convolution.bias,) if pair.convolution.bias is not None else ())
        return _ActivationConvolution.apply(pair, x, *params)


def _chain(subnet: nn.Module) -> Optional[List[Tuple[nn.Module, str, nn.Module]]]:
    """The modules an ``nn.Sequential`` tree runs, in order, as ``(parent, name, module)``; ``None`` for any other
    tree (a container of another kind may use an output twice)."""
    if type(subnet) is not nn.Sequential:
        return None
    chain = []
    for name, module in subnet._modules.items():
        if module is None:
            continue
        if type(module) is nn.Sequential:
            inner = _chain(module)
            if inner is None:
                return None
            chain += inner
        elif next(module.children(), None) is not None:
            return None
        else:
            chain.append((subnet, name, module))
    return chain


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _global_hooks() -> bool:
    return any(
        getattr(_module_hooks, name, None)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    )


def _convolution_fits(conv: nn.Module) -> bool:
    return type(conv) in _CONVOLUTIONS and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _steps(subnet: nn.Module, inputs: Sequence[Any]) -> List[Tuple[nn.Module, str, Optional[_Pair]]]:
    """The pairs of ``subnet`` that NOTE [lean recorded evaluation] runs as one step on ``inputs``, as
    ``(parent, name, pair)`` of each activation, and of each convolution after it; empty where it does not apply."""
    if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
        return []
    x = inputs[0]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
        return []
    chain = _chain(subnet)
    if chain is None or len(chain) < 2 or _global_hooks() or not treats_samples_alone(subnet):
        return []
    modules = [m for _, _, m in chain]
    if len({id(m) for m in modules}) != len(modules) or any(_hooked(m) for m in subnet.modules() if m is not subnet):
        return []
    steps = []
    i = 0
    while i + 1 < len(chain):
        (parent, name, act), conv = chain[i], chain[i + 1][2]
        derivative = _derivative_of(act)
        first_in_place = i == 0 and getattr(act, "inplace", False)  # it would write into the subnet's own input
        fits = derivative is not None and not first_in_place and _convolution_fits(conv)
        if fits and all(p.dtype == x.dtype for p in conv.parameters()):
            after_convolution = i > 0 and type(chain[i - 1][2]) in _CONVOLUTIONS
            steps.append((parent, name, _Pair(act, conv, derivative, in_place=after_convolution)))
            steps.append((chain[i + 1][0], chain[i + 1][1], None))
            i += 2
        else:
            i += 1
    return steps


@contextlib.contextmanager
def lean_evaluation(subnet: nn.Module, inputs: Sequence[Any]) -> Iterator[None]:
    """For one call ``subnet(*inputs)`` inside it: each activation followed by a convolution runs as one step that
    keeps less for backward (NOTE [lean recorded evaluation]). Only for an evaluation whose graph is
    backpropagated once and not retained (the coupling-aware rebuild's)."""
    steps = _steps(subnet, inputs)
    originals = [(parent, name, parent._modules[name]) for parent, name, _ in steps]
    try:
        for parent, name, pair in steps:
            parent._modules[name] = _Lean(pair) if pair is not None else nn.Identity()
        yield
    finally:
        for parent, name, module in originals:
            parent._modules[name] = module
