"""Score finished checkpoints with each latent's deviation divided by the training latents' spread.

    python benchmarks/latent_spread.py --run CHECKPOINT DATA CATEGORY [--run ...] [--floor 0 0.1 0.5] [--threads 1]

The method's map is, per level, ``|z - template|`` averaged over channels. Where the training latents
themselves spread widely (a texture's busy places, a pyramid level the flow leaves loose) normal
deviations are large; dividing each deviation by the training latents' standard deviation (a diagonal
Mahalanobis distance) puts every place and channel on the scale of its own normal variation. The
spread needs no training: it is taken, like the template, from the training images in eval mode.
Variants: ``none`` (the method), ``channel`` (one spread per level and channel, over the images and the
positions), ``position`` (one per level, channel and position, over the images). A spread below
``floor`` times its level's mean spread is raised to it (``floor`` 0: none is). Prints pixel AUROC,
AUPRO and image AUROC per category, variant and floor, for every defect kind of the test set and
"all". No mask figure: the thresholds stored in a checkpoint belong to its own maps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pyramidflow.data import MVTecDataset
from pyramidflow.inference.maps import load_for_inference
from pyramidflow.metrics import compute_metrics
from pyramidflow.model.anomaly_map import anomaly_map, image_score

VARIANTS = ("none", "channel", "position")


@torch.no_grad()
def latents_of(model, dataset, batch_size: int = 8) -> list[torch.Tensor]:
    """Every image's latent pyramid, level by level ``(N, C, H_i, W_i)`` in float64, and the images' masks."""
    levels = None
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = [z.double() for z in model(images)]
        levels = batch if levels is None else [torch.cat((a, b)) for a, b in zip(levels, batch)]
    return levels


def spreads(train: list[torch.Tensor], template, variant: str, floor: float) -> list[torch.Tensor]:
    """Per level, the training latents' standard deviation about the template, shaped to divide a latent."""
    result = []
    for z, t in zip(train, template):
        deviation = (z - t.double()) ** 2
        if variant == "none":
            spread = torch.ones_like(t, dtype=torch.float64)
        elif variant == "channel":
            spread = deviation.mean(dim=(0, 2, 3), keepdim=True).sqrt()
        elif variant == "position":
            spread = deviation.mean(dim=0, keepdim=True).sqrt()
        else:
            raise ValueError(f"latent_spread: variant must be one of {VARIANTS}, got {variant!r}.")
        result.append(spread.clamp_min(floor * float(spread.mean())))
    return result


def score(checkpoint: Path, data: Path, category: str, floors: list[float]) -> list[dict]:
    inference = load_for_inference(checkpoint, torch.device("cpu"))
    model, template, size = inference.model, inference.template, inference.image_size
    train = latents_of(model, MVTecDataset(data, category, split="train", size=size, augment=False))
    test_set = MVTecDataset(data, category, split="test", size=size)
    test = latents_of(model, test_set)
    masks = np.stack([item["mask"][0].numpy() > 0.5 for item in test_set])
    labels = np.array([item["label"] for item in test_set])
    kinds = np.array([item["defect_type"] for item in test_set])
    difference = model.config.difference
    rows = []
    for variant in VARIANTS:
        for floor in (floors if variant != "none" else [0.0]):
            s = spreads(train, template, variant, floor)
            maps = anomaly_map([z / d for z, d in zip(test, s)], [t.double() / d for t, d in zip(template, s)],
                               size, difference=difference)
            scores = image_score(maps).numpy()
            maps = maps[:, 0].numpy()
            for defect in ("all",) + tuple(sorted(set(kinds) - {"good"})):
                chosen = np.ones(len(kinds), bool) if defect == "all" else (kinds == defect) | (kinds == "good")
                figures = compute_metrics(maps[chosen], masks[chosen], scores[chosen], labels[chosen])
                rows.append({"category": category, "variant": variant, "floor": floor, "kind": defect,
                             **{k: float(figures[k]) for k in ("pixel_auroc", "aupro", "image_auroc")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("CHECKPOINT", "DATA", "CATEGORY"))
    parser.add_argument("--floor", type=float, nargs="+", default=[0.0, 0.1, 0.5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for checkpoint, data, category in args.run for row in score(Path(checkpoint), Path(data), category, args.floor)]
    print("| category | variant | floor | kind | pixel AUROC | AUPRO | image AUROC |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['category']} | {r['variant']} | {r['floor']:g} | {r['kind']} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} "
              f"| {r['image_auroc']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
