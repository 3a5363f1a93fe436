"""Inference from a checkpoint: anomaly maps, scores, metrics, and the pictures to look at.

``evaluate`` runs a labelled test set (MVTec / BTAD / folder layout) and writes
``metrics.json`` plus one overlay panel per test image; ``predict`` runs any
images and writes their decisions, masks, heat maps and overlays. The template,
the score statistics and the decision thresholds come from the checkpoint: they
were computed on training and held-out good images only, so nothing here is
tuned on the test set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from .calibration import stored_mask_rule, stored_pixel_rule, stored_thresholds
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .data import denormalize
from .data._io import _header_size, list_images, load_rgb
from .metrics import (best_pixel_f1, compute_metrics, image_auroc, image_decision_metrics, mask_decision_metrics,
                      pixel_auroc)
from .model import anomaly_map, image_score
from .tiling import check_tileable
from .visualize import overlay_panel, save_panel

__all__ = ["Inference", "Predictions", "load_for_inference", "predict_dataset", "evaluate", "predict"]


@dataclass
class Predictions:
    """Anomaly maps and scores of a data set, in its order.

    Attributes:
        maps: ``(N, H, W)`` float32 anomaly maps at the model's input resolution.
        scores: ``(N,)`` image scores (max of each map, after smoothing).
        images: ``(N, H, W, 3)`` uint8 images as the model saw them (for overlays).
        masks: ``(N, H, W)`` ground truth in {0, 1} (zeros where unknown).
        labels: ``(N,)`` 0 normal, 1 anomalous, -1 unknown.
        paths: source file of each image.
        defect_types: folder name of each test image (``"good"`` for normal ones).
    """

    maps: np.ndarray
    scores: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    paths: List[str]
    defect_types: List[str]


@dataclass
class Inference:
    """A finished checkpoint ready to run: its contents, the model (eval mode) and the template, on one device."""

    checkpoint: Checkpoint
    model: torch.nn.Module
    template: Tuple[torch.Tensor, ...]
    device: torch.device

    @property
    def image_size(self) -> Tuple[int, int]:
        """The input resolution the template belongs to: its finest level's, times the encoder's stride."""
        stride = getattr(getattr(self.model, "config", None), "input_stride", 1)
        return tuple(int(s) * stride for s in self.template[0].shape[-2:])


def load_for_inference(path: str | Path, device: torch.device) -> Inference:
    """Model (eval mode) and template of a finished checkpoint, on ``device``.

    Raises:
        CheckpointError: a damaged file, or a run that stopped before its template was computed.
    """
    checkpoint = load_checkpoint(path)
    if not checkpoint.finished or checkpoint.template is None:
        raise CheckpointError(
            f"{path}: training stopped at step {checkpoint.step} before it finished, so there is no template "
            "yet; continue it with `pyramidflow train ... --resume`."
        )
    model = checkpoint.build_model(device)
    template = tuple(level.to(device) for level in checkpoint.template)
    return Inference(checkpoint, model, template, device)


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``(N, H, W)`` maps, per map (``sigma`` in pixels; 0 leaves them as they are)."""
    if sigma <= 0:
        return maps
    return np.stack([ndimage.gaussian_filter(m, sigma=sigma, mode="nearest") for m in maps])


@torch.no_grad()
def anomaly_maps(model: torch.nn.Module, template: Sequence[torch.Tensor], images: torch.Tensor) -> np.ndarray:
    """``(N, H, W)`` float32 maps of normalised images ``(N, 3, H, W)`` at the model's resolution (eval, no grad)."""
    size = tuple(images.shape[-2:])  # an encoder's maps are upsampled to the images'
    difference = getattr(getattr(model, "config", None), "difference", "pyramid")  # the checkpoint's switch
    return anomaly_map(model(images), template, size, difference=difference)[:, 0].float().cpu().numpy()


