"""Compare pixel-threshold rules on finished checkpoints: calibrated pixel F1 against the label-using best.

Every rule is set from the checkpoint's held-out good images only (``calibration["held_out"]`` of
``train/good`` under ``--data``); the test images and their masks (under ``--test-data``, default
``--data``) are read afterwards, only to score the masks.

    python benchmarks/mask_rules.py --data DEMO/data --runs DEMO [--test-data SYNTH40] [--categories ...]

``--runs`` holds ``<category>/checkpoint.pt`` (the layout ``pyramidflow demo`` writes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pyramidflow.calibration import CalibrationSplit, pixel_threshold
from pyramidflow.data import MVTecDataset
from pyramidflow.data.transforms import image_to_tensor
from pyramidflow.inference.maps import anomaly_maps, load_for_inference, predict_dataset
from pyramidflow.metrics import best_pixel_f1, compute_metrics, image_decision_metrics, mask_decision_metrics
from pyramidflow.pixel_threshold import MaskRule, paste_defects, synthetic_rule


def run(category: str, data: Path, test_data: Path, runs: Path) -> dict:
    device = torch.device("cpu")
    inference = load_for_inference(runs / category / "checkpoint.pt", device)
    size, calibration = inference.image_size, inference.checkpoint.calibration
    train_set = MVTecDataset(data, category, split="train", size=size, augment=False)  # as calibration sees them
    held = predict_dataset(inference.model, inference.template, CalibrationSplit(train_set, calibration["held_out"]),
                           device=device, progress=False)

    def maps_of(images: np.ndarray) -> np.ndarray:
        batch = torch.stack([image_to_tensor(Image.fromarray(im), size) for im in images])
        return np.concatenate([anomaly_maps(inference.model, inference.template, batch[i:i + 8])
                               for i in range(0, len(batch), 8)])

    t_fpr = pixel_threshold(held.maps, calibration.get("pixel_fpr", 0.001))
    start = time.perf_counter()
    chosen = synthetic_rule(held.images, maps_of, t_fpr, seed=0)
    seconds = time.perf_counter() - start
    drawn, drawn_masks, _ = paste_defects(held.images, seed=0)  # the same drawing, for the rules that lost
    drawn_maps = maps_of(drawn)
    mu, sd = held.maps.mean(axis=0), held.maps.std(axis=0) + 1e-6  # per-pixel statistics of the held-out maps
    z_threshold = best_pixel_f1((drawn_maps - mu) / sd, drawn_masks)["threshold"]

    test = predict_dataset(inference.model, inference.template,
                           MVTecDataset(test_data, category, split="test", size=size), device=device, progress=False)
    good = test.labels == 0
    best = best_pixel_f1(test.maps, test.masks)
    rules = {
        "fpr (pixel FPR 0.001)": MaskRule.plain(t_fpr)(test.maps),
        "synthetic best-F1 threshold alone": MaskRule.plain(chosen.seed)(test.maps),
        "standardised map + synthetic": MaskRule.plain(z_threshold)((test.maps - mu) / sd),
        "hysteresis synthetic -> fpr": MaskRule(chosen.seed, t_fpr, 0.0)(test.maps),
        "0.5 x peak, floor fpr, no seed": MaskRule(t_fpr, t_fpr, 0.5)(test.maps),
        "0.5 x peak, seeded at synthetic": MaskRule(chosen.seed, t_fpr, 0.5)(test.maps),
        f"synthetic (default): seed, fpr, {chosen.fraction:.2f} x peak": chosen(test.maps),
    }
    metrics = compute_metrics(test.maps, test.masks, test.scores, test.labels)
    decided = image_decision_metrics(test.scores, test.labels, calibration["image_threshold"])
    print(f"\n== {category}: {len(held.paths)} held-out images, {len(drawn)} drawn defects (rule set in {seconds:.1f} s), "
          f"{len(test.paths)} test images\npixel AUROC {metrics['pixel_auroc']:.4f}  AUPRO {metrics['aupro']:.4f}  "
          f"image AUROC {metrics['image_auroc']:.4f}  image FPR {decided['image_fpr']:.3f}  recall {decided['image_recall']:.3f}")
    print(f"thresholds: fpr {t_fpr:.4f}  synthetic seed {chosen.seed:.4f}, fraction {chosen.fraction:.2f}  "
          f"stored {calibration.get('pixel_threshold'):.4f} ({calibration.get('pixel_rule')})  "
          f"test F1-best {best['threshold']:.4f} (uses test labels)")
    print(f"{'rule':<46} {'pixel F1':>8} {'/ best':>7} {'IoU':>6} {'good empty':>10}")
    rows = {}
    for name, mask in rules.items():
        scores = mask_decision_metrics(mask, test.masks)
        empty = float(np.mean([not m.any() for m in mask[good]]))
        rows[name] = {**scores, "ratio": scores["pixel_f1"] / best["pixel_f1"], "good_empty": empty}
        print(f"{name:<46} {scores['pixel_f1']:>8.3f} {rows[name]['ratio']:>7.3f} {scores['pixel_iou']:>6.3f} {empty:>10.2f}")
    print(f"{'best single threshold on the test labels':<46} {best['pixel_f1']:>8.3f}")
    return {"category": category, "best": best, "rules": rows, **metrics, **decided}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="data set of the checkpoints' training images")
    parser.add_argument("--test-data", type=Path, help="data set whose test images score the masks (default --data)")
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--categories", nargs="+", default=["fabric", "nut", "pcb"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = [run(c, args.data, args.test_data or args.data, args.runs) for c in args.categories]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
