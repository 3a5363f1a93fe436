"""The pairwise Fourier loss of PyramidFlow training (Sec. 3.4 of the paper).

Normal images should have nearly equal latents. For every pair of images in
the batch the per-level squared latent differences are composed to full
resolution through the Laplacian composition and averaged over channels,
giving one difference map per pair; the loss is the mean magnitude of the
2-D Fourier transform of those maps.

notation: ``z_a`` the latent pyramid of image ``a``; ``d_i = |z_a,i - z_b,i|²``
per level i; ``m = mean_C(compose(d))`` the pair's map ``(H, W)``;
``loss = mean |FFT2(m)|`` over pairs and frequencies.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .pyramid import laplacian_compose

__all__ = ["pairwise_difference_maps", "fourier_loss"]


def pairwise_difference_maps(latents: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """One full-resolution difference map per pair ``a < b`` of the batch.

    Args:
        latents: latent pyramid, ``L`` tensors ``(B, C, H_i, W_i)``, finest first; ``B >= 2``.
        p: exponent of the per-level difference ``|z_a - z_b|**p`` (2 in the method).

    Returns:
        ``(B(B-1)/2, H, W)``, pairs in the order of ``torch.triu_indices(B, B, 1)``.

    Raises:
        ValueError: with fewer than 2 images in the batch.
    """
    if len(latents) == 0:
        raise ValueError("pairwise_difference_maps: got an empty latent pyramid.")
    batch = latents[0].shape[0]
    if batch < 2:
        raise ValueError(
            f"fourier_loss: the loss compares pairs of images but the batch has {batch}; use a batch size of at least 2."
        )
    # NOTE [channel mean before composition]
    # The composition is linear and acts on each channel alike, so the mean
    # over channels can be taken per level before composing: the same map,
    # with a composition over 1 channel instead of C.
    first, second = torch.triu_indices(batch, batch, offset=1, device=latents[0].device)
    diffs = [(z[first] - z[second]).abs().pow(p).mean(dim=1, keepdim=True) for z in latents]
    return laplacian_compose(diffs)[:, 0]


def fourier_loss(latents: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """Pairwise Fourier loss: mean of ``|FFT2(map)|`` over every pair's difference map.

    The Fourier domain weighs every spatial frequency of the difference alike,
    which the paper reports converges faster and localises better than a
    plain spatial mean. The FFT is unnormalised (``norm="backward"``).

    Args:
        latents: latent pyramid from :class:`PyramidFlow`, ``L`` tensors ``(B, C, H_i, W_i)``, ``B >= 2``.
        p: exponent of the per-level difference (2).

    Returns:
        The scalar loss.

    Example:
        >>> z = (torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4))
        >>> fourier_loss(z).shape
        torch.Size([])
    """
    maps = pairwise_difference_maps(latents, p)
    return torch.fft.fft2(maps).abs().mean()
