"""The pairwise Fourier loss of PyramidFlow training (Sec. 3.4 of the paper).

Normal images should have nearly equal latents. For every pair of images in
the batch the per-level squared latent differences are composed to full
resolution through the Laplacian composition and averaged over channels,
giving one difference map per pair; the loss is the mean magnitude of the
2-D Fourier transform of those maps.

notation: ``z_a`` the latent pyramid of image ``a``; ``d_i = |z_a,i - z_b,i|²``
per level i; ``m = mean_C(compose(d))`` the pair's map ``(H, W)``;
``loss = mean |FFT2(m)|`` over pairs and frequencies.

The ablations of the paper's Table 2 live here too: the spatial loss (``mean m``,
no FFT) and, for the flow without volume normalisation, the Gaussian negative
log-likelihood with the log-determinant; :func:`objective_loss` picks one by name.
"""

from __future__ import annotations

from typing import Sequence

import math
from typing import Optional

import torch
from torch import Tensor

from .lean_loss import pairwise_level_differences
from .pyramid import laplacian_compose

__all__ = ["LOSSES", "OBJECTIVES", "pairwise_difference_maps", "fourier_loss", "spatial_loss", "gaussian_nll", "objective_loss"]

LOSSES = ("fourier", "spatial")  # the pairwise losses (PyramidFlowConfig.loss)
OBJECTIVES = (*LOSSES, "gaussian_nll")  # what training may minimise (PyramidFlowConfig.objective)


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
    # The per-level maps keep only the latents for backward (lean_loss.py); the composition
    # acts on one channel per pair, so its own graph is small.
    return laplacian_compose(pairwise_level_differences(latents, p))[:, 0]


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


def spatial_loss(latents: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """Ablation of :func:`fourier_loss`: the plain mean of every pair's difference map, no FFT.

    Args:
        latents: latent pyramid, ``L`` tensors ``(B, C, H_i, W_i)``, ``B >= 2``.
        p: exponent of the per-level difference (2).

    Returns:
        The scalar loss.
    """
    return pairwise_difference_maps(latents, p).mean()


def gaussian_nll(latents: Sequence[Tensor], logdet: Tensor) -> Tensor:
    """Negative log-likelihood of a standard-normal latent, in nats per dimension, mean over the batch.

    ``(½‖z‖² + ½·D·log 2π − logdet) / D`` per sample, with ``D`` the number of latent values of
    one sample: the objective of a plain flow, used for the paper's "without volume normalisation"
    ablation (with VN the log-det is 0 and this only shrinks the latents).

    Args:
        latents: latent pyramid, ``L`` tensors ``(N, C, H_i, W_i)``.
        logdet: the flow's log-determinant per sample, ``(N,)``.

    Returns:
        The scalar loss.
    """
    if len(latents) == 0:
        raise ValueError("gaussian_nll: got an empty latent pyramid.")
    dims = sum(z[0].numel() for z in latents)
    squares = sum(z.flatten(1).square().sum(dim=1) for z in latents)
    return ((0.5 * squares - logdet) / dims + 0.5 * math.log(2 * math.pi)).mean()


def objective_loss(objective: str, latents: Sequence[Tensor], logdet: Optional[Tensor] = None, p: float = 2.0) -> Tensor:
    """The training loss named by ``objective`` (``PyramidFlowConfig.objective``).

    Args:
        objective: ``"fourier"``, ``"spatial"`` or ``"gaussian_nll"``.
        latents: latent pyramid ``(B, C, H_i, W_i)`` per level.
        logdet: ``(B,)``, needed by ``"gaussian_nll"`` only.
        p: exponent of the pairwise losses' per-level difference (``PyramidFlowConfig.loss_p``, 2).

    Raises:
        ValueError: an unknown objective, or ``"gaussian_nll"`` without ``logdet``.
    """
    if objective == "fourier":
        return fourier_loss(latents, p)
    if objective == "spatial":
        return spatial_loss(latents, p)
    if objective == "gaussian_nll":
        if logdet is None:
            raise ValueError("objective_loss: 'gaussian_nll' needs the flow's logdet; call model(images, return_logdet=True).")
        return gaussian_nll(latents, logdet)
    raise ValueError(f"objective_loss: objective must be one of {OBJECTIVES}, got {objective!r}.")
