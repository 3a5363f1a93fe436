"""benchmarks/devset_data.py: the development set's generator (masks, seeds, the MVTec layout)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyramidflow.data import MVTecDataset

pytest.importorskip("skimage")  # the dev extra: the set's photographs ship inside scikit-image


@pytest.fixture(scope="module")
def devset():
    """benchmarks/devset_data.py, imported from its folder as the scripts beside it import it."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        import devset_data
    finally:
        sys.path.remove(folder)
    return devset_data


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


def test_training_and_test_crops_come_from_disjoint_rows(devset):
    source = devset._skimage_image("ihc")
    train, test = devset._band(source, "train", 128), devset._band(source, "test", 128)
    assert train[1] <= test[0] and train[0] == 0 and test[1] == source.shape[0]
    with pytest.raises(ValueError, match="does not fit the test band"):
        devset._band(source, "test", 400)
    assert not {"brick", "grass", "gravel"} & set(devset.TEXTURES + devset._FOREIGN)  # kept for an independent check
