"""The per-category defaults table of docs/categories.md says what the code does, for all 15 MVTec AD and 3 BTAD classes."""

import inspect
from pathlib import Path

from pyramidflow.data import BTADDataset, is_texture_category
from pyramidflow.data.btad import BTAD_CATEGORIES
from pyramidflow.data.mvtec import MVTEC_CATEGORIES
from pyramidflow.model import PyramidFlowConfig

CATEGORIES = Path(__file__).resolve().parents[2] / "docs" / "categories.md"


def _rows():
    text = CATEGORIES.read_text()
    start = text.index("<!-- presets:")
    table = text[start:text.index("<!-- end presets -->")]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_presets_table_matches_the_code():
    rows = _rows()
    assert [(r[0], r[1]) for r in rows] == [("MVTec AD", c) for c in MVTEC_CATEGORIES] + [("BTAD", c) for c in BTAD_CATEGORIES]
    btad_texture = inspect.signature(BTADDataset).parameters["texture"].default
    for data_set, category, volume_norm, levels, augmentation, encoder in rows:
        config = PyramidFlowConfig.for_category(category)
        assert (config.volume_norm, config.num_levels) == (volume_norm, int(levels)), category
        texture = is_texture_category(category) if data_set == "MVTec AD" else bool(btad_texture)
        assert augmentation == ("flips + rot90" if texture else "none"), category
        assert encoder == getattr(config, "encoder", "none"), category
