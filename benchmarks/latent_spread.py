"""Score finished checkpoints with each latent's deviation divided by the training latents' spread.

    python benchmarks/latent_spread.py --run CHECKPOINT DATA CATEGORY [--run ...] [--threads 1] [--json FILE]

The method's map is, per level, ``|z - template|`` averaged over channels. Where the training latents
themselves spread widely (a texture's busy places, a channel the flow leaves loose) normal deviations
are large; dividing each deviation by the training latents' standard deviation (a diagonal Mahalanobis
distance) puts every place and channel on the scale of its own normal variation. The spread needs no
training: like the template, it is taken from the training images in eval mode, so finished
checkpoints are scored without training again. Templates: ``mean`` (the method, the checkpoint's
stored template), ``scaled`` (:func:`pyramidflow.model.fit_template` ``kind="scaled"``: a spread per
level, channel and position, what ``train --template scaled`` stores) and ``channel`` (the scaled
template's spreads pooled over the positions, one per level and channel: a variant, not in the
library). Prints pixel AUROC, AUPRO and image AUROC per category, template and defect kind. No mask
figure: the thresholds stored in a checkpoint belong to its own maps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import devset_data  # noqa: E402

from pyramidflow.data import MVTecDataset  # noqa: E402
from pyramidflow.inference.maps import load_for_inference, predict_dataset  # noqa: E402
from pyramidflow.metrics import compute_metrics  # noqa: E402
from pyramidflow.model import fit_template  # noqa: E402

TEMPLATES = ("mean", "channel", "scaled")


def templates(inference, train_set) -> dict:
    """Each template: the stored mean, the library's scaled one, and its spreads pooled per channel."""
    scaled = fit_template(inference.model, DataLoader(train_set, batch_size=8), device=inference.device, kind="scaled")
    channel = tuple(torch.cat((t[:1], t[1:].square().mean(dim=(-2, -1), keepdim=True).sqrt().expand_as(t[1:])))
                    for t in scaled)
    return {"mean": inference.template, "channel": channel, "scaled": scaled}


def score(checkpoint: Path, data: Path, category: str) -> list[dict]:
    inference = load_for_inference(checkpoint, torch.device("cpu"))
    size = inference.image_size
    train_set = MVTecDataset(data, category, split="train", size=size, augment=False)
    test_set = MVTecDataset(data, category, split="test", size=size)
    rows = []
    for name, template in templates(inference, train_set).items():
        test = predict_dataset(inference.model, template, test_set, device=inference.device, progress=False)
        for defect, chosen in devset_data.kind_subsets(test.defect_types):
            figures = compute_metrics(test.maps[chosen], test.masks[chosen], test.scores[chosen], test.labels[chosen])
            rows.append({"category": category, "template": name, "kind": defect,
                         **{k: float(figures[k]) for k in ("pixel_auroc", "aupro", "image_auroc")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("CHECKPOINT", "DATA", "CATEGORY"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for checkpoint, data, category in args.run for row in score(Path(checkpoint), Path(data), category)]
    print("| category | template | kind | pixel AUROC | AUPRO | image AUROC |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['category']} | {r['template']} | {r['kind']} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} "
              f"| {r['image_auroc']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
