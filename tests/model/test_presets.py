"""The per-category defaults table of docs/categories.md says what the code does, for all 15 MVTec AD and 3 BTAD
classes and for a category of one's own, declared a texture (``--texture``) or not."""

import inspect
import shutil
from pathlib import Path

import pytest

from pyramidflow.checkpoint import load_checkpoint
from pyramidflow.cli import main
from pyramidflow.data import BTADDataset, is_texture_category, synthetic
from pyramidflow.data.btad import BTAD_CATEGORIES
from pyramidflow.data.mvtec import MVTEC_CATEGORIES
from pyramidflow.model import PyramidFlowConfig

CATEGORIES = Path(__file__).resolve().parents[2] / "docs" / "categories.md"
OWN = "my_part"  # a name no table knows
OWN_ROWS = {  # row -> (flags of `train`, the library's settings for it)
    "any other name": ([], lambda: PyramidFlowConfig.for_category(OWN)),
    "any other name, `--texture`": (["--texture"], PyramidFlowConfig.for_texture),
}


def _rows():
    text = CATEGORIES.read_text()
    start = text.index("<!-- presets:")
    table = text[start:text.index("<!-- end presets -->")]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def _augmentation(augment: bool) -> str:
    return "flips + rot90" if augment else "none"


def test_presets_table_matches_the_code():
    rows = _rows()
    assert [(r[0], r[1]) for r in rows] == ([("MVTec AD", c) for c in MVTEC_CATEGORIES] + [("BTAD", c) for c in BTAD_CATEGORIES]
                                            + [("your own", name) for name in OWN_ROWS])
    btad_texture = inspect.signature(BTADDataset).parameters["texture"].default
    for data_set, category, volume_norm, levels, augmentation, encoder in rows:
        config = OWN_ROWS[category][1]() if data_set == "your own" else PyramidFlowConfig.for_category(category)
        assert (config.volume_norm, config.num_levels) == (volume_norm, int(levels)), category
        assert encoder == getattr(config, "encoder", "none"), category
        if data_set != "your own":  # those go through `train`, below
            texture = is_texture_category(category) if data_set == "MVTec AD" else bool(btad_texture)
            assert augmentation == _augmentation(texture), category


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data"), seed=3, size=32, categories=("nut",), num_train=6, num_test=1)
    shutil.move(root / "nut", root / OWN)
    return root


@pytest.mark.parametrize("row", list(OWN_ROWS))
def test_a_category_of_ones_own_trains_as_the_table_says(own_data, tmp_path, row):
    [(_, _, volume_norm, levels, augmentation, _)] = [r for r in _rows() if r[:2] == ["your own", row]]
    out = tmp_path / "run"
    assert main(["train", "--data", str(own_data), "--category", OWN, "--out", str(out), "--size", "32", "--steps", "1",
                 "--channels", "4", "--kernel-size", "3", "--stacks", "1", "--device", "cpu", *OWN_ROWS[row][0]]) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert _augmentation(checkpoint.train_config["augment"]) == augmentation
    assert (checkpoint.model_config["volume_norm"], checkpoint.model_config["num_levels"]) == (volume_norm, int(levels))


def test_augment_adds_flips_and_rotations_to_the_texture_recipe(own_data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(own_data), "--category", OWN, "--out", str(out), "--size", "32", "--steps", "1",
                 "--channels", "4", "--kernel-size", "3", "--stacks", "1", "--device", "cpu", "--texture", "--augment"]) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint.train_config["augment"] is True
    assert checkpoint.model_config["num_levels"] == PyramidFlowConfig.for_texture().num_levels


def test_the_texture_recipe_differs_from_the_defaults_and_leaves_the_authors_categories_alone(own_data, tmp_path):
    """``--texture`` on a category of the table keeps that category's row."""
    assert PyramidFlowConfig.for_texture() != PyramidFlowConfig()
    assert PyramidFlowConfig.for_texture(num_levels=5).num_levels == 5
    shutil.copytree(own_data / OWN, own_data / "carpet")
    out = tmp_path / "carpet"
    assert main(["train", "--data", str(own_data), "--category", "carpet", "--out", str(out), "--size", "128",
                 "--steps", "1", "--channels", "4", "--kernel-size", "3", "--stacks", "1", "--device", "cpu",
                 "--texture"]) == 0
    carpet = PyramidFlowConfig.for_category("carpet")
    model_config = load_checkpoint(out / "checkpoint.pt").model_config
    assert (model_config["volume_norm"], model_config["num_levels"]) == (carpet.volume_norm, carpet.num_levels)
