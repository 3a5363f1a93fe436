"""Evaluation of a checkpoint on a labelled test set: anomaly maps, scores, metrics, and the pictures to look at.

``evaluate`` runs a labelled test set (MVTec / BTAD / folder layout) and writes
``metrics.json``, one overlay panel per test image and ``report.html`` (unlabelled images go
through :mod:`pyramidflow.inference.predict`). The template,
the score statistics and the decision thresholds come from the checkpoint: they
were computed on training and held-out good images only, so nothing here is
tuned on the test set.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import List, Optional

import numpy as np
from torch.utils.data import Dataset

from .._utils import write_text_atomic
from ..calibration import stored_mask_rule, stored_pixel_rule, stored_thresholds
from ..checkpoint import Checkpoint
from ..metrics import (AUPRO_FPR_LIMIT, _metrics_and_ranking, best_pixel_f1, image_auroc, image_decision_metrics,
                       mask_decision_metrics, pixel_auroc)
from ..train.log import LOG_NAME
from .curves import ranked_curves
from .maps import Inference, Predictions, check_smoothing_sigma, load_for_inference, predict_dataset
from .registration import stored_reference
from .plot_worker import PlotWorker
from .report import EvalPlots, outcome, write_eval_report
from .visualize import heat_top, overlay_panel, save_panel

__all__ = ["evaluate", "load_for_inference"]


@dataclass
class _Decided:
    """The decisions at the checkpoint's stored thresholds, made once for the metrics, the panels and the report."""

    pixel_threshold: float
    is_anomalous: np.ndarray  # (N,) bool: score > image threshold (NOTE [decision metrics] in pyramidflow.metrics)
    masks: np.ndarray  # (N, H, W) bool: the stored mask rule applied to each map


def _decide(checkpoint: Checkpoint, predictions: Predictions) -> _Decided:
    image_threshold, pixel_threshold, _ = stored_thresholds(checkpoint)
    flagged = predictions.scores.astype(np.float64) > image_threshold  # as image_decision_metrics decides
    return _Decided(pixel_threshold, flagged, stored_mask_rule(checkpoint)(predictions.maps, flagged))


def _overlay_paths(predictions: Predictions) -> List[str]:
    """Where each test image's overlay goes, relative to the output folder: ``overlays/<defect type>/<stem>.png``."""
    return [PurePosixPath("overlays", kind, f"{Path(path).stem}.png").as_posix()
            for path, kind in zip(predictions.paths, predictions.defect_types)]


def _write_panels(predictions: Predictions, out_dir: Path, overlays: List[str], vmin: float, vmax: float,
                  decided: _Decided) -> None:
    """One overlay per test image: ground truth, predicted outline, decision and the colour bar with the threshold."""
    for i, overlay in enumerate(overlays):
        said = outcome(int(predictions.labels[i]), bool(decided.is_anomalous[i]))
        panel = overlay_panel(
            predictions.images[i], predictions.maps[i], vmin=vmin, vmax=vmax, mask=predictions.masks[i],
            predicted=decided.masks[i], threshold=decided.pixel_threshold, is_anomalous=bool(decided.is_anomalous[i]),
            title=f"{predictions.defect_types[i]}/{Path(predictions.paths[i]).stem}  "
                  f"score {predictions.scores[i]:.3g}  ({said})",
        )
        save_panel(panel, out_dir / overlay)


def _image_rows(predictions: Predictions, decided: _Decided, overlays: List[str]) -> List[dict]:
    """Per test image, in the data set's order: what the report's gallery shows."""
    return [
        {"name": f"{kind}/{Path(path).stem}", "file": str(path), "defect_type": kind, "label": int(label),
         "score": float(score), "is_anomalous": bool(flag), "overlay": overlay}
        for path, kind, label, score, flag, overlay in zip(predictions.paths, predictions.defect_types,
                                                           predictions.labels, predictions.scores,
                                                           decided.is_anomalous, overlays)
    ]


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


