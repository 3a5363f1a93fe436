"""Does the mask rule generalise beyond the defects it is set on? Rules set on held-out good images, scored on others.

    python benchmarks/mask_generalisation.py --run CHECKPOINT DATA CATEGORY [--run ...] [--json OUT]

For each finished checkpoint, the ``synthetic`` rule is set from its held-out good images only
(``calibration["held_out"]`` of ``DATA/CATEGORY/train/good``) in four ways: the seed and fraction of
the best pooled F1 on the demo generator's defects (the previous rule), or of the best mean F1 over the
kinds (each kind counts once), on the defects as drawn or as drawn and at half strength, and the
library's rule (:func:`pyramidflow.pixel_threshold.synthetic_rule`): per kind, as drawn, the seed no
lower than the highest value of the held-out good maps. Then:

- leave one kind out: each rule is set on four of the five drawn kinds and scored on the fifth (drawn
  as is and at half strength);
- on the test set (its own defect kinds, e.g. the development set's, which the rule never draws): the
  calibrated masks' pixel F1, precision and recall, per test kind, with a flagged image's mask capped
  at its peak as ``eval`` does, and the share of good test images given a mask.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pyramidflow.calibration import CalibrationSplit, pixel_threshold, stored_thresholds
from pyramidflow.data import MVTecDataset
from pyramidflow.data.transforms import image_to_tensor
from pyramidflow.inference.maps import anomaly_maps, load_for_inference, predict_dataset
from pyramidflow.metrics import best_pixel_f1, mask_decision_metrics
from pyramidflow.pixel_threshold import FRACTIONS, MaskRule, fit_mask_rule, paste_defects


def previous_rule(maps: np.ndarray, masks: np.ndarray, floor: float) -> MaskRule:
    """The rule as it was set before kinds counted once: the pooled best-F1 seed, then the pooled best fraction."""
    seed = max(floor, best_pixel_f1(maps, masks)["threshold"])
    return max((MaskRule(seed, floor, f) for f in FRACTIONS), key=lambda r: mask_decision_metrics(r(maps), masks)["pixel_f1"])


def _base(kind: str) -> str:
    return kind.split(" x")[0]


def run(checkpoint: Path, data: Path, category: str) -> dict:
    device = torch.device("cpu")
    inference = load_for_inference(checkpoint, device)
    size, calibration = inference.image_size, inference.checkpoint.calibration
    train_set = MVTecDataset(data, category, split="train", size=size, augment=False)
    held = predict_dataset(inference.model, inference.template, CalibrationSplit(train_set, calibration["held_out"]),
                           device=device, progress=False)
    floor = pixel_threshold(held.maps, calibration.get("pixel_fpr", 0.001))

    def maps_of(images: np.ndarray) -> np.ndarray:
        batch = torch.stack([image_to_tensor(Image.fromarray(im), size) for im in images])
        return np.concatenate([anomaly_maps(inference.model, inference.template, batch[i:i + 8]) for i in range(0, len(batch), 8)])

    drawn = {}
    for name, strengths in (("as drawn", (1.0,)), ("full and half strength", (1.0, 0.5))):
        images, masks, kinds = paste_defects(held.images, seed=0, strengths=strengths)
        drawn[name] = (maps_of(images), masks, np.asarray(kinds))

    good_peak = float(held.maps.max())

    def fit(name: str, how: str, keep=slice(None)) -> MaskRule:
        maps, masks, kinds = drawn[name]
        maps, masks, kinds = maps[keep], masks[keep], kinds[keep]
        if how == "pooled":
            return previous_rule(maps, masks, floor)
        return fit_mask_rule(maps, masks, kinds, floor, least_seed=good_peak if how == "above good" else None)

    variants = {"pooled, as drawn (previous)": ("as drawn", "pooled"),
                "per kind, as drawn": ("as drawn", "per kind"),
                "per kind, full and half strength": ("full and half strength", "per kind"),
                "per kind, seed >= good peaks (default)": ("as drawn", "above good")}
    rules = {label: fit(*args) for label, args in variants.items()}

    left_out = {}
    for label, (name, how) in variants.items():
        maps, masks, kinds = drawn["full and half strength"]
        bases = np.array([_base(k) for k in kinds])
        scores = []
        for kind in dict.fromkeys(bases.tolist()):
            own = np.array([_base(k) != kind for k in drawn[name][2]])
            rule = fit(name, how, own)
            scores.append(mask_decision_metrics(rule(maps[bases == kind]), masks[bases == kind])["pixel_f1"])
        left_out[label] = float(np.mean(scores))

    test = predict_dataset(inference.model, inference.template, MVTecDataset(data, category, split="test", size=size),
                           device=device, progress=False)
    flagged = test.scores.astype(np.float64) > stored_thresholds(inference.checkpoint)[0]
    types = np.array(test.defect_types)
    good = types == "good"
    rows = {}
    print(f"\n== {category} ({checkpoint}): {len(held.paths)} held-out images, floor {floor:.4f}, "
          f"{int(flagged.sum())} of {len(types)} test images flagged")
    test_kinds = sorted(set(types.tolist()) - {"good"})
    print(f"{'rule':<40} {'seed':>7} {'frac':>5} {'left-out kind F1':>16} {'test F1':>8} {'prec':>6} {'recall':>6} "
          + " ".join(f"{k:>9}" for k in test_kinds) + "  good with a mask")
    for label, rule in rules.items():
        predicted = rule(test.maps, flagged)
        overall = mask_decision_metrics(predicted, test.masks)
        per_kind = {k: mask_decision_metrics(predicted[types == k], test.masks[types == k])["pixel_f1"] for k in test_kinds}
        with_mask = float(np.mean([m.any() for m in predicted[good]])) if good.any() else float("nan")
        rows[label] = {"seed": rule.seed, "fraction": rule.fraction, "left_out_kind_f1": left_out[label], **overall,
                       "per_kind_f1": per_kind, "good_with_mask": with_mask}
        print(f"{label:<40} {rule.seed:>7.4f} {rule.fraction:>5.2f} {left_out[label]:>16.3f} {overall['pixel_f1']:>8.3f} "
              f"{overall['pixel_precision']:>6.3f} {overall['pixel_recall']:>6.3f} "
              + " ".join(f"{per_kind[k]:>9.3f}" for k in test_kinds) + f"  {with_mask:.2f}")
    best = best_pixel_f1(test.maps, test.masks)
    print(f"{'best single threshold (test labels)':<40} {best['threshold']:>7.4f} {'':>5} {'':>16} {best['pixel_f1']:>8.3f}")
    return {"category": category, "checkpoint": str(checkpoint), "floor": floor, "rules": rows, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("CHECKPOINT", "DATA", "CATEGORY"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [run(Path(c), Path(d), k) for c, d, k in args.run]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
