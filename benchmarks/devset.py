"""Build the development set of real textures (benchmarks/devset_data.py), train on it, and score the models.

    python benchmarks/devset.py --out DIR [--textures ihc moon] [--split blocks] [--size 128] [--steps 300] [--threads 1] [--model FLAGS...]

Writes ``DIR/data`` (the set), trains each texture with ``pyramidflow train`` at the CLI's defaults for a
category of one's own (``DIR/<texture>/checkpoint.pt``; an existing finished checkpoint is reused) and
prints, per texture and per defect kind: pixel AUROC, AUPRO, image AUROC, image recall at the calibrated
threshold, the calibrated mask's pixel F1 and recall, the best single-threshold F1 (reads the test
masks: a diagnosis), and the pixel AUROC of the trivial baseline ``|x - mean of the training crops|``;
per texture, the AUROC of telling good test crops from training crops by the model's image score
(0.5: it cannot; ``benchmarks/devset_split.py`` gives the baseline's). ``--split`` picks the set's split
(:data:`devset_data.SPLITS`). Every figure comes from :mod:`pyramidflow.metrics`; the masks from the checkpoint's own rule.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import devset_data  # noqa: E402

from pyramidflow.calibration import stored_mask_rule, stored_thresholds  # noqa: E402
from pyramidflow.checkpoint import load_checkpoint  # noqa: E402
from pyramidflow.data import MVTecDataset  # noqa: E402
from pyramidflow.inference.maps import load_for_inference, predict_dataset  # noqa: E402
from pyramidflow.metrics import (best_pixel_f1, compute_metrics, image_auroc,  # noqa: E402
                                 image_decision_metrics, mask_decision_metrics, pixel_auroc)


def train(data: Path, texture: str, out: Path, size: int, steps: int, threads: int, model: list[str]) -> Path:
    """``pyramidflow train`` at the CLI's defaults and ``model``'s flags (a finished checkpoint already there is reused)."""
    checkpoint = out / texture / "checkpoint.pt"
    if checkpoint.exists() and load_checkpoint(checkpoint).finished:
        return checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pyramidflow.cli", "train", "--data", str(data), "--category", texture,
                    "--out", str(out / texture), "--size", str(size), "--steps", str(steps), "--device", "cpu", *model],
                   check=True, env=env)
    print(f"{texture}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return checkpoint


def baseline_maps(data: Path, texture: str, size: int, images: np.ndarray) -> np.ndarray:
    """The trivial baseline: ``|x - mean training crop|``, averaged over the colour channels."""
    train_set = MVTecDataset(data, texture, split="train", size=size, augment=False)
    from pyramidflow.data import denormalize

    mean = np.mean([denormalize(item["image"][None])[0].astype(np.float64) for item in train_set], axis=0)
    return np.abs(images.astype(np.float64) - mean).mean(axis=-1)


def figures(maps, masks, scores, labels, predicted, image_threshold) -> dict:
    """The figures of one group of test images (good ones included, for the AUROCs)."""
    row = {**compute_metrics(maps, masks, scores, labels), **mask_decision_metrics(predicted, masks),
           "best_f1": best_pixel_f1(maps, masks)["pixel_f1"],
           "image_recall": image_decision_metrics(scores, labels, image_threshold)["image_recall"]}
    return row


def score(checkpoint: Path, data: Path, texture: str) -> dict:
    device = torch.device("cpu")
    inference = load_for_inference(checkpoint, device)
    size = inference.image_size
    test = predict_dataset(inference.model, inference.template, MVTecDataset(data, texture, split="test", size=size),
                           device=device, progress=False)
    image_threshold = stored_thresholds(inference.checkpoint)[0]
    rule = stored_mask_rule(inference.checkpoint)
    flagged = test.scores.astype(np.float64) > image_threshold
    predicted = rule(test.maps, flagged)
    uncapped = rule(test.maps)  # without NOTE [a flagged image has a mask]: what the cap changed
    baseline = baseline_maps(data, texture, size[0], test.images)
    train_scores = predict_dataset(inference.model, inference.template, MVTecDataset(data, texture, split="train", size=size),
                                   device=device, progress=False).scores
    good = test.scores[test.labels == 0]
    result = {"texture": texture, "rule": {"seed": rule.seed, "low": rule.low, "fraction": rule.fraction},
              "image_threshold": image_threshold,
              "flagged_with_empty_mask": int(sum(not m.any() for m in predicted[flagged])),
              "flagged": int(flagged.sum()),
              "flagged_empty_without_the_cap": int(sum(not m.any() for m in uncapped[flagged])),
              # Good test crops against the training crops, by the model's image score: 0.5 when it cannot tell them apart.
              "good_vs_train_auroc": image_auroc(np.r_[train_scores, good], np.r_[np.zeros(len(train_scores)), np.ones(len(good))]),
              "all": {**figures(test.maps, test.masks, test.scores, test.labels, predicted, image_threshold),
                      "image_fpr": float(flagged[test.labels == 0].mean()),
                      "baseline_pixel_auroc": pixel_auroc(baseline, test.masks)}}
    for kind, chosen in devset_data.kind_subsets(test.defect_types, devset_data.DEFECT_KINDS)[1:]:  # "all" is above, with more
        result[kind] = {**figures(test.maps[chosen], test.masks[chosen], test.scores[chosen], test.labels[chosen],
                                  predicted[chosen], image_threshold),
                        "baseline_pixel_auroc": pixel_auroc(baseline[chosen], test.masks[chosen])}
    return result


def print_table(results: list[dict]) -> None:
    print("| texture | kind | pixel AUROC | AUPRO | image AUROC | image recall | mask F1 / best single-threshold F1 "
          "| mask recall | baseline pixel AUROC |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        for kind in ("all",) + devset_data.DEFECT_KINDS:
            r = result[kind]
            print(f"| {result['texture']} | {kind} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['image_auroc']:.3f} "
                  f"| {r['image_recall']:.2f} | {r['pixel_f1']:.3f} / {r['best_f1']:.3f} | {r['pixel_recall']:.3f} "
                  f"| {r['baseline_pixel_auroc']:.3f} |")
    for result in results:
        print(f"{result['texture']}: rule {result['rule']}, image threshold {result['image_threshold']:.4g}, image FPR "
              f"{result['all']['image_fpr']:.2f}, flagged images with an empty mask: {result['flagged_with_empty_mask']} "
              f"of {result['flagged']} ({result['flagged_empty_without_the_cap']} without the cap at the map's peak), good test "
              f"crops against training crops by image score: AUROC {result['good_vs_train_auroc']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--textures", nargs="+", default=list(devset_data.TEXTURES), choices=devset_data.TEXTURES)
    parser.add_argument("--size", type=int, default=128, help="training and test resolution (128)")
    parser.add_argument("--crop", type=int, default=128, help="crop side in the source's pixels (128)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of training and scoring (1)")
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=8)
    parser.add_argument("--split", default="blocks", choices=devset_data.SPLITS,
                        help="how training and test crops share each photograph (blocks; rows: the tables before "
                             "2026-12-06's split section)")
    parser.add_argument("--model", nargs=argparse.REMAINDER, default=[],
                        help="the rest is passed to `pyramidflow train`, e.g. --model --channels 8 --kernel-size 5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = devset_data.build(args.out / "data", textures=args.textures, crop=args.crop, num_train=args.num_train,
                             num_test=args.num_test, split=args.split)
    results = []
    for texture in args.textures:
        checkpoint = train(data, texture, args.out, args.size, args.steps, args.threads, args.model)
        results.append(score(checkpoint, data, texture))
    print_table(results)
    (args.out / "devset.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
