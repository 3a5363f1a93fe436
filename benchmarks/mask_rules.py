"""Compare pixel-threshold rules on finished checkpoints: calibrated pixel F1 against the label-using best.

Every rule is set from the checkpoint's held-out good images only (the ``calibration["held_out"]``
indices of ``train/good``); the test images and their masks are read afterwards, to score the masks.

    python benchmarks/mask_rules.py --data DEMO/data --runs DEMO [--categories fabric nut pcb]

``--runs`` holds ``<category>/checkpoint.pt`` (the layout ``pyramidflow demo`` writes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from pyramidflow.calibration import CalibrationSplit, pixel_threshold
from pyramidflow.data import MVTecDataset
from pyramidflow.data.transforms import image_to_tensor
from pyramidflow.evaluate import anomaly_maps, load_for_inference, predict_dataset
from pyramidflow.metrics import best_pixel_f1, compute_metrics, pixel_decision_metrics
from pyramidflow.pixel_threshold import paste_defects

_EIGHT = np.ones((3, 3), dtype=bool)


def _f1_of_masks(predicted: np.ndarray, truth: np.ndarray) -> float:
    tp = int((predicted & truth).sum())
    return 2 * tp / max(1, 2 * tp + int((predicted & ~truth).sum()) + int((~predicted & truth).sum()))


def _peak_fraction(maps: np.ndarray, floor: float, fraction: float) -> np.ndarray:
    """Within each region of ``maps > floor``: pixels above ``fraction`` of the region's peak."""
    out = np.zeros(maps.shape, dtype=bool)
    for i, m in enumerate(maps):
        labels, count = ndimage.label(m > floor, structure=_EIGHT)
        if count:
            peaks = np.concatenate(([np.inf], ndimage.maximum(m, labels, np.arange(1, count + 1))))
            out[i] = (labels > 0) & (m > fraction * peaks[labels])
    return out


def _seeded_peak_fraction(maps: np.ndarray, low: float, seed: float, fraction: float) -> np.ndarray:
    """Regions of ``maps > low`` that reach ``seed``; within each, pixels above ``fraction`` of its peak."""
    return _hysteresis(maps, low, seed) & _peak_fraction(maps, low, fraction)


def _hysteresis(maps: np.ndarray, low: float, high: float) -> np.ndarray:
    """Regions of ``maps > low`` that reach ``high`` somewhere."""
    out = np.zeros(maps.shape, dtype=bool)
    for i, m in enumerate(maps):
        labels, count = ndimage.label(m > low, structure=_EIGHT)
        if count:
            keep = np.concatenate(([False], ndimage.maximum(m, labels, np.arange(1, count + 1)) > high))
            out[i] = keep[labels]
    return out


