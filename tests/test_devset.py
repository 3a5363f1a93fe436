"""benchmarks/devset_data.py: the development set's generator (masks, seeds, the MVTec layout)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyramidflow.data import MVTecDataset

pytest.importorskip("skimage")  # the dev extra: the set's photographs ship inside scikit-image


def _benchmark_module(name: str):
    """A module of benchmarks/, imported from its folder as the scripts beside it import it."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@pytest.fixture(scope="module")
def devset():
    """benchmarks/devset_data.py: the set's generator."""
    return _benchmark_module("devset_data")


@pytest.mark.parametrize("kind", ["scratch", "patch", "stain"])
def test_a_drawn_defect_changes_exactly_its_mask(devset, kind):
    foreign = [devset._skimage_image("chelsea")]
    for texture in devset.TEXTURES:
        source = devset._skimage_image(texture)
        for i in range(6):
            rng = np.random.default_rng([i, 3])
            image = devset._crop(rng, source, 96, (0, source.shape[0]))
            drawn, mask = devset.draw(rng, kind, image, foreign)
            changed = (drawn != image).any(axis=-1)
            assert mask.any() and drawn.dtype == np.uint8 and drawn.shape == image.shape
            assert not (changed & ~mask).any(), f"{texture}/{kind}: pixels outside the mask changed"
            assert changed[mask].mean() >= 0.8, f"{texture}/{kind}: {changed[mask].mean():.2f} of the mask changed"


def test_the_set_is_deterministic_in_its_seed_and_readable_by_the_mvtec_loader(devset, tmp_path):
    args = dict(textures=("moon",), crop=64, num_train=3, num_test=2)
    first = devset.build(tmp_path / "a", seed=1, **args)
    again = devset.build(tmp_path / "b", seed=1, **args)
    other = devset.build(tmp_path / "c", seed=2, **args)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == 3 + 2 * 4 + 2 * 3  # train, test (good and three kinds), masks
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files)

    test = MVTecDataset(first, "moon", split="test", size=64)
    kinds = {}
    for item in test:
        kinds[item["defect_type"]] = kinds.get(item["defect_type"], 0) + 1
        assert item["label"] == int(item["defect_type"] != "good")
        if item["label"]:
            name = Path(item["path"]).stem
            written = np.asarray(Image.open(first / "moon" / "ground_truth" / item["defect_type"] / f"{name}_mask.png")) > 0
            np.testing.assert_array_equal(item["mask"][0].numpy() > 0.5, written)
        else:
            assert not item["mask"].any()
    assert kinds == {"good": 2, "scratch": 2, "patch": 2, "stain": 2}
    assert len(MVTecDataset(first, "moon", split="train", size=64)) == 3


def test_the_rows_split_keeps_training_and_test_crops_in_disjoint_rows(devset):
    source = devset._skimage_image("ihc")
    train, test = devset._band(source, "train", 128), devset._band(source, "test", 128)
    assert train[1] <= test[0] and train[0] == 0 and test[1] == source.shape[0]
    with pytest.raises(ValueError, match="does not fit the test band"):
        devset._band(source, "test", 400)
    assert not {"brick", "grass", "gravel"} & set(devset.TEXTURES + devset._FOREIGN)  # kept for an independent check


@pytest.fixture(scope="module")
def split_script():
    """benchmarks/devset_split.py: the baseline's view of a split."""
    return _benchmark_module("devset_split")


@pytest.mark.parametrize("texture", ["ihc", "moon", "hubble"])
@pytest.mark.parametrize("side", [64, 128, 256])
def test_block_split_crops_never_overlap_and_sample_the_whole_photograph(devset, texture, side):
    source = devset._skimage_image(texture)
    height, width = source.shape[:2]
    # A "photograph" whose pixels are their own coordinates, to see where each crop came from.
    where = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), axis=-1)
    covered = {}
    for split in ("train", "test"):
        parts = devset.regions(source, split, side, "blocks")
        seen = np.zeros((height, width), dtype=bool)
        for i in range(60):
            crop = devset._crop_in(np.random.default_rng([i, 5]), where, side, parts)
            assert crop.shape[:2] == (side, side)
            top, left = crop[0, 0]
            assert any(t <= top and top + side <= b and l <= left and left + side <= r for t, b, l, r in parts)
            seen[top:top + side, left:left + side] = True
        covered[split] = seen
        assert seen[: height // 2].any() and seen[height // 2:].any(), f"{split}: crops from one half of the rows only"
        assert seen[:, : width // 2].any() and seen[:, width // 2:].any(), f"{split}: crops from one half of the columns"
    assert not (covered["train"] & covered["test"]).any(), "a test crop overlaps a training crop"


def test_the_split_by_rows_keeps_its_band_and_a_too_large_crop_is_refused(devset):
    source = devset._skimage_image("ihc")
    for split in ("train", "test"):
        rows = devset._band(source, split, 128)
        assert devset.regions(source, split, 128, "rows") == [(rows[0], rows[1], 0, source.shape[1])]
    with pytest.raises(ValueError, match="fewer than 2x2 blocks"):
        devset.regions(source, "train", 300, "blocks")
    with pytest.raises(ValueError, match="split must be one of"):
        devset.regions(source, "train", 128, "columns")


def test_the_block_split_gives_good_test_crops_from_the_training_distribution(split_script, devset, tmp_path):
    """ihc's tissue changes from its upper to its lower rows: by rows, the trivial baseline tells good test
    crops from training crops; by blocks, it cannot (benchmarks/README.md, "A fair split")."""
    shift = {}
    for split in devset.SPLITS:
        root = devset.build(tmp_path / split, textures=("ihc",), num_train=40, num_test=40, split=split)
        train, test = (split_script._read(root / "ihc" / part / "good") for part in ("train", "test"))
        shift[split] = split_script.shift(*split_script.baseline_scores(train, test)["mean"])
    assert shift["rows"][0] > 0.8 and shift["rows"][1] > 0.3, shift
    assert 0.3 < shift["blocks"][0] < 0.7 and shift["blocks"][1] < 0.1, shift


def test_kind_subsets_pair_each_kind_with_the_good_images(devset):
    types = ["good", "stain", "scratch", "good", "patch", "stain"]
    assert [(name, mask.tolist()) for name, mask in devset.kind_subsets(types)] == [
        ("all", [True] * 6),
        ("patch", [True, False, False, True, True, False]),
        ("scratch", [True, False, True, True, False, False]),
        ("stain", [True, True, False, True, False, True]),
    ]
    assert [name for name, _ in devset.kind_subsets(types, devset.DEFECT_KINDS)] == ["all", *devset.DEFECT_KINDS]
