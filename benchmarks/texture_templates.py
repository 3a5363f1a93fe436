"""Score finished development-set checkpoints with each latent template and map smoothing, without training again.

    python benchmarks/texture_templates.py --run CHECKPOINT DATA TEXTURE [--run ...] [--smooth 0 2 4] [--threads 1]

The template is computed after training, so the same weights can be scored with the mean latent
pyramid (the method), the zero template (the paper's ablation) and the constant template (the mean's
spatial mean per level and channel, :func:`pyramidflow.model.anomaly_map.constant_template`). Prints,
per texture, template and defect kind of the development set (benchmarks/devset_data.py): pixel
AUROC, AUPRO and image AUROC, for each Gaussian smoothing of the maps (``--smooth``, pixels; what
``eval --smooth`` does). The thresholds stored in a checkpoint belong to its own template and maps, so
no mask figure is given here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import devset_data  # noqa: E402

from pyramidflow.data import MVTecDataset  # noqa: E402
from pyramidflow.inference.maps import load_for_inference, predict_dataset, smooth  # noqa: E402
from pyramidflow.metrics import compute_metrics  # noqa: E402
from pyramidflow.model.anomaly_map import constant_template, image_score  # noqa: E402


def templates(inference) -> dict:
    """Each template kind from the checkpoint's stored mean template (``zero`` and ``constant`` derive from it)."""
    stored = inference.checkpoint.model_config.get("template", "mean")
    if stored != "mean":
        raise ValueError(f"texture_templates: {inference.checkpoint.path} was trained with template={stored!r}; "
                         "give a checkpoint with the mean template, from which the others derive.")
    mean = inference.template
    return {"mean": mean, "zero": tuple(torch.zeros_like(t) for t in mean), "constant": constant_template(mean)}


def score(checkpoint: Path, data: Path, texture: str, sigmas: list[float]) -> list[dict]:
    device = torch.device("cpu")
    inference = load_for_inference(checkpoint, device)
    test_set = MVTecDataset(data, texture, split="test", size=inference.image_size)
    rows = []
    for kind, template in templates(inference).items():
        test = predict_dataset(inference.model, template, test_set, device=device, progress=False)
        for sigma in sigmas:
            maps = smooth(test.maps, sigma)
            scores = image_score(torch.from_numpy(maps)[:, None]).numpy()  # of the smoothed maps, as eval takes it
            for defect, chosen in devset_data.kind_subsets(test.defect_types, devset_data.DEFECT_KINDS):
                figures = compute_metrics(maps[chosen], test.masks[chosen], scores[chosen], test.labels[chosen])
                rows.append({"texture": texture, "template": kind, "smooth": sigma, "kind": defect,
                             **{k: float(figures[k]) for k in ("pixel_auroc", "aupro", "image_auroc")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("CHECKPOINT", "DATA", "TEXTURE"))
    parser.add_argument("--smooth", type=float, nargs="+", default=[0.0], help="Gaussian sigmas of the maps, pixels (0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for checkpoint, data, texture in args.run for row in score(Path(checkpoint), Path(data), texture, args.smooth)]
    print("| texture | template | smooth | kind | pixel AUROC | AUPRO | image AUROC |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['texture']} | {r['template']} | {r['smooth']:g} | {r['kind']} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} "
              f"| {r['image_auroc']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
