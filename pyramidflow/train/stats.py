"""What a finished training run computes besides the weights: the template, score statistics, thresholds.

Once the last step is done, :func:`pyramidflow.train.train` passes over the training images in eval
mode and without gradients to fit the latent template and take the statistics of their anomaly
scores (:func:`template_and_score_stats`), then sets the image and pixel decision thresholds on the
held-out good images (:func:`decision_thresholds`, rules in :mod:`pyramidflow.calibration`), and
takes the mean training image that registration aligns images to (:func:`registration_reference`,
used by :mod:`pyramidflow.inference.registration`). All of it is stored in the final checkpoint; no
test image is ever used.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pyramidflow.calibration import calibrate
from pyramidflow.train.config import TrainConfig
from pyramidflow.train.data import batch_images, image_size, plain_loader

__all__ = ["decision_thresholds", "registration_reference", "template_and_score_stats"]


@torch.no_grad()
def template_and_score_stats(
    model: torch.nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device, dtype: torch.dtype
) -> tuple[list[Tensor], dict]:
    """The latent template and score statistics of the training images (eval mode, no grad).

    Only training (normal) images are used: thresholds derived from these statistics never see the
    test set.

    Returns:
        The template (one CPU tensor ``(1, C, H_i, W_i)`` per level) and the statistics: image score
        mean, std, max and every score, the pixel score at ``config.score_quantile`` and the pixel max.
    """
    from pyramidflow.model import fit_template, image_score

    was_training = model.training
    model.eval()
    try:
        batches = (batch_images(b, device, dtype) for b in plain_loader(dataset, config))
        template = fit_template(model, batches, kind=model.config.template)
        image_scores, pixels = [], []
        # NOTE [pixel quantile sample]
        # A fixed-stride sample of at most ~4M pixel scores keeps the
        # quantile's memory bounded for large training sets; it is deterministic, never random.
        total = len(dataset) * int(np.prod(image_size(dataset)))
        stride = max(1, math.ceil(total / (1 << 22)))
        for batch in plain_loader(dataset, config):
            images = batch_images(batch, device, dtype)
            maps = model.anomaly_map(images, template)  # (N, 1, H, W)
            image_scores.append(image_score(maps).double().cpu())
            pixels.append(maps.reshape(-1)[::stride].double().cpu())
        scores = torch.cat(image_scores)
        pixel_values = torch.cat(pixels).numpy()
        stats = {
            "num_images": int(scores.numel()),
            "image_mean": float(scores.mean()),
            "image_std": float(scores.std(unbiased=False)),
            "image_max": float(scores.max()),
            "quantile": float(config.score_quantile),
            "pixel_quantile": float(np.quantile(pixel_values, config.score_quantile)),
            "pixel_max": float(pixel_values.max()),
            "image_scores": [float(s) for s in scores],
        }
        return [level.detach().cpu() for level in template], stats
    finally:
        model.train(was_training)


def decision_thresholds(
    model: torch.nn.Module,
    template: Sequence[Tensor],
    stats: dict,
    *,
    held_out: Dataset | None,
    training_images: Dataset,
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """Image and pixel thresholds on the held-out good images (the training images if none were held out).

    Returns:
        The record of :func:`pyramidflow.calibration.calibrate` (thresholds, targets, rules, source).
    """
    images = held_out if held_out is not None else training_images
    return calibrate(
        model, [level.to(device) for level in template], images, image_fpr=config.image_fpr,
        pixel_fpr=config.pixel_fpr, batch_size=config.batch_size, device=device, dtype=dtype,
        source="held-out" if held_out is not None else "training images",
        training_scores=stats["image_scores"] if held_out is not None else None,
        pixel_rule=config.pixel_rule, seed=config.seed,
    )


def registration_reference(dataset: Dataset, *, batch_size: int = 16) -> Tensor:
    """The reference images are aligned to: the mean ``(3, H, W)`` normalised training image, on the CPU.

    3 floats a pixel (192 KiB at 128 px), so the checkpoint carries it and registration needs no
    training images.

    Args:
        dataset: the training images (dicts with ``image``: ``(3, H, W)`` normalised, at the trained size),
            unaugmented.
    """
    total, count = None, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = batch["image"].double()
        total = images.sum(0) if total is None else total + images.sum(0)
        count += images.shape[0]
    if count == 0:
        raise ValueError("registration_reference: the training data set is empty; give the training images.")
    return (total / count).float()
