"""Latent template, anomaly map and image score (Sec. 3.5 of the PyramidFlow paper).

The template is the mean latent pyramid of the training images. A test
image's anomaly map is, per level, ``|z - template|``, composed back to the
input's resolution through the Laplacian composition and averaged over
channels; its image score is the maximum of the map. The template assumes the
images are aligned (registered): the method is weak on categories that are not.

Two ablations of the paper's Table 2 are switches here: a zero template
(``fit_template(..., kind="zero")``: the map is the latent's own magnitude) and
the composed difference (``anomaly_map(..., difference="composed")``: compose
latent and template to full resolution first, then take ``|·|``).

A third, ``kind="constant"``, is an ablation for stationary textures: the mean latent's spatial mean,
per level and channel (crops of a texture are not registered, so their mean holds leftover detail of
each crop). Measured on the development set's textures it is far worse than the mean template (moon:
pixel AUROC 0.709 against 0.904, benchmarks/README.md "Recipes for natural textures"): the trained
latents depend on the position, so the per-pixel mean stays the default everywhere.

A fourth, ``kind="scaled"``, is an option: the mean template and the training latents' spread about it
(their standard deviation per level, channel and position), stacked as ``(2, C, H_i, W_i)``; the map
then divides each deviation by its spread before the channel mean (a diagonal Mahalanobis distance),
so a place or channel whose normal latents vary widely counts its deviations on that scale. Measured
(benchmarks/README.md "Scoring with the latents' spread"), it raises the image AUROC of two textures
of the development set a lot and lowers the demo's pixel AUROC by 0.0005-0.003: not a default.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pyramid import laplacian_compose

__all__ = ["TEMPLATES", "DIFFERENCES", "constant_template", "fit_template", "anomaly_map", "image_score"]

TEMPLATES = ("mean", "zero", "constant", "scaled")
SPREAD_FLOOR = 0.1  # kind "scaled": a spread below this share of its level's mean spread is raised to it (no 0 divides)
DIFFERENCES = ("pyramid", "composed")

Template = Tuple[Tensor, ...]


def _images_of(batch: Any) -> Tensor:
    """The image tensor of a batch: a tensor, the first item of a tuple/list, or a dict's ``"image"``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
        return batch["image"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"fit_template: cannot find the images in a batch of type {type(batch).__name__}; yield tensors, "
        "(images, ...) tuples, or dicts with an 'image' tensor."
    )


def fit_template(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    device: Optional[torch.device | str] = None,
    kind: str = "mean",
) -> Template:
    """Mean latent pyramid of the images in ``batches``, computed in eval mode without a graph.

    The sum is accumulated in float64 so that the mean does not depend on the
    order or the count of the batches beyond rounding. The model's training
    mode is restored afterwards.

    Args:
        model: a :class:`PyramidFlow` (anything mapping images to a latent pyramid).
        batches: an iterable of image batches ``(B, 3, H, W)`` (tensors,
            ``(images, ...)`` tuples, or dicts with ``"image"``), e.g. a DataLoader of normal training images.
        device: where to run the model; ``None`` for the device of its parameters.
        kind: ``"mean"`` (the method), ``"zero"`` (ablation: zeros of the same shapes, so the
            anomaly map becomes the latent's own magnitude), ``"constant"`` (stationary textures:
            the mean's spatial mean per level and channel, :func:`constant_template`) or ``"scaled"``
            (the mean and the latents' standard deviation about it, floored at :data:`SPREAD_FLOOR`
            times the level's mean spread, stacked along the first axis).

    Returns:
        The template: ``L`` tensors ``(1, C, H_i, W_i)`` (``(2, C, H_i, W_i)`` for ``"scaled"``: mean,
        spread) in the latents' dtype.

    Raises:
        ValueError: when ``batches`` holds no image, or an unknown ``kind``.
    """
    if kind not in TEMPLATES:
        raise ValueError(f"fit_template: kind must be one of {TEMPLATES}, got {kind!r}.")
    if device is None:
        device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()
    sums, squares, count, dtype = None, None, 0, None
    try:
        with torch.no_grad():
            for batch in batches:
                images = _images_of(batch).to(device)
                latents = model(images)
                dtype = latents[0].dtype
                batch_sums = [z.double().sum(dim=0, keepdim=True) for z in latents]
                sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
                if kind == "scaled":  # the second moment only where it is used
                    batch_squares = [z.double().square().sum(dim=0, keepdim=True) for z in latents]
                    squares = batch_squares if squares is None else [a + b for a, b in zip(squares, batch_squares)]
                count += images.shape[0]
    finally:
        model.train(was_training)
    if sums is None or count == 0:
        raise ValueError("fit_template: the batches held no image; pass at least one batch of normal images.")
    if kind == "zero":
        return tuple(torch.zeros_like(s, dtype=dtype) for s in sums)
    if kind == "scaled":
        return tuple(torch.cat((s / count, _spread(s / count, q / count))).to(dtype) for s, q in zip(sums, squares))
    mean = tuple((s / count).to(dtype) for s in sums)
    return constant_template(mean) if kind == "constant" else mean


