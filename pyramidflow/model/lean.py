"""The pyramid coupling's memory-lean ops for invertible backward: the network and the transformed level.

Two autograd Functions, used by :meth:`PyramidCoupling.reconstruct` (and the network's also by the
no-grad forward). Each keeps only what its backward cannot do without and computes its gradients
exactly as autograd would (the same aten backward ops), sample by sample:

* :func:`recomputed_network`: F = ``conv k×k → LeakyReLU → conv k×k`` on the nearest-resized,
  concatenated conditioning levels. It keeps the (small) conditioning levels only; its backward
  recomputes the hidden activation one sample and one chunk of hidden channels at a time
  (NOTE [hidden activation recomputed]).
* :func:`transformed_level`: ``y_k = W · affine(x_k; r, t)``, rebuilt from ``u = W⁻¹ y_k``. It keeps
  ``(r, t)`` and ``u``; its backward rebuilds ``x_k`` into ``u``'s storage and writes ``grad_r``,
  ``grad_t`` over ``(r, t)`` and ``grad_x`` over the incoming gradient where the engine allows it
  (NOTE [placeholder outputs]).

notation: ``N`` batch, ``C`` channels of the level, ``cond`` F's input, ``h`` its hidden
pre-activation, ``a = LeakyReLU(h)``, ``rt`` F's output ``(N, 2C, H, W)`` (``r`` then ``t``),
``u = W⁻¹ y_k``, ``g`` the incoming gradient of ``y_k``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from .._meta import samples_to_run

__all__ = ["conditioning", "recomputed_network", "transformed_level", "conv1x1_per_sample"]


def conditioning(parts: Sequence[Tensor], size: Optional[Tuple[int, int]]) -> Tensor:
    """F's input: each part nearest-resized to ``size`` (``None``: kept), concatenated over channels."""
    resized = [p if size is None or tuple(p.shape[-2:]) == tuple(size) else F.interpolate(p, size=size, mode="nearest") for p in parts]
    return resized[0] if len(resized) == 1 else torch.cat(resized, dim=1)


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int, mask: Tuple[bool, bool]):
    """Gradients of ``conv2d(x, weight, padding)`` for ``x`` and ``weight`` (no bias), as autograd computes them."""
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, [mask[0], mask[1], False]
    )
    return grad_x, grad_w


