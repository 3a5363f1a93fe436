"""Laplacian pyramid decomposition and its exact inverse, the composition.

The flow works on a pyramid of L levels instead of the image itself (Sec. 3.1
of the PyramidFlow paper): level i holds the detail lost between Gaussian
levels i and i+1, and the last level holds the coarsest Gaussian level. The
composition is linear, so the loss and the anomaly map also use it to bring
per-level maps back to full resolution.

notation: ``G_i`` the Gaussian level i (``G_0`` the input), ``blur`` the 5×5
binomial filter with zero padding, ``down`` 2×2 max-pooling (or nearest
subsampling), ``up`` nearest upsampling by 2 followed by ``blur``.
``level_i = G_i - up(G_{i+1})`` for i < L-1, ``level_{L-1} = G_{L-1}``.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._meta import samples_to_run
from ..engine.block import tracing

__all__ = ["DOWNSAMPLES", "LaplacianPyramid", "laplacian_decompose", "laplacian_compose", "check_image_size"]

DOWNSAMPLES = ("max", "nearest")
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: Tensor) -> Tensor:
    """5×5 binomial blur ``[1,4,6,4,1]ᵀ[1,4,6,4,1] / 256``, per channel, zero padding."""
    row = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    kernel = (row[:, None] * row[None, :]) / 256.0
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, 5, 5)
    return F.conv2d(x, weight, padding=2, groups=channels)


def _down(x: Tensor, downsample: str) -> Tensor:
    """Blur, then halve each side."""
    x = _blur(x)
    if downsample == "max":
        return F.max_pool2d(x, kernel_size=2, stride=2)
    return x[..., ::2, ::2]  # nearest: the top-left sample of every 2×2 cell


def _up(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Nearest upsampling to ``size`` (twice the sides), then blur."""
    return _blur(F.interpolate(x, size=size, mode="nearest"))