def _spread(mean: Tensor, mean_square: Tensor) -> Tensor:
    """The standard deviation from float64 moments, floored at :data:`SPREAD_FLOOR` times its mean."""
    spread = (mean_square - mean.square()).clamp_min(0.0).sqrt()
    return spread.clamp_min(SPREAD_FLOOR * float(spread.mean()) + torch.finfo(torch.float32).tiny)


def constant_template(template: Sequence[Tensor]) -> Template:
    """``template`` averaged over space, per level and channel, at the same shapes ``(1, C, H_i, W_i)``.

    The template of a stationary texture: every position of a texture is alike, so a per-pixel mean
    of unregistered crops differs from its spatial mean only by the crops' leftover detail.
    """
    return tuple(t.double().mean(dim=(-2, -1), keepdim=True).expand_as(t).to(t.dtype).contiguous() for t in template)


def anomaly_map(
    latents: Sequence[Tensor],
    template: Sequence[Tensor],
    size: Optional[Tuple[int, int]] = None,
    difference: str = "pyramid",
) -> Tensor:
    """Per-pixel anomaly map at the input's resolution.

    Per level ``|z_i - template_i|``, averaged over channels (which commutes
    with the linear, per-channel composition: NOTE [channel mean before
    composition] in loss.py), composed to full resolution. A ``"scaled"`` template (two stacked
    tensors: mean and spread) divides ``z_i - mean_i`` by ``spread_i`` first.

    Args:
        latents: latent pyramid of the test images, ``L`` tensors ``(N, C, H_i, W_i)``.
        template: from :func:`fit_template`, ``L`` tensors ``(1, C, H_i, W_i)`` (``(2, C, H_i, W_i)``: scaled).
        size: ``(H, W)`` of the images, when the finest level is smaller (an encoder's
            features at 1/4 of the image side): the map is then upsampled bilinearly to it,
            so that it lines up with the images and their masks. ``None``: the finest level's size.
        difference: ``"pyramid"`` (the method, above) or ``"composed"`` (ablation:
            ``mean_C |compose(z) - compose(template)|``, the absolute value taken after composing).

    Returns:
        ``(N, 1, H, W)``; larger means more anomalous.

    Raises:
        ValueError: when the pyramids do not match in levels or shapes.
    """
    if difference not in DIFFERENCES:
        raise ValueError(f"anomaly_map: difference must be one of {DIFFERENCES}, got {difference!r}.")
    if len(latents) != len(template):
        raise ValueError(
            f"anomaly_map: the latents have {len(latents)} levels but the template has {len(template)}; fit the "
            "template with the same model."
        )
    diffs = []
    for level, (z, t) in enumerate(zip(latents, template)):
        if t.dim() != 4 or t.shape[0] not in (1, 2):
            raise ValueError(
                f"anomaly_map: level {level} of the template is {tuple(t.shape)}; expected (1, C, H, W) (a mean) or "
                "(2, C, H, W) (mean and spread, kind 'scaled'): fit it with fit_template."
            )
        if z.shape[1:] != t.shape[1:]:
            raise ValueError(
                f"anomaly_map: level {level} of the latents is {tuple(z.shape[1:])} but the template's is "
                f"{tuple(t.shape[1:])}; run the test images at the template's resolution."
            )
        t = t.to(z.dtype)
        diffs.append(z - t if t.shape[0] == 1 else (z - t[:1]) / t[1:])
    if difference == "composed":
        # compose is linear: compose(z) - compose(template) == compose(z - template), with |·| after it.
        composed = laplacian_compose(diffs).abs().mean(dim=1, keepdim=True)
    else:
        composed = laplacian_compose([d.abs().mean(dim=1, keepdim=True) for d in diffs])
    if size is not None and tuple(size) != tuple(composed.shape[-2:]):
        composed = F.interpolate(composed, size=tuple(size), mode="bilinear", align_corners=False)
    return composed


def image_score(anomaly_map: Tensor) -> Tensor:
    """Image-level anomaly score: the maximum of each map ``(N, 1, H, W)`` -> ``(N,)``."""
    return anomaly_map.flatten(1).amax(dim=1)