def _leaky_relu_backward_(grad: Tensor, positive: Tensor, slope: float) -> None:
    """LeakyReLU's backward over ``grad`` in place, as autograd computes it (``grad`` where the input was
    positive, ``grad * slope`` elsewhere), an eighth of the channels at a time so the temporaries stay small."""
    step = max(1, grad.shape[1] // 8)
    for start in range(0, grad.shape[1], step):
        part, sign = grad[:, start : start + step], positive[:, start : start + step]
        torch.ops.aten.leaky_relu_backward.grad_input(part, sign.to(grad.dtype), slope, True, grad_input=part)


# NOTE [hidden activation recomputed]
# F's hidden activation is 2C channels at the level's resolution: twice the
# level itself, and autograd keeps it for conv_out's weight gradient. Here
# backward recomputes it, one sample and one chunk of hidden channels at a
# time: conv_out's input gradient and weight gradient split exactly over the
# hidden channels, and conv_in's over its output channels, so each chunk
# needs only its own slice of h. The conditioning levels are resized inside,
# per sample, so the upsampled copy of a coarse level never exists for the
# whole batch. The last sample's hidden activation, made last by forward, is
# kept for backward (with one chunk of hidden channels), which does that sample first: one sample's activation
# exists from forward to backward, as one exists in each step of backward's
# loop, and conv_in runs once more per step for the other samples only.
class _RecomputedNetwork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, size, slope, padding, chunks, w_in, w_out, *parts):  # type: ignore[override]
        ctx.size, ctx.slope, ctx.padding, ctx.chunks = size, slope, padding, chunks
        ctx.save_for_backward(w_in, w_out, *parts)
        batch = parts[0].shape[0]
        rt = None
        for n in samples_to_run(batch, parts[0]):  # NOTE [samples on meta]
            ctx.kept = (None, None)  # the sample before's activation goes before this one's is made
            cond = conditioning([p[n : n + 1] for p in parts], size)
            a = F.leaky_relu(F.conv2d(cond, w_in, padding=padding), slope, inplace=True)
            out = F.conv2d(a, w_out, padding=padding)
            if rt is None:
                rt = out.new_empty((batch, *out.shape[1:]))
            rt[n : n + 1] = out
            if chunks == 1 and any(ctx.needs_input_grad):
                ctx.kept = (n, a)
            del cond, out, a  # before the next sample's are made
        return rt

    @staticmethod
    def backward(ctx, grad_rt):  # type: ignore[override]
        w_in, w_out, *parts = ctx.saved_tensors
        need_parts = ctx.needs_input_grad[6:]
        padding, slope = ctx.padding, ctx.slope
        grad_w_in, grad_w_out = torch.zeros_like(w_in), torch.zeros_like(w_out)
        grad_parts: List[Optional[Tensor]] = [torch.zeros_like(p) if need else None for p, need in zip(parts, need_parts)]
        hidden = w_in.shape[0]
        step = -(-hidden // ctx.chunks)
        kept, kept_hidden = ctx.kept
        del ctx.kept
        samples = list(samples_to_run(parts[0].shape[0], parts[0]))  # NOTE [samples on meta]
        for n in sorted(samples, key=lambda n: n != kept):  # the kept sample first
            with torch.enable_grad():
                leaves = [p[n : n + 1].detach().requires_grad_(need) for p, need in zip(parts, need_parts)]
                cond = conditioning(leaves, ctx.size)
            want_cond = any(need_parts)
            grad_cond = None
            g = grad_rt[n : n + 1]
            for start in range(0, hidden, step):
                chunk = slice(start, min(start + step, hidden))
                if n == kept:  # one chunk (forward keeps nothing otherwise): a is the activation itself
                    a, kept_hidden = kept_hidden, None
                else:
                    a = F.leaky_relu(F.conv2d(cond.detach(), w_in[chunk], padding=padding), slope, inplace=True)
                grad_w_out[:, chunk] += _conv_backward(g, a, w_out[:, chunk], padding, (False, True))[1]
                positive = a > 0  # all LeakyReLU's backward needs of a: a and its gradient never coexist
                shape = a.shape
                del a
                grad_h = _conv_backward(g, g.new_empty(1).expand(shape), w_out[:, chunk], padding, (True, False))[0]
                _leaky_relu_backward_(grad_h, positive, slope)
                del positive
                grad_c, grad_w = _conv_backward(grad_h, cond.detach(), w_in[chunk], padding, (want_cond, True))
                del grad_h
                grad_w_in[chunk] += grad_w
                if want_cond:
                    grad_cond = grad_c if grad_cond is None else grad_cond.add_(grad_c)
                del grad_c
            if grad_cond is not None:
                wanted = [(leaf, i) for i, leaf in enumerate(leaves) if leaf.requires_grad]
                for (_, i), grad in zip(wanted, torch.autograd.grad(cond, [leaf for leaf, _ in wanted], grad_cond)):
                    grad_parts[i][n : n + 1] += grad
        return (None, None, None, None, grad_w_in, grad_w_out, *grad_parts)


def recomputed_network(
    parts: Sequence[Tensor], size: Optional[Tuple[int, int]], w_in: Tensor, w_out: Tensor, slope: float, chunks: int = 2
) -> Tensor:
    """F's output ``rt`` ``(N, 2C, H, W)`` from the conditioning levels; backward recomputes the hidden activation.

    Args:
        parts: the conditioning levels ``(N, C, H_i, W_i)``, resized to ``size`` and concatenated.
        size: F's resolution ``(H, W)``, or ``None`` for that of the parts.
        w_in, w_out: the weights of F's two convs (no bias, zero padding of ``k // 2``).
        slope: the LeakyReLU's negative slope.
        chunks: hidden channels are recomputed in this many chunks (fewer: faster; more: less memory).
    """
    padding = w_in.shape[-1] // 2
    return _RecomputedNetwork.apply(None if size is None else tuple(size), slope, padding, chunks, w_in, w_out, *parts)


def conv1x1_per_sample(x: Tensor, weight: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``weight · x`` at every pixel, ``(C, C)`` on ``(N, C, H, W)``, one sample at a time into ``out`` (may be ``x``)."""
    out = torch.empty_like(x) if out is None else out
    kernel = weight.to(x.dtype)[:, :, None, None]
    for n in samples_to_run(x.shape[0], x):  # NOTE [samples on meta]
        out[n : n + 1] = F.conv2d(x[n : n + 1], kernel)
    return out


# NOTE [placeholder outputs]
# The engine backpropagates through a block's local outputs and never reads
# their values (InvertibleModule.reconstruct). The transformed level's local
# output W · affine(x; r, t) is therefore not computed: the op returns a view
# of y_k (equal to it until the storage is reused) whose backward is the exact
# backward of that map. x_k is a leaf on u's storage, filled by that backward
# (the engine reads it only afterwards, as for the Triton reconstruct).
class _TransformedLevel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options, x, rt, weight, y):  # type: ignore[override]
        ctx.options = options
        ctx.u = x.detach()  # x's storage holds u until backward turns it into x
        ctx.save_for_backward(rt, weight)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        rt, weight = ctx.saved_tensors
        u, (gradient_writable, affine_kwargs) = ctx.u, ctx.options
        del ctx.u
        grad_w = None
        if ctx.needs_input_grad[3]:  # y = W a at every pixel: dW = sum over pixels of g aᵀ, with a = u
            # NOTE [samples on meta]: each step's partial sum replaces the one before
            grad_w = sum(g[n].flatten(1) @ u[n].flatten(1).T for n in samples_to_run(g.shape[0], g))
        in_place = gradient_writable and g.dtype == u.dtype and g.is_contiguous() and not g.requires_grad
        grad_a = conv1x1_per_sample(g, weight.detach().T, out=g if in_place else None)
        r, t = rt.chunk(2, dim=1)
        # NOTE [backward into the operands] (kernels/reference.py): x over u, grad_x over grad_a, grad_r, grad_t over r, t.
        kernels.affine_coupling_bwd_into(u, r, t, grad_a, out=(u, grad_a, r, t), **affine_kwargs)
        return None, grad_a, rt, grad_w, None


def transformed_level(
    y: Tensor, rt: Tensor, weight: Tensor, inverse_weight: Tensor, *, writable: Tuple[bool, bool], affine_kwargs: dict
) -> Tuple[Tensor, Tensor]:
    """The transformed level's reconstruct: ``(x, y_local)`` with ``y = W · affine(x; r, t)``.

    Args:
        y: the level's output ``(N, C, H, W)``, detached.
        rt: F's output ``(N, 2C, H, W)`` with its graph; backward overwrites it with its gradient.
        weight: ``W`` ``(C, C)`` with its graph to the 1×1 conv's parameters.
        inverse_weight: ``W⁻¹`` ``(C, C)``.
        writable: whether ``y``'s storage, and the gradient that comes for ``y_local``, may be overwritten.
        affine_kwargs: ``volume_norm``, ``clamp``, ``running_mean``, ``backend`` of the affine op.

    Returns:
        ``x``, a leaf filled during the backward through ``y_local`` (NOTE [placeholder outputs]),
        and ``y_local``, differentiable in ``x``, ``rt`` and ``weight``.
    """
    storage_writable, gradient_writable = writable
    with torch.no_grad():
        u = conv1x1_per_sample(y, inverse_weight.detach(), out=y if storage_writable else None)
    x = u.detach().requires_grad_(True)
    y_local = _TransformedLevel.apply((gradient_writable, affine_kwargs), x, rt, weight, y)
    return x, y_local