def run(category: str, data: Path, runs: Path) -> dict:
    device = torch.device("cpu")
    inference = load_for_inference(runs / category / "checkpoint.pt", device)
    size = inference.image_size
    held_idx = inference.checkpoint.calibration["held_out"]
    train_set = MVTecDataset(data, category, split="train", size=size, augment=False)  # as calibration sees them
    held = predict_dataset(inference.model, inference.template, CalibrationSplit(train_set, held_idx),
                           device=device, progress=False)

    def maps_of(images: np.ndarray) -> np.ndarray:
        batch = torch.stack([image_to_tensor(Image.fromarray(im), size) for im in images])
        return np.concatenate([anomaly_maps(inference.model, inference.template, batch[i:i + 8])
                               for i in range(0, len(batch), 8)])

    t_fpr = pixel_threshold(held.maps, 0.001)
    start = time.perf_counter()
    pasted, pasted_masks = paste_defects(held.images, seed=0)
    pasted_maps = maps_of(pasted)
    synth = best_pixel_f1(pasted_maps, pasted_masks)
    synth_seconds = time.perf_counter() - start
    t_synth = max(t_fpr, synth["threshold"])
    # per-pixel standardisation by the held-out maps (leave-one-in: mean and std over the held-out images)
    mu, sd = held.maps.mean(axis=0), held.maps.std(axis=0) + 1e-6
    z_synth = best_pixel_f1((pasted_maps - mu) / sd, pasted_masks)
    # peak fraction chosen on the drawn defects
    fractions = np.round(np.arange(0.2, 0.85, 0.05), 2)
    frac = max(fractions, key=lambda f: _f1_of_masks(_peak_fraction(pasted_maps, t_fpr, f), pasted_masks))

    frac_seeded = max(fractions, key=lambda f: _f1_of_masks(_seeded_peak_fraction(pasted_maps, t_fpr, t_synth, f), pasted_masks))
    frac_synth = max(fractions, key=lambda f: _f1_of_masks(_peak_fraction(pasted_maps, t_synth, f), pasted_masks))

    test = predict_dataset(inference.model, inference.template, MVTecDataset(data, category, split="test", size=size),
                           device=device, progress=False)
    truth = test.masks > 0.5
    good = test.labels == 0
    best = best_pixel_f1(test.maps, test.masks)
    rules = {
        "fpr": test.maps > t_fpr,
        "synthetic": test.maps > t_synth,
        "synthetic (no floor)": test.maps > synth["threshold"],
        "standardised + synthetic": (test.maps - mu) / sd > z_synth["threshold"],
        "peak x 0.5 (floor fpr)": _peak_fraction(test.maps, t_fpr, 0.5),
        f"peak x {frac} (chosen on drawn)": _peak_fraction(test.maps, t_fpr, frac),
        f"seeded synth, peak x {frac_seeded} floor fpr": _seeded_peak_fraction(test.maps, t_fpr, t_synth, frac_seeded),
        "seeded synth, peak x 0.5 floor fpr": _seeded_peak_fraction(test.maps, t_fpr, t_synth, 0.5),
        f"peak x {frac_synth} floor synth": _peak_fraction(test.maps, t_synth, frac_synth),
        "hysteresis fpr -> synthetic": _hysteresis(test.maps, t_fpr, t_synth),
        "hysteresis synthetic -> max held-out": _hysteresis(test.maps, t_synth, float(held.maps.max())),
    }
    metrics = compute_metrics(test.maps, test.masks, test.scores, test.labels)
    print(f"\n== {category}: {len(held_idx)} held-out images, {len(pasted)} drawn defects ({synth_seconds:.1f} s), "
          f"{len(test.paths)} test images; pixel AUROC {metrics['pixel_auroc']:.4f} AUPRO {metrics['aupro']:.4f} "
          f"image AUROC {metrics['image_auroc']:.4f}")
    print(f"thresholds: fpr {t_fpr:.4f}  synthetic {synth['threshold']:.4f} (F1 on drawn {synth['pixel_f1']:.3f})  "
          f"test F1-best {best['threshold']:.4f} (uses test labels)")
    print(f"{'rule':<40} {'pixel F1':>8} {'/ best':>7} {'IoU':>6} {'good empty':>10}")
    rows = {}
    for name, mask in rules.items():
        f1 = _f1_of_masks(mask, truth)
        tp = int((mask & truth).sum())
        iou = tp / max(1, int((mask | truth).sum()))
        empty = float(np.mean([not m.any() for m in mask[good]])) if good.any() else float("nan")
        rows[name] = f1
        print(f"{name:<40} {f1:>8.3f} {f1 / best['pixel_f1']:>7.3f} {iou:>6.3f} {empty:>10.2f}")
    print(f"{'F1-best on the test labels (diagnosis)':<40} {best['pixel_f1']:>8.3f}")
    assert abs(pixel_decision_metrics(test.maps, test.masks, t_fpr)["pixel_f1"] - rows["fpr"]) < 1e-9
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--categories", nargs="+", default=["fabric", "nut", "pcb"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for category in args.categories:
        run(category, args.data, args.runs)


if __name__ == "__main__":
    main()
