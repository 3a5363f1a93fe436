"""Checkpoints written before the package layout changed still load and give the same maps.

``fixtures/checkpoint-v1.ckpt`` is a finished tiny run (32 px, ``difference="composed"``) written by
``pyramidflow.train.train`` at commit c603be9; ``fixtures/checkpoint-v1-maps.npz`` holds one probe image
and the anomaly map that commit's ``eval`` code gave it.
"""

from pathlib import Path

import numpy as np
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