def nearest_valid_side(side: int, num_levels: int, stride: int = 1) -> int:
    """The multiple of ``stride * 2**(num_levels - 1)`` nearest to ``side`` (ties round up), at least one multiple."""
    factor = stride * 2 ** (num_levels - 1)
    return max(factor, (side + factor // 2) // factor * factor)


def check_image_size(height: int, width: int, num_levels: int, *, where: str = "LaplacianPyramid", stride: int = 1) -> None:
    """Raise a ValueError naming the nearest valid size when ``num_levels`` levels do not fit (the one size rule).

    Both sides must be divisible by ``2**(num_levels - 1)`` so that every
    level has exactly half the sides of the previous one and composition is
    exact; images that an encoder shrinks by ``stride`` first must be divisible
    by ``stride * 2**(num_levels - 1)``.
    """
    factor = stride * 2 ** (num_levels - 1)
    if height % factor == 0 and width % factor == 0 and height > 0 and width > 0:
        return
    near_h, near_w = nearest_valid_side(height, num_levels, stride), nearest_valid_side(width, num_levels, stride)
    written = f"2**{num_levels - 1}" if stride == 1 else f"{stride}·2**{num_levels - 1} (the encoder's stride {stride})"
    raise ValueError(
        f"{where}: image size {height}×{width} cannot be split into {num_levels} levels: height and width must "
        f"be divisible by {written} = {factor}; the nearest valid size is {near_h}×{near_w} "
        "(resize or crop the images to it, or use fewer levels)."
    )


def laplacian_decompose(x: Tensor, num_levels: int, downsample: str = "max", *,
                        consume_input: bool = False) -> Tuple[Tensor, ...]:  # fmt: skip
    """Split ``x`` into a Laplacian pyramid of ``num_levels`` levels, finest first.

    Without a graph (no-grad, or ``x`` not requiring grad) it runs one chunk of channels of one
    sample at a time (NOTE [streamed decomposition]); with one, on the whole batch, differentiably.

    Args:
        x: images or feature maps, ``(N, C, H, W)``; ``H`` and ``W`` divisible by ``2**(num_levels - 1)``.
        num_levels: number of levels L, at least 1 (1 returns ``(x,)``).
        downsample: ``"max"`` (2×2 max-pooling, the authors' released code) or
            ``"nearest"`` (the paper's text). Composition is exact either way.
        consume_input: the caller gives ``x`` up: without a graph, level 0 is written into
            ``x``'s storage (and returned as ``x``), saving a level-0 tensor. Ignored with a graph.

    Returns:
        ``L`` tensors; level ``i`` has shape ``(N, C, H / 2**i, W / 2**i)``.

    Raises:
        ValueError: for a bad ``num_levels``, ``downsample`` or image size.

    Example:
        >>> x = torch.randn(1, 3, 32, 48)
        >>> levels = laplacian_decompose(x, 3)
        >>> [tuple(l.shape[-2:]) for l in levels]
        [(32, 48), (16, 24), (8, 12)]
        >>> bool(torch.allclose(laplacian_compose(levels), x, atol=1e-5))
        True
    """
    if num_levels < 1:
        raise ValueError(f"laplacian_decompose: num_levels must be at least 1, got {num_levels}.")
    if downsample not in DOWNSAMPLES:
        raise ValueError(f"laplacian_decompose: downsample must be one of {DOWNSAMPLES}, got {downsample!r}.")
    if x.dim() != 4:
        raise ValueError(f"laplacian_decompose: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}.")
    check_image_size(x.shape[-2], x.shape[-1], num_levels, where="laplacian_decompose")
    if num_levels == 1:
        return (x,)
    if (torch.is_grad_enabled() and x.requires_grad) or tracing():  # a traced loop would pin the batch size
        return _decompose_whole(x, num_levels, downsample)
    return _decompose_streamed(x, num_levels, downsample, consume_input)


def _decompose_whole(x: Tensor, num_levels: int, downsample: str) -> Tuple[Tensor, ...]:
    """The decomposition of the whole batch at once: differentiable, with whole-batch temporaries."""
    levels = []
    gaussian = x
    for _ in range(num_levels - 1):
        coarser = _down(gaussian, downsample)
        levels.append(gaussian - _up(coarser, gaussian.shape[-2:]))
        gaussian = coarser
    levels.append(gaussian)
    return tuple(levels)


# NOTE [streamed decomposition]
# The pyramid acts on each channel of each sample alone (the blur is per channel, the pooling and
# the resampling are per pixel of a channel), so without a graph it is computed one chunk of
# channels of one sample at a time, each chunk's levels written straight into the output levels.
# The full-resolution temporaries (the blurred input, the upsampled and blurred coarse level, the
# difference) are then one chunk's, at most _CHUNK_ELEMENTS values each, instead of whole-batch
# level-0 tensors; the output is the same arithmetic on the same values.
_CHUNK_ELEMENTS = 2**20  # values of one full-resolution temporary (4 MiB in float32)


def _decompose_streamed(x: Tensor, num_levels: int, downsample: str, consume_input: bool) -> Tuple[Tensor, ...]:
    """The decomposition chunk by chunk (NOTE [streamed decomposition]); level 0 in ``x`` when consumed."""
    batch, channels, height, width = x.shape
    first = x if consume_input else torch.empty_like(x, memory_format=torch.contiguous_format)
    levels = [first] + [x.new_empty((batch, channels, height >> i, width >> i)) for i in range(1, num_levels)]
    step = max(1, min(channels, _CHUNK_ELEMENTS // (height * width)))
    for sample in samples_to_run(batch, x):  # NOTE [samples on meta]
        for start in range(0, channels, step):
            chunk = (slice(sample, sample + 1), slice(start, start + step))
            gaussian = x[chunk]
            for level in levels[:-1]:
                coarser = _down(gaussian, downsample)
                torch.sub(gaussian, _up(coarser, gaussian.shape[-2:]), out=level[chunk])
                gaussian = coarser
            levels[-1][chunk].copy_(gaussian)
    return tuple(levels)


def laplacian_compose(levels: Sequence[Tensor]) -> Tensor:
    """Rebuild the full-resolution tensor from a pyramid: the exact inverse of :func:`laplacian_decompose`.

    Starts at the coarsest level and repeatedly up-steps and adds the next
    finer level. It is linear and per channel, so it also brings per-level
    difference maps to full resolution (loss, anomaly map). It does not
    depend on the downsampling used by the decomposition.

    Args:
        levels: ``L`` tensors, finest first, each ``(N, C, H_i, W_i)`` with ``H_i = H / 2**i``.

    Returns:
        ``(N, C, H, W)``.
    """
    if len(levels) == 0:
        raise ValueError("laplacian_compose: got no levels; pass the tuple returned by laplacian_decompose.")
    out = levels[-1]
    for level in reversed(levels[:-1]):
        out = level + _up(out, level.shape[-2:])
    return out


class LaplacianPyramid(nn.Module):
    """The decomposition and composition with fixed settings, as a module without state.

    Args:
        num_levels: number of levels L.
        downsample: ``"max"`` or ``"nearest"``; see :func:`laplacian_decompose`.
    """

    def __init__(self, num_levels: int, downsample: str = "max") -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"LaplacianPyramid: num_levels must be at least 1, got {num_levels}.")
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"LaplacianPyramid: downsample must be one of {DOWNSAMPLES}, got {downsample!r}.")
        self.num_levels = num_levels
        self.downsample = downsample

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, downsample={self.downsample!r}"

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the nearest valid size when ``height×width`` does not fit."""
        check_image_size(height, width, self.num_levels, where="LaplacianPyramid")

    def decompose(self, x: Tensor, *, consume_input: bool = False) -> Tuple[Tensor, ...]:
        """``(N, C, H, W)`` -> ``L`` levels, finest first; ``consume_input``: see :func:`laplacian_decompose`."""
        self.check_size(x.shape[-2], x.shape[-1])
        return laplacian_decompose(x, self.num_levels, self.downsample, consume_input=consume_input)

    def compose(self, levels: Sequence[Tensor]) -> Tensor:
        """``L`` levels -> ``(N, C, H, W)``."""
        if len(levels) != self.num_levels:
            raise ValueError(f"LaplacianPyramid: expected {self.num_levels} levels to compose, got {len(levels)}.")
        return laplacian_compose(levels)
