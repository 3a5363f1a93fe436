"""Evaluation of a checkpoint on a labelled test set: anomaly maps, scores, metrics, and the pictures to look at.

``evaluate`` runs a labelled test set (MVTec / BTAD / folder layout) and writes
``metrics.json`` plus one overlay panel per test image (unlabelled images go
through :mod:`pyramidflow.inference.predict`). The template,
the score statistics and the decision thresholds come from the checkpoint: they
were computed on training and held-out good images only, so nothing here is
tuned on the test set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
from torch.utils.data import Dataset

from .._utils import write_text_atomic
from ..calibration import stored_mask_rule, stored_pixel_rule, stored_thresholds
from ..checkpoint import Checkpoint
from ..metrics import (best_pixel_f1, compute_metrics, image_auroc, image_decision_metrics, mask_decision_metrics,
                       pixel_auroc)
from .maps import Inference, Predictions, check_smoothing_sigma, load_for_inference, predict_dataset
from .visualize import overlay_panel, save_panel

__all__ = ["evaluate", "load_for_inference"]


def _colour_range(checkpoint: Checkpoint, predictions: Predictions) -> tuple[float, float]:
    """Heat-map range: 0 to the highest training score, so normal images stay dark and defects glow."""
    stats = checkpoint.score_stats or {}
    vmax = stats.get("image_max") or float(np.quantile(predictions.maps, 0.999))
    return 0.0, float(vmax)


def _write_panels(predictions: Predictions, out_dir: Path, vmin: float, vmax: float, with_masks: bool) -> List[str]:
    written = []
    for i, path in enumerate(predictions.paths):
        name = Path(path).stem
        kind = predictions.defect_types[i]
        mask = predictions.masks[i] if with_masks else None
        panel = overlay_panel(
            predictions.images[i], predictions.maps[i], vmin=vmin, vmax=vmax, mask=mask,
            title=f"{kind}/{name}  score {predictions.scores[i]:.3g}",
        )
        target = out_dir / "overlays" / kind / f"{name}.png"
        save_panel(panel, target)
        written.append(str(target.relative_to(out_dir)))
    return written


def _per_defect_type(predictions: Predictions) -> dict:
    """Pixel and image AUROC of each defect type against the normal test images."""
    table = {}
    good = np.array([k == "good" for k in predictions.defect_types])
    for kind in sorted(set(predictions.defect_types) - {"good"}):
        chosen = np.array([k == kind for k in predictions.defect_types])
        row = {"count": int(chosen.sum())}
        if predictions.masks[chosen].any():
            row["pixel_auroc"] = pixel_auroc(predictions.maps[chosen], predictions.masks[chosen])
        if good.any():
            both = chosen | good
            row["image_auroc"] = image_auroc(predictions.scores[both], chosen[both].astype(int))
        table[kind] = row
    return table


def _decision_metrics(checkpoint: Checkpoint, predictions: Predictions) -> dict:
    """Image precision / recall / F1 / FPR and pixel F1 / IoU at the checkpoint's calibrated thresholds.

    Beside them, the best pixel F1 over all thresholds and its threshold, read off the test masks: a
    diagnosis of how far the calibrated mask is from the best these maps allow, never used to decide.
    """
    image_threshold, pixel_threshold, source = stored_thresholds(checkpoint)
    rule = stored_mask_rule(checkpoint)
    flagged = predictions.scores.astype(np.float64) > image_threshold  # as image_decision_metrics decides
    masks = rule(predictions.maps, flagged)
    best = best_pixel_f1(predictions.maps, predictions.masks) if predictions.masks.any() else None
    return {
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "pixel_rule": stored_pixel_rule(checkpoint),
        "pixel_low_threshold": rule.low,
        "pixel_peak_fraction": rule.fraction,
        "thresholds_from": source,
        **image_decision_metrics(predictions.scores, predictions.labels, image_threshold),
        **mask_decision_metrics(masks, predictions.masks),
        "flagged_images_with_empty_mask": int(sum(not m.any() for m in masks[flagged])),
        "best_pixel_f1_using_test_labels": None if best is None else best["pixel_f1"],
        "best_pixel_threshold_using_test_labels": None if best is None else best["threshold"],
    }


def _check_category(checkpoint: Checkpoint, category: str | None) -> None:
    """Metrics of one category's model on another's test set mean nothing: refuse them.

    Checkpoints older than the data record (``checkpoint.data``) name no category and are not checked.
    """
    trained = (checkpoint.data or {}).get("category")
    if trained is not None and category and category != trained:
        raise ValueError(
            f"evaluate: the checkpoint {checkpoint.path} was trained on category {trained!r} but the test set is "
            f"{category!r} (--category); evaluate it with --category {trained}, or pass the checkpoint trained on "
            f"{category}."
        )


def evaluate(
    inference: Inference,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    smoothing_sigma: float = 0.0,
    category: str = "",
    progress: bool = True,
) -> dict:
    """Metrics of a checkpoint on a labelled test set; writes ``metrics.json`` and overlays to ``out_dir``.

    Args:
        inference: from :func:`load_for_inference`.
        dataset: the test set, at ``inference.image_size`` and read at ``inference.bit_depth`` (give it to the
            data set: ``MVTecDataset(..., bit_depth=inference.bit_depth)``), as training read its images.
        category: the test set's category (default: the data set's ``category``); refused when the
            checkpoint was trained on another one.

    Returns:
        The metrics: ``pixel_auroc``, ``image_auroc``, ``aupro`` (AUPRO integrated to FPR 0.3),
        ``per_defect_type``, and at the checkpoint's calibrated thresholds ``image_precision``,
        ``image_recall``, ``image_f1``, ``image_fpr``, ``pixel_f1``, ``pixel_iou`` (``pixel_precision``,
        ``pixel_recall``), and ``flagged_images_with_empty_mask`` (0: ``NOTE [a flagged image
        has a mask]`` in :mod:`pyramidflow.pixel_threshold`).

    Raises:
        ValueError: the checkpoint was trained on another category, or test images have no label.
    """
    checkpoint = inference.checkpoint
    smoothing_sigma = check_smoothing_sigma(smoothing_sigma, inference.image_size, "evaluate")
    _check_category(checkpoint, category or getattr(dataset, "category", None))
    predictions = predict_dataset(
        inference.model, inference.template, dataset,
        device=inference.device, smoothing_sigma=smoothing_sigma, progress=progress,
    )
    if (predictions.labels < 0).any():
        raise ValueError(
            f"evaluate: {int((predictions.labels < 0).sum())} test images have no label; give a mask folder, or use "
            "`pyramidflow predict` for unlabelled images."
        )
    metrics = compute_metrics(predictions.maps, predictions.masks, predictions.scores, predictions.labels)
    out_dir = Path(out_dir)
    vmin, vmax = _colour_range(checkpoint, predictions)
    overlays = _write_panels(predictions, out_dir, vmin, vmax, with_masks=True)
    report = {
        **{k: float(v) for k, v in metrics.items()},
        "category": category,
        "num_images": len(predictions.paths),
        "num_anomalous": int((predictions.labels == 1).sum()),
        "smoothing_sigma": smoothing_sigma,
        "checkpoint": str(checkpoint.path),
        "checkpoint_step": checkpoint.step,
        "per_defect_type": _per_defect_type(predictions),
        **_decision_metrics(checkpoint, predictions),
        "overlays": overlays,
    }
    write_text_atomic(out_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
    return report
