"""Rigid registration of a part to the training images, for parts that are never placed exactly.

The latent template is a per-pixel mean (Sec. 3.3): it only matches images whose part sits where the
training parts sat. :func:`estimate_rigid` finds, once per image and at the model's input resolution,
the rotation and translation that bring the image onto the **reference** (the mean training image,
:func:`registration_reference`). A grid of angles, coarse then fine, is scored by phase correlation
against the reference, which also gives the translation to sub-pixel precision (a parabola through
the peak); a least-squares fit of the aligned image to the reference then polishes angle and shift.
:func:`registered_maps` computes the map of the aligned image and warps it back, so
maps and masks are in the input's own coordinates.

# NOTE [pixels with no source]
Aligning moves some pixels in from outside the frame: they take the reference's value, so they look
like a normal part and score low instead of flagging the frame's edge. Warping the map back does the
same the other way: an input pixel whose aligned position falls outside the frame takes the nearest
map value inside it (border replication), never an invented zero or a NaN.

# notation: a pixel's centred coordinates u = (x - (W-1)/2, y - (H-1)/2), x right, y down.
The transform (angle a, shift t) says: aligned(u) = image(R(a) u + t) = reference(u), with
R(a) = [[cos a, -sin a], [sin a, cos a]]. A part rotated by a (clockwise on screen, as y points down)
about the image centre and then moved by t pixels is aligned by exactly (a, t).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..checkpoint import Checkpoint, CheckpointError, save_checkpoint_atomic
from ..train.stats import registration_reference

__all__ = [
    "MAX_ANGLE_DEGREES",
    "ensure_reference",
    "estimate_rigid",
    "registered_maps",
    "registration_reference",
    "store_reference",
    "stored_reference",
    "unwarp",
    "warp",
]

# The rotations searched: parts on a conveyor turn by a few degrees, not by a quarter turn.
MAX_ANGLE_DEGREES = 12.0
_ANGLE_STEP_DEGREES = 1.0
_EPS = 1e-8
_REFINE_ITERATIONS = 30


def store_reference(path: str, reference: Tensor) -> None:
    """Write ``reference`` into the checkpoint at ``path`` (key ``registration``), keeping all else as it was."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["registration"] = {"reference": reference.detach().cpu().float()}
    save_checkpoint_atomic(state, path)


def ensure_reference(checkpoint: Checkpoint, train_dataset: Dataset) -> Tensor:
    """The checkpoint's reference; computed from ``train_dataset`` and written into the checkpoint file if it has none.

    ``train`` stores the reference; this is for checkpoints written before it did (``eval --register``
    calls it): stored once, so that ``predict`` on a machine without the training images can register too.
    """
    if (checkpoint.registration or {}).get("reference") is None:
        reference = registration_reference(train_dataset)
        store_reference(str(checkpoint.path), reference)
        checkpoint.registration = {"reference": reference}
    return stored_reference(checkpoint, "ensure_reference")


def stored_reference(checkpoint: Checkpoint, where: str) -> Tensor:
    """The checkpoint's registration reference ``(3, H, W)``.

    Raises:
        CheckpointError: the checkpoint has none (it was never used with registration).
    """
    reference = (checkpoint.registration or {}).get("reference")
    if reference is None:
        raise CheckpointError(
            f"{where}: {checkpoint.path} holds no registration reference (register=True needs one); run "
            "`pyramidflow eval --register` on it once, which adds it from the training images, or train it again "
            "(`train` stores it)."
        )
    return reference


