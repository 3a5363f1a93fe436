"""Are a split's good test crops from its training crops' distribution? The trivial baseline's view.

    python benchmarks/devset_split.py [--num 40] [--crop 128] [--block-room 0.25]

For each texture of the development set (benchmarks/devset_data.py) and each split, builds ``--num``
training crops and ``--num`` good test crops and scores every crop with the trivial baseline: its map is
``|x - mean training crop|`` averaged over the colour channels (a training crop's mean leaves the crop
out), its image score the map's maximum or its mean. Prints the AUROC of telling good test crops from
training crops by that score (0.5: the baseline cannot tell them apart; 1: every good test crop looks
more abnormal than every training crop) and the share of good test crops above the highest training
crop's score (what an image threshold set on normal images would flag). A fair split has both near 0.5
and near 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import devset_data  # noqa: E402

from pyramidflow.metrics import image_auroc  # noqa: E402


def _read(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) / 255.0 for p in sorted(folder.glob("*.png"))])


def baseline_scores(train: np.ndarray, test: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The baseline's image scores (max and mean of its map) of the training crops (each left out of
    the mean it is compared with) and of the test crops."""
    total, count = train.sum(axis=0), len(train)
    left_out = np.abs(train - (total[None] - train) / (count - 1)).mean(axis=-1)
    held = np.abs(test - total / count).mean(axis=-1)
    return {reduce.__name__: (reduce(left_out, axis=(1, 2)), reduce(held, axis=(1, 2))) for reduce in (np.max, np.mean)}


def shift(train_scores: np.ndarray, test_scores: np.ndarray) -> tuple[float, float]:
    """(AUROC of good test crops against training crops, share of good test crops above every training crop)."""
    labels = np.r_[np.zeros(len(train_scores)), np.ones(len(test_scores))]
    return image_auroc(np.r_[train_scores, test_scores], labels), float((test_scores > train_scores.max()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=40, help="training crops and good test crops per texture (40)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--block-room", type=float, default=devset_data.BLOCK_ROOM,
                        help=f"split blocks: a block's side over the crop's, less 1 ({devset_data.BLOCK_ROOM}; 1: blocks "
                             "twice the crop's side, 2x2 of ihc)")
    args = parser.parse_args()
    devset_data.BLOCK_ROOM = args.block_room
    print("| split | texture | AUROC good test vs train, max score | above every training crop | AUROC, mean score "
          "| above every training crop |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        for split in devset_data.SPLITS:
            root = devset_data.build(Path(folder) / split, crop=args.crop, num_train=args.num, num_test=args.num,
                                     split=split)
            for texture in devset_data.TEXTURES:
                train = _read(root / texture / "train" / "good")
                test = _read(root / texture / "test" / "good")
                figures = [shift(*pair) for pair in baseline_scores(train, test).values()]
                print(f"| {split} | {texture} | " + " | ".join(f"{a:.3f} | {b:.2f}" for a, b in figures) + " |")


if __name__ == "__main__":
    main()
