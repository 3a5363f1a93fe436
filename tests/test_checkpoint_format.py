"""Checkpoints written before the package layout changed still load and give the same maps.

``fixtures/checkpoint-v1.ckpt`` is a finished tiny run (32 px, ``difference="composed"``) written by
``pyramidflow.train.train`` at commit c603be9; ``fixtures/checkpoint-v1-maps.npz`` holds one probe image
and the anomaly map that commit's ``eval`` code gave it.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pyramidflow import Detector
from pyramidflow.checkpoint import CHECKPOINT_FORMAT_VERSION, load_checkpoint
from pyramidflow.inference.maps import anomaly_maps, load_for_inference

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT = FIXTURES / "checkpoint-v1.ckpt"


def test_a_checkpoint_of_the_previous_layout_loads():
    checkpoint = load_checkpoint(CHECKPOINT)
    assert checkpoint.finished and checkpoint.step == 2
    assert checkpoint.format_version == CHECKPOINT_FORMAT_VERSION
    assert checkpoint.model_config["difference"] == "composed"


def test_a_checkpoint_of_the_previous_layout_gives_the_same_maps():
    saved = np.load(FIXTURES / "checkpoint-v1-maps.npz")
    inference = load_for_inference(CHECKPOINT, torch.device("cpu"))
    maps = anomaly_maps(inference.model, inference.template, torch.from_numpy(saved["images"]))
    assert maps.shape == saved["maps"].shape == (1, 32, 32)
    np.testing.assert_allclose(maps, saved["maps"], rtol=0, atol=1e-5)
    detector = Detector.load(CHECKPOINT, device="cpu")
    assert detector.image_size == (32, 32)


def test_a_checkpoint_without_backward_tile_loads_with_any_tile():
    """The field is newer than the file: it builds untiled, and a run may resume it tiled (execution-only, like mode)."""
    from pyramidflow.model import PyramidFlowConfig

    saved = load_checkpoint(CHECKPOINT).model_config
    assert "backward_tile" not in saved
    assert load_checkpoint(CHECKPOINT).build_model().config.backward_tile is None
    for tile in (None, 2):
        assert load_checkpoint(CHECKPOINT, PyramidFlowConfig(**saved, backward_tile=tile)).step == 2


# -- files that are not checkpoints: one line naming the file and what is wrong ----------------------------


class _RunsCode:
    """A pickle payload: unpickling it would call os.getcwd (harmless here, but code all the same)."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def _not_checkpoints(folder: Path) -> dict:
    import os
    import pickle

    files = {"payload.pt": None, "raw-pickle.pt": None, "random.pt": None, "empty.pt": None, "cut.pt": None}
    torch.save({"model": _RunsCode()}, folder / "payload.pt")
    (folder / "raw-pickle.pt").write_bytes(pickle.dumps(_RunsCode(), protocol=4))
    (folder / "random.pt").write_bytes(os.urandom(4096))
    (folder / "empty.pt").write_bytes(b"")
    (folder / "cut.pt").write_bytes(CHECKPOINT.read_bytes()[:3000])
    return {name: folder / name for name in files}


@pytest.mark.parametrize("name, what", [
    ("payload.pt", "was not opened: it holds a Python object \\(\\w+.getcwd\\) that loading would have to run code"),
    ("raw-pickle.pt", "a Python pickle, not a torch.save file"),
    ("random.pt", "not a torch.save file"),
    ("empty.pt", "the file is empty"),
    ("cut.pt", "damaged: cut short"),
])
def test_a_file_that_is_no_checkpoint_is_one_line_naming_it_and_what_is_wrong(tmp_path, name, what):
    from pyramidflow.checkpoint import CheckpointError

    path = _not_checkpoints(tmp_path)[name]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert re.search(what, message) and str(path) in message
    assert "\n" not in message and len(message) < 300
    for torch_advice in ("weights_only", "file an issue", "PyTorch"):
        assert torch_advice not in message