def _affine(angle: Tensor, shift: Tensor, height: int, width: int) -> Tensor:
    """``(N, 2, 3)`` ``affine_grid`` matrices for aligned(u) = image(R u + t) (normalised, align_corners=False)."""
    # With align_corners=False, centred pixels u = S n for normalised n, S = diag(W/2, H/2).
    scale = torch.tensor([width / 2.0, height / 2.0], dtype=angle.dtype, device=angle.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (N, 2, 2)
    matrix = rotation * scale[None, None, :] / scale[None, :, None]  # S^-1 R S
    return torch.cat([matrix, (shift / scale)[:, :, None]], dim=2)


def _sample(images: Tensor, angle: Tensor, shift: Tensor, padding: str, mode: str = "bilinear") -> Tensor:
    height, width = images.shape[-2:]
    grid = F.affine_grid(_affine(angle, shift, height, width).to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode=padding, align_corners=False)


def warp(images: Tensor, angle: Tensor, shift: Tensor, *, fill: Optional[Tensor] = None) -> Tensor:
    """``images`` ``(N, C, H, W)`` aligned by ``(angle, shift)``; pixels with no source take ``fill``.

    Args:
        angle: ``(N,)`` radians; shift: ``(N, 2)`` pixels ``(x, y)`` (module notation).
        fill: ``(C, H, W)`` values for pixels brought in from outside the frame (NOTE [pixels with no
            source]); ``None`` replicates the border.
    """
    # Bicubic: the model sees fine detail (pads, threads) blurred by bilinear sampling as a defect.
    if fill is None:
        return _sample(images, angle, shift, "border", "bicubic")
    inside = _sample(torch.ones_like(images[:, :1]), angle, shift, "zeros")
    return _sample(images, angle, shift, "zeros", "bicubic") + (1 - inside) * fill.to(images)[None]


def unwarp(maps: Tensor, angle: Tensor, shift: Tensor) -> Tensor:
    """Maps ``(N, C, H, W)`` of aligned images back in the inputs' coordinates (border replication).

    The inverse of u -> R u + t is v -> R^T (v - t): a rotation by ``-angle`` and the shift ``-R^T t``.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    back = -torch.stack([cos * shift[:, 0] + sin * shift[:, 1], -sin * shift[:, 0] + cos * shift[:, 1]], -1)
    return _sample(maps, -angle, back, "border")


def _prepared(gray: Tensor) -> Tensor:
    """Zero-mean, Hann-windowed ``(..., H, W)``: the frame's edges must not dominate the correlation."""
    height, width = gray.shape[-2:]
    window = torch.outer(torch.hann_window(height, periodic=False, dtype=gray.dtype, device=gray.device),
                         torch.hann_window(width, periodic=False, dtype=gray.dtype, device=gray.device))
    return (gray - gray.mean(dim=(-2, -1), keepdim=True)) * window


def _parabola(left: Tensor, centre: Tensor, right: Tensor) -> Tensor:
    """Offset in [-0.5, 0.5] of the vertex of the parabola through three equally spaced values."""
    curvature = left - 2 * centre + right
    offset = torch.where(curvature.abs() > _EPS, 0.5 * (left - right) / curvature.clamp(max=-_EPS), 0.0)
    return offset.clamp(-0.5, 0.5)


def _phase_correlation(moving: Tensor, fixed_spectrum: Tensor) -> Tuple[Tensor, Tensor]:
    """Peak height ``(M,)`` and sub-pixel shift ``(M, 2)`` ``(x, y)`` with fixed(u) ~ moving(u + shift)."""
    height, width = moving.shape[-2:]
    cross = torch.conj(fixed_spectrum) * torch.fft.rfft2(moving)
    surface = torch.fft.irfft2(cross / (cross.abs() + _EPS), s=(height, width))  # (M, H, W)
    flat = surface.flatten(1)
    peak, index = flat.max(dim=1)
    y, x = index // width, index % width
    rows = torch.arange(len(index), device=surface.device)
    dy = _parabola(surface[rows, (y - 1) % height, x], peak, surface[rows, (y + 1) % height, x])
    dx = _parabola(surface[rows, y, (x - 1) % width], peak, surface[rows, y, (x + 1) % width])
    # A peak past the middle is a negative shift (the correlation is circular).
    sx = torch.where(x > width // 2, x - width, x).to(surface.dtype) + dx
    sy = torch.where(y > height // 2, y - height, y).to(surface.dtype) + dy
    return peak, torch.stack([sx, sy], -1)


def _best_angles(gray: Tensor, fixed: Tensor, centre: Tensor, step: float, steps: int) -> Tensor:
    """``(N,)`` the angle of ``centre + step * [-steps..steps]`` (radians) scoring the highest phase-correlation
    peak, refined by a parabola through its neighbours' scores."""
    n, k = gray.shape[0], 2 * steps + 1
    offsets = torch.arange(-steps, steps + 1, dtype=gray.dtype, device=gray.device) * step
    angles = (centre[:, None] + offsets[None]).reshape(-1)  # (N * K,)
    turned = _sample(gray.repeat_interleave(k, 0), angles, torch.zeros(n * k, 2).to(gray), "border")
    peaks = _phase_correlation(_prepared(turned[:, 0]), fixed)[0].view(n, k)
    best = peaks.argmax(1)
    rows = torch.arange(n, device=gray.device)
    fraction = _parabola(peaks[rows, (best - 1).clamp(min=0)], peaks[rows, best], peaks[rows, (best + 1).clamp(max=k - 1)])
    fraction = torch.where((best == 0) | (best == k - 1), 0.0, fraction)
    return centre + offsets[best] + fraction * step


@torch.no_grad()
def estimate_rigid(images: Tensor, reference: Tensor, *,
                   max_angle_degrees: float = MAX_ANGLE_DEGREES) -> Tuple[Tensor, Tensor]:
    """The rotation and translation aligning each image to ``reference`` (module notation).

    Each image is rotated by every angle of a 1-degree grid in ``±max_angle_degrees``, then of a
    0.1-degree grid around the best; phase correlation against the reference scores each angle, and
    gives the translation at the chosen one; a least-squares fit of the image to the reference polishes both.

    Args:
        images: ``(N, C, H, W)`` normalised images at the model's resolution.
        reference: ``(C, H, W)`` from :func:`registration_reference`, same size.

    Returns:
        ``angle`` ``(N,)`` radians and ``shift`` ``(N, 2)`` pixels ``(x, y)``, float32 on ``images``' device.

    Raises:
        ValueError: the reference's shape differs from the images'.
    """
    if reference.shape != images.shape[1:]:
        raise ValueError(
            f"registration: the reference has shape {tuple(reference.shape)} but the images {tuple(images.shape[1:])}; "
            "the reference must be the mean training image at the trained size."
        )
    gray = images.double().mean(1, keepdim=True)  # (N, 1, H, W)
    fixed = torch.fft.rfft2(_prepared(reference.to(gray).mean(0)))[None]
    coarse = math.radians(_ANGLE_STEP_DEGREES)
    angle = _best_angles(gray, fixed, torch.zeros(len(gray)).to(gray), coarse,
                         int(math.floor(max_angle_degrees / _ANGLE_STEP_DEGREES)))
    angle = _best_angles(gray, fixed, angle, coarse / 10, 10)
    turned = _sample(gray, angle, torch.zeros(len(gray), 2).to(gray), "border")
    rotated_shift = _phase_correlation(_prepared(turned[:, 0]), fixed)[1]
    # fixed(u) ~ image(R (u + s)) = image(R u + R s): the translation is t = R s.
    cos, sin = torch.cos(angle), torch.sin(angle)
    shift = torch.stack([cos * rotated_shift[:, 0] - sin * rotated_shift[:, 1],
                         sin * rotated_shift[:, 0] + cos * rotated_shift[:, 1]], -1)
    return _refined(gray, reference.to(gray).mean(0), angle, shift)


def _refined(gray: Tensor, fixed: Tensor, angle: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """``(angle, shift)`` after a least-squares fit of the aligned image to the reference, from the search's answer.

    Phase-correlation peaks are flat in the angle (interpolation blurs every rotated copy alike); the
    squared difference of the images themselves is not.
    """
    # The fit needs autograd even under the Detector's inference_mode; clones are ordinary tensors.
    with torch.inference_mode(False), torch.enable_grad():
        gray, fixed = gray.clone(), fixed.clone()
        params = torch.cat([angle[:, None], shift], 1).clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=_REFINE_ITERATIONS, line_search_fn="strong_wolfe")

        def loss() -> Tensor:
            optimizer.zero_grad()
            value = (_sample(gray, params[:, 0], params[:, 1:], "border")[:, 0] - fixed).square().mean(dim=(-2, -1)).sum()
            value.backward()
            return value

        optimizer.step(loss)
    params = params.detach()
    return params[:, 0].float(), params[:, 1:].float()


@torch.no_grad()
def registered_maps(map_fn: Callable[[Tensor], np.ndarray], images: Tensor, reference: Tensor) -> np.ndarray:
    """``(N, H, W)`` maps of ``images`` computed on their aligned versions and returned in their own coordinates.

    Args:
        map_fn: images ``(N, 3, H, W)`` -> maps ``(N, H, W)`` (:func:`pyramidflow.inference.maps.anomaly_maps`).
        images: ``(N, 3, H, W)`` normalised images at the model's resolution.
        reference: ``(3, H, W)`` the checkpoint's reference (:func:`stored_reference`).
    """
    angle, shift = estimate_rigid(images, reference)
    aligned = warp(images.float(), angle, shift, fill=reference.to(images.device))
    maps = torch.from_numpy(np.ascontiguousarray(map_fn(aligned)))[:, None]
    return unwarp(maps, angle.cpu(), shift.cpu())[:, 0].numpy()
