"""Weights of the pyramid levels in the composed map: pixel AUROC, AUPRO and best pixel F1 of finished checkpoints.

    python benchmarks/level_weights.py DEMO_OUT nut pcb

``DEMO_OUT`` holds ``data/`` and ``<category>/checkpoint.pt`` (what ``pyramidflow demo --out DEMO_OUT``
writes). The map of :func:`pyramidflow.model.anomaly_map` is the equal-weight row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pyramidflow.data import MVTecDataset
from pyramidflow.inference.maps import load_for_inference
from pyramidflow.metrics import best_pixel_f1, compute_metrics
from pyramidflow.model.pyramid import laplacian_compose


def weightings(levels: int) -> dict[str, list[float]]:
    ones = [1.0] * levels
    return {
        "equal": ones,
        "coarsest x 0.5": ones[:-1] + [0.5],
        "coarsest x 0": ones[:-1] + [0.0],
        "finest x 0.5": [0.5] + ones[1:],
        "finest x 2": [2.0] + ones[1:],
        "0.7^level": [0.7**i for i in range(levels)],
    }


def main(root: Path, categories: list[str]) -> None:
    torch.set_num_threads(1)
    for category in categories:
        inference = load_for_inference(root / category / "checkpoint.pt", torch.device("cpu"))
        test = MVTecDataset(root / "data", category, split="test", size=inference.image_size)
        per_level, masks, labels = [], [], []
        with torch.no_grad():
            for batch in DataLoader(test, batch_size=8):
                latents = inference.model(batch["image"])
                per_level.append([(z - t).abs().mean(1, keepdim=True) for z, t in zip(latents, inference.template)])
                masks.append(batch["mask"][:, 0].numpy())
                labels.append(np.asarray(batch["label"]))
        levels = [torch.cat(level) for level in zip(*per_level)]
        masks, labels = np.concatenate(masks), np.concatenate(labels)
        print(category)
        for name, weights in weightings(len(levels)).items():
            with torch.no_grad():
                maps = laplacian_compose([w * level for w, level in zip(weights, levels)])[:, 0].numpy()
            m = compute_metrics(maps, masks, maps.reshape(len(maps), -1).max(axis=1), labels)
            best = best_pixel_f1(maps, masks)["pixel_f1"]
            print(f"  {name:<16} pixel AUROC {m['pixel_auroc']:.4f}  AUPRO {m['aupro']:.4f}  "
                  f"image AUROC {m['image_auroc']:.4f}  best pixel F1 {best:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
