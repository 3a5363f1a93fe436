"""The per-level pairwise differences of the loss, as one autograd Function that keeps only the latents.

For every pair ``a < b`` of the batch and every level, ``mean_C |z_a - z_b|**p`` is a
``(pairs, 1, H_i, W_i)`` map. Written with autograd, the expression keeps several
``(pairs, C, H_i, W_i)`` temporaries (the two indexed copies, the difference, its magnitude)
from forward until backward, and makes more of them in backward. Here forward and backward run one channel at a time, so no temporary is bigger than one
``(pairs, H_i, W_i)`` slice, and nothing is saved but references to the latents.

notation: ``d = z_a,c - z_b,c`` one channel's difference per pair ``(pairs, H, W)``;
``m = (1/C)·sum_c |d|**p``; ``g`` the gradient of ``m``;
``dm/dz_a,c = -dm/dz_b,c = (p/C)·|d|**(p-1)·sign(d)``, summed over the pairs an image is in.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._meta import samples_to_run
from ..engine.errors import InvertibleError

__all__ = ["pairwise_level_differences"]


def _pairs(batch: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """The pair indices ``(first, second)``, in the order of ``torch.triu_indices(batch, batch, 1)``."""
    first, second = torch.triu_indices(batch, batch, offset=1, device=device)
    return first, second


def _channel_difference(z: Tensor, c: int, first: Tensor, second: Tensor) -> Tensor:
    """``z[first, c] - z[second, c]``: ``(pairs, H, W)``, one fresh tensor and one temporary."""
    channel = z.select(1, c)
    d = channel.index_select(0, first)
    return d.sub_(channel.index_select(0, second))


def _level_map(z: Tensor, p: float, first: Tensor, second: Tensor) -> Tensor:
    """``mean_C |z[first] - z[second]|**p`` as ``(pairs, 1, H, W)``, one channel at a time."""
    channels = z.shape[1]
    out = z.new_zeros((first.numel(), 1, *z.shape[2:]))
    acc = out[:, 0]
    for c in range(channels):
        acc.add_(_channel_difference(z, c, first, second).abs_().pow_(p))
    return out.div_(channels)


def _level_gradient(z: Tensor, grad_map: Tensor, p: float, first: Tensor, second: Tensor) -> Tensor:
    """The gradient of one level's latents ``(B, C, H, W)`` from its map's gradient ``(pairs, 1, H, W)``."""
    batch, channels = z.shape[:2]
    grad = torch.zeros_like(z, memory_format=torch.contiguous_format)
    as_first, by_second, as_second = _pairs_of_each_image(batch, z.device)
    scaled = grad_map[:, 0] * (p / channels)  # (pairs, H, W)
    for c in range(channels):
        d = _channel_difference(z, c, first, second)
        term = d.abs().pow_(p - 1).mul_(d.sign_()).mul_(scaled)  # (p/C)·|d|^(p-1)·sign(d)·g
        del d
        # Each image gets the sum of its pairs' terms as a pair's first, minus the sum as a pair's
        # second: one reduction per image, not one add per pair (the planner predicts large batches,
        # whose pairs grow as the square), deterministic on CUDA (no atomics, no matmul that TF32
        # would round).
        for image in samples_to_run(batch, z):  # NOTE [samples on meta]: the ends have the most pairs
            if image < batch - 1:
                grad[image, c].add_(term[as_first[image]].sum(0))
            if image > 0:
                grad[image, c].sub_(term.index_select(0, by_second[as_second[image]]).sum(0))
    return grad


def _pairs_of_each_image(batch: int, device: torch.device) -> Tuple[List[slice], Tensor, List[slice]]:
    """Per image, where its pairs lie among those of :func:`torch.triu_indices` (``a < b``, row by row).

    As the first, image ``a``'s pairs are the slice ``as_first[a]`` (row ``a`` is contiguous). As the
    second, image ``b``'s are the pair numbers ``by_second[as_second[b]]``: one index tensor for all
    images, made on the device in a few ops (no host sync, and no op per image, which the planner's
    large batches would pay for). Pair ``(a, b)`` is number ``a·B − a(a+1)/2 + b − a − 1``.
    """
    starts = [a * batch - a * (a + 1) // 2 for a in range(batch)]
    as_first = [slice(starts[a], starts[a] + batch - 1 - a) for a in range(batch)]
    second, first = torch.tril_indices(batch, batch, offset=-1, device=device)  # (b, a), a < b, by b then a
    by_second = first * batch - first * (first + 1) // 2 + second - first - 1
    as_second = [slice(b * (b - 1) // 2, b * (b + 1) // 2) for b in range(batch)]
    return as_first, by_second, as_second


def _saved_latents(ctx) -> Tuple[Tensor, ...]:
    try:
        return ctx.saved_tensors
    except RuntimeError as error:  # autograd's version check, or the graph already freed
        raise InvertibleError(
            "pairwise_difference_maps: a latent level was modified in place or given up (release_outputs) after the "
            f"loss's forward, or backward ran twice ({error}); clone the latents before changing them, and run "
            "backward once per forward."
        ) from error


class _PairwiseLevelDifferences(torch.autograd.Function):
    """Per-level maps forward; their latents' gradients backward, recomputing each channel's difference."""

    @staticmethod
    def forward(ctx, p: float, *latents: Tensor) -> Tuple[Tensor, ...]:
        first, second = _pairs(latents[0].shape[0], latents[0].device)
        # NOTE [latents by reference]
        # References to the latents, not copies. They are the flow's outputs, which invertible
        # backward reuses once its own backward starts; this backward runs before it and only reads
        # them. A change to them before it is reported in the engine's words (InvertibleError).
        ctx.save_for_backward(*latents)
        ctx.p = p
        return tuple(_level_map(z, p, first, second) for z in latents)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_maps: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        latents = _saved_latents(ctx)
        first, second = _pairs(latents[0].shape[0], latents[0].device)
        grads = []
        for index, (z, grad_map) in enumerate(zip(latents, grad_maps)):
            needed = ctx.needs_input_grad[index + 1] and grad_map is not None
            grads.append(_level_gradient(z, grad_map, ctx.p, first, second) if needed else None)
        return (None, *grads)


def pairwise_level_differences(latents: Sequence[Tensor], p: float = 2.0) -> Tuple[Tensor, ...]:
    """``mean_C |z_a - z_b|**p`` per level for every pair ``a < b``, keeping only the latents for backward.

    Args:
        latents: ``L`` tensors ``(B, C, H_i, W_i)``, ``B >= 2`` (checked by the caller).
        p: the exponent of the difference.

    Returns:
        ``L`` tensors ``(B(B-1)/2, 1, H_i, W_i)``, pairs in the order of ``torch.triu_indices(B, B, 1)``.
    """
    return _PairwiseLevelDifferences.apply(float(p), *latents)