def _decision_metrics(checkpoint: Checkpoint, predictions: Predictions, decided: _Decided) -> dict:
    """Image precision / recall / F1 / FPR and pixel F1 / IoU at the checkpoint's calibrated thresholds.

    Beside them, the best pixel F1 over all thresholds and its threshold, read off the test masks: a
    diagnosis of how far the calibrated mask is from the best these maps allow, never used to decide.
    """
    image_threshold, pixel_threshold, source = stored_thresholds(checkpoint)
    rule = stored_mask_rule(checkpoint)
    best = best_pixel_f1(predictions.maps, predictions.masks) if predictions.masks.any() else None
    return {
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "pixel_rule": stored_pixel_rule(checkpoint),
        "pixel_low_threshold": rule.low,
        "pixel_peak_fraction": rule.fraction,
        "thresholds_from": source,
        **image_decision_metrics(predictions.scores, predictions.labels, image_threshold),
        **mask_decision_metrics(decided.masks, predictions.masks),
        "flagged_images_with_empty_mask": int(sum(not m.any() for m in decided.masks[decided.is_anomalous])),
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
    report: bool = True,
    register: bool = False,
    plot_worker: Optional[PlotWorker] = None,
) -> dict:
    """Metrics of a checkpoint on a labelled test set; writes ``metrics.json``, overlays and ``report.html``.

    Args:
        inference: from :func:`load_for_inference`.
        dataset: the test set, at ``inference.image_size`` and read at ``inference.bit_depth`` (give it to the
            data set: ``MVTecDataset(..., bit_depth=inference.bit_depth)``), as training read its images.
        category: the test set's category (default: the data set's ``category``); refused when the
            checkpoint was trained on another one.
        report: write ``report.html`` (:mod:`pyramidflow.inference.report`); the training-loss plot reads
            ``train_log.jsonl`` beside the checkpoint. Its plots are drawn by a process of their own
            (:class:`pyramidflow.inference.report.EvalPlots`).
        plot_worker: that process, started already (the command line starts it before it imports torch, so
            that matplotlib's import overlaps torch's); it is ended on return. Default: one started here.
        register: align each image to the checkpoint's registration reference first
            (:mod:`pyramidflow.inference.registration`); metrics stay in the test images' coordinates.

    Returns:
        The metrics: ``pixel_auroc``, ``image_auroc``, ``aupro`` (AUPRO integrated to FPR 0.3),
        ``per_defect_type``, and at the checkpoint's calibrated thresholds ``image_precision``,
        ``image_recall``, ``image_f1``, ``image_fpr``, ``pixel_f1``, ``pixel_iou`` (``pixel_precision``,
        ``pixel_recall``), ``flagged_images_with_empty_mask`` (0: ``NOTE [a flagged image
        has a mask]`` in :mod:`pyramidflow.pixel_threshold`); ``images``: per test image, in the data
        set's order, its ``name`` (``<defect type>/<stem>``), ``file``, ``defect_type``, ``label``,
        ``score``, ``is_anomalous`` and ``overlay``.

    Raises:
        ValueError: the checkpoint was trained on another category, or test images have no label.
    """
    with nullcontext() if plot_worker is None else plot_worker:  # ended on every path
        checkpoint = inference.checkpoint
        smoothing_sigma = check_smoothing_sigma(smoothing_sigma, inference.image_size, "evaluate")
        _check_category(checkpoint, category or getattr(dataset, "category", None))
        # Started first, so that the loss plot is drawn during inference (EvalPlots says why).
        log = Path(checkpoint.path).parent / LOG_NAME
        with EvalPlots(log, fpr_limit=AUPRO_FPR_LIMIT, worker=plot_worker) if report else nullcontext() as plots:
            return _evaluate(inference, dataset, Path(out_dir), smoothing_sigma, category, progress, register, plots)


def _evaluate(inference: Inference, dataset: Dataset, out_dir: Path, smoothing_sigma: float, category: str,
              progress: bool, register: bool, plots: Optional[EvalPlots]) -> dict:
    checkpoint = inference.checkpoint
    predictions = predict_dataset(
        inference.model, inference.template, dataset,
        device=inference.device, smoothing_sigma=smoothing_sigma, progress=progress,
        reference=stored_reference(checkpoint, "evaluate").to(inference.device) if register else None,
    )
    if (predictions.labels < 0).any():
        raise ValueError(
            f"evaluate: {int((predictions.labels < 0).sum())} test images have no label; give a mask folder, or use "
            "`pyramidflow predict` for unlabelled images."
        )
    # The ranked pixels are kept for the report's curves (the metrics' own, and sorted once).
    metrics, ranked = _metrics_and_ranking(predictions.maps, predictions.masks, predictions.scores,
                                           predictions.labels, AUPRO_FPR_LIMIT, "evaluate")
    decided = _decide(checkpoint, predictions)
    overlays = _overlay_paths(predictions)
    metrics_json = {
        **{k: float(v) for k, v in metrics.items()},
        "category": category,
        "num_images": len(predictions.paths),
        "num_anomalous": int((predictions.labels == 1).sum()),
        "smoothing_sigma": smoothing_sigma,
        "register": bool(register),
        "checkpoint": str(checkpoint.path),
        "checkpoint_step": checkpoint.step,
        "per_defect_type": _per_defect_type(predictions),
        **_decision_metrics(checkpoint, predictions, decided),
        "overlays": overlays,
        "images": _image_rows(predictions, decided, overlays),
    }
    if plots is not None:
        plots.draw_curves(metrics_json, ranked_curves(ranked))
    del ranked
    fallback = (checkpoint.score_stats or {}).get("image_max") or float(np.quantile(predictions.maps, 0.999))
    _write_panels(predictions, out_dir, overlays, 0.0, heat_top(decided.pixel_threshold, fallback), decided)
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics_json, indent=2) + "\n")
    if plots is not None:
        write_eval_report(out_dir, metrics_json, plots)
    return metrics_json
