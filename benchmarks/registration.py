"""Registration on parts that move: the demo's test images moved at random, evaluated with and without it.

The synthetic set places every part exactly (up to a third of a pixel); this script moves each test image
and its mask by one random rigid transform (shift up to ±6% of the side in x and y, rotation up to ±8°,
uniform; bicubic for images as a camera sees a moved part sharp, nearest for masks; the background
replicated at the border) and runs ``evaluate`` four times on the same
checkpoint: the aligned test set and the moved one, each without and with ``register=True``.

    OMP_NUM_THREADS=1 python benchmarks/registration.py --out /tmp/reg [--category nut] [--run DIR]

Without ``--run`` it trains the demo's model (``pyramidflow demo``'s settings: 128 px, 200 steps) on
``--category`` first; with it, ``DIR/checkpoint.pt`` and ``DIR/../data`` (the demo's layout) are used.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.experiments.demo import DEMO_SIZE, DEMO_STEPS, demo_overrides
from pyramidflow.inference.evaluate import evaluate
from pyramidflow.inference.maps import load_for_inference
from pyramidflow.inference.registration import ensure_reference, estimate_rigid
from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train import TrainConfig, train

MAX_SHIFT = 0.06  # of the side
MAX_DEGREES = 8.0
_KEYS = ("pixel_auroc", "aupro", "image_auroc", "pixel_f1", "best_pixel_f1_using_test_labels", "image_recall",
         "image_fpr")


def _move(array: np.ndarray, degrees: float, shift: tuple, order: int) -> np.ndarray:
    """``array`` ``(H, W[, C])`` rotated about its centre by ``degrees`` (clockwise on screen), then moved by
    ``shift`` ``(x, y)`` pixels; the border is replicated."""
    height, width = array.shape[:2]
    a = math.radians(degrees)
    inverse = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])  # R^T in (row, col)
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    offset = centre - inverse @ (centre + np.array([shift[1], shift[0]]))
    channels = [array] if array.ndim == 2 else [array[..., c] for c in range(array.shape[2])]
    moved = [ndimage.affine_transform(c.astype(np.float64), inverse, offset=offset, order=order, mode="nearest")
             for c in channels]
    out = moved[0] if array.ndim == 2 else np.stack(moved, -1)
    return np.clip(np.round(out), 0, 255).astype(array.dtype)


def moved_test_set(root: Path, category: str, out_root: Path, seed: int) -> dict:
    """A copy of ``root/category`` whose test images and masks are moved (one transform per image and its mask).

    Returns:
        ``{"<kind>/<stem>": (degrees, (x, y))}``: the move of each test image, the shift as fractions of the side.
    """
    rng = np.random.default_rng(seed)
    moves = {}
    source, target = root / category, out_root / category
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source / "train", target / "train")
    for image_path in sorted((source / "test").rglob("*.png")):
        kind, stem = image_path.parent.name, image_path.stem
        image = np.array(Image.open(image_path).convert("RGB"))
        side = image.shape[0]
        degrees = rng.uniform(-MAX_DEGREES, MAX_DEGREES)
        fraction = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2)
        shift = tuple(fraction * side)
        moves[f"{kind}/{stem}"] = (degrees, fraction)
        (target / "test" / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_move(image, degrees, shift, order=3)).save(target / "test" / kind / f"{stem}.png")
        mask_path = source / "ground_truth" / kind / f"{stem}_mask.png"
        if mask_path.exists():
            mask = np.array(Image.open(mask_path).convert("L"))
            (target / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            moved = _move(mask, degrees, shift, order=0)
            Image.fromarray(np.where(moved > 127, 255, 0).astype(np.uint8)).save(
                target / "ground_truth" / kind / f"{stem}_mask.png")
    return moves


def accuracy(test_set: MVTecDataset, moves: dict, reference: torch.Tensor) -> dict:
    """Mean and largest error of the estimated rotation (degrees) and shift (pixels) against the known moves."""
    items = [test_set[i] for i in range(len(test_set))]
    angle, shift = estimate_rigid(torch.stack([item["image"] for item in items]), reference)
    truth = [moves[f"{Path(item['path']).parent.name}/{Path(item['path']).stem}"] for item in items]
    angle_error = np.abs(np.degrees(angle.numpy()) - np.array([degrees for degrees, _ in truth]))
    height, width = test_set.size
    shift_error = np.abs(shift.numpy() - np.array([moved for _, moved in truth]) * np.array([width, height]))
    return {"angle_error_degrees": [round(float(angle_error.mean()), 3), round(float(angle_error.max()), 3)],
            "shift_error_pixels": [round(float(shift_error.mean()), 3), round(float(shift_error.max()), 3)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--category", default="nut")
    parser.add_argument("--run", type=Path, help="a finished demo run folder (holds checkpoint.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moves")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.run is None:
        data = synthetic.generate(args.out / "data", size=DEMO_SIZE, categories=(args.category,))
        config = PyramidFlowConfig.for_category(args.category, **demo_overrides(args.category))
        train_set = MVTecDataset(data, args.category, split="train", size=DEMO_SIZE)
        settings = TrainConfig(steps=DEMO_STEPS, seed=0, checkpoint_every=DEMO_STEPS, device="cpu",
                               augment=bool(train_set.augment))
        run = train(config, settings, train_set, args.out / args.category).checkpoint_path.parent
    else:
        run, data = args.run, args.run.parent / "data"
    trained_s = time.perf_counter() - start
    moved = args.out / "moved"
    moves = moved_test_set(data, args.category, moved, args.seed)
    inference = load_for_inference(run / "checkpoint.pt", "cpu")
    size = inference.image_size
    reference = ensure_reference(inference.checkpoint,
                                 MVTecDataset(data, args.category, split="train", size=size, augment=False))
    rows = {}
    for name, root, register in (("aligned", data, False), ("aligned, registered", data, True), ("moved", moved, False),
                                 ("moved, registered", moved, True)):
        test_set = MVTecDataset(root, args.category, split="test", size=size)
        report = evaluate(inference, test_set, args.out / "eval" / name.replace(", ", "_"), category=args.category,
                          progress=False, report=False, register=register)
        rows[name] = {key: report[key] for key in _KEYS}
    summary = {"category": args.category, "size": size, "max_shift": MAX_SHIFT, "max_degrees": MAX_DEGREES,
               "seed": args.seed, "train_seconds": round(trained_s, 1),
               "eval_seconds": round(time.perf_counter() - start - trained_s, 1), "results": rows,
               **accuracy(MVTecDataset(moved, args.category, split="test", size=size), moves, reference)}
    (args.out / "registration.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'test set':<20}" + "".join(f"{k[:14]:>16}" for k in _KEYS))
    for name, row in rows.items():
        print(f"{name:<20}" + "".join(f"{'n/a' if v is None else f'{v:.4f}':>16}" for v in row.values()))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))  # settings, seconds, accuracy


if __name__ == "__main__":
    main()