@torch.no_grad()
def predict_dataset(
    model: torch.nn.Module,
    template: Sequence[torch.Tensor],
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 8,
    smoothing_sigma: float = 0.0,
    progress: bool = True,
) -> Predictions:
    """Anomaly maps and scores of every item of ``dataset`` (dicts with ``image``, ``mask``, ``label``, ``path``)."""
    from tqdm.auto import tqdm

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    maps, images, masks, labels, paths, kinds = [], [], [], [], [], []
    for batch in tqdm(loader, desc="anomaly maps", unit="batch", disable=not progress, leave=False):
        maps.append(anomaly_maps(model, template, batch["image"].to(device)))
        images.append(denormalize(batch["image"]))
        masks.append(batch["mask"][:, 0].numpy())
        labels.append(np.asarray(batch["label"]))
        paths.extend(batch["path"])
        kinds.extend(batch.get("defect_type", ["unknown"] * len(batch["path"])))
    if not maps:
        raise ValueError("predict_dataset: the data set is empty; point it at a folder with test images.")
    all_maps = smooth(np.concatenate(maps), smoothing_sigma)
    scores = image_score(torch.from_numpy(all_maps)[:, None]).numpy()
    return Predictions(all_maps, scores, np.concatenate(images), np.concatenate(masks), np.concatenate(labels), paths, kinds)


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
    best = best_pixel_f1(predictions.maps, predictions.masks) if predictions.masks.any() else None
    return {
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "pixel_rule": stored_pixel_rule(checkpoint),
        "pixel_low_threshold": rule.low,
        "pixel_peak_fraction": rule.fraction,
        "thresholds_from": source,
        **image_decision_metrics(predictions.scores, predictions.labels, image_threshold),
        **mask_decision_metrics(rule(predictions.maps), predictions.masks),
        "best_pixel_f1_using_test_labels": None if best is None else best["pixel_f1"],
        "best_pixel_threshold_using_test_labels": None if best is None else best["threshold"],
    }


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
        dataset: the test set, at ``inference.image_size``.

    Returns:
        The metrics: ``pixel_auroc``, ``image_auroc``, ``aupro`` (AUPRO integrated to FPR 0.3),
        ``per_defect_type``, and at the checkpoint's calibrated thresholds ``image_precision``,
        ``image_recall``, ``image_f1``, ``image_fpr``, ``pixel_f1``, ``pixel_iou`` (``pixel_precision``,
        ``pixel_recall``).
    """
    checkpoint = inference.checkpoint
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
    _write_json(report, out_dir / "metrics.json")
    return report


def predict(
    inference: Inference,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    smoothing_sigma: float = 0.0,
    progress: bool = True,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    tile: bool = False,
) -> List[dict]:
    """Decisions for unlabelled images (files or folders of images), at each image's resolution.

    Writes under ``out_dir``, per image: ``masks/<name>.png`` (the binary defect mask),
    ``maps/<name>.png`` (the heat map), ``overlays/<name>.png`` (with the predicted outline); and
    ``predictions.json`` / ``predictions.csv`` (score, is_anomalous, regions). See
    :mod:`pyramidflow.decisions`.

    Args:
        image_threshold, pixel_threshold: override the checkpoint's calibrated thresholds.
        tile: tiled inference at native resolution (:mod:`pyramidflow.tiling`).

    Returns:
        One ``{"path", "score", "is_anomalous", "regions"}`` dict per image.
    """
    from tqdm.auto import tqdm

    from .calibration import check_threshold
    from .decisions import write_predictions
    from .detector import Detector

    image_threshold = check_threshold(image_threshold, "--image-threshold")
    pixel_threshold = check_threshold(pixel_threshold, "--pixel-threshold")
    files = _expand(inputs)
    for path in files:  # a damaged file stops the run before any work (NOTE [fail at start] in data/_io.py)
        _header_size(path, "predict")
    detector = Detector(inference, tile=tile, smoothing_sigma=smoothing_sigma)
    if image_threshold is not None:
        detector.threshold = image_threshold
    if pixel_threshold is not None:
        detector.pixel_threshold = pixel_threshold
    if tile:
        for path in files:
            width, height = _header_size(path, "predict")
            check_tileable(height, width, inference.image_size, f"predict --tile: {path}")
    vmax = float((inference.checkpoint.score_stats or {}).get("image_max") or detector.threshold or 1.0)
    # A bar only after a second, so that an error on the first images stays the only line on stderr.
    files = tqdm(files, desc="predict", unit="image", disable=not progress, leave=False, delay=1.0)
    decided = _decide_each(detector, files)
    return write_predictions(decided, Path(out_dir), vmax=vmax, image_threshold=detector.threshold,
                             pixel_threshold=detector.pixel_threshold, checkpoint=str(inference.checkpoint.path))


def _decide_each(detector, files: Iterable[Path]) -> Iterable[tuple]:
    """``(prediction, pixels)`` per file, ``detector.batch_size`` files at a time; each file is decoded once."""
    chunk: list = []

    def flush() -> Iterable[tuple]:
        predictions = detector([image for _, image in chunk])
        for (name, image), prediction in zip(chunk, predictions):
            prediction.path = name
            yield prediction, np.asarray(image)
        chunk.clear()

    for path in files:
        chunk.append((str(path), load_rgb(Path(path), "predict")))
        if len(chunk) == detector.batch_size:
            yield from flush()
    if chunk:
        yield from flush()


def _expand(inputs: Iterable[str | Path]) -> List[Path]:
    """Image files given directly, and the images of folders given, in order."""
    files: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(list_images(item, "predict", "pass image files or a folder of images."))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder.")
    if not files:
        raise ValueError("predict: no input images given.")
    return files


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
