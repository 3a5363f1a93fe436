"""A flagged image always has a mask and a region, in eval, predict and the Detector (NOTE [a flagged image has a mask]).

The case that used to contradict itself: the image threshold flags an image whose map peak is below the
mask rule's seed (a defect unlike the ones the rule was set on), so the image was reported defective
with an empty mask and no region.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyramidflow import Detector
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.inference.evaluate import evaluate
from pyramidflow.inference.maps import load_for_inference, predict_dataset
from pyramidflow.inference.predict import predict
from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train import TrainConfig, train

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data"), seed=7, size=SIZE, categories=("nut",), num_train=6, num_test=1)
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3)
    run = train(config, TrainConfig(steps=2, device="cpu"), MVTecDataset(root, "nut", split="train", size=SIZE),
                tmp_path_factory.mktemp("run"), progress=False)
    return run.checkpoint_path, root


def _with_thresholds(trained, tmp_path, floor_too: bool):
    """The checkpoint with a seed above every test map's peak (and the floor too when ``floor_too``), and an image
    threshold at the median test score: half the test images are flagged, none of their peaks reaches the seed."""
    checkpoint, root = trained
    inference = load_for_inference(checkpoint, torch.device("cpu"))
    test = predict_dataset(inference.model, inference.template, MVTecDataset(root, "nut", split="test", size=SIZE),
                           device=torch.device("cpu"), progress=False)
    state = torch.load(checkpoint, weights_only=True)
    calibration = state["calibration"]
    assert calibration["pixel_rule"] == "synthetic"
    above = 2.0 * float(test.maps.max())
    calibration.update(image_threshold=float(np.median(test.scores)), pixel_threshold=above, pixel_peak_fraction=0.5)
    if floor_too:
        calibration["pixel_fpr_threshold"] = above
    path = tmp_path / "contradicting.pt"
    torch.save(state, path)
    return path, root, test


@pytest.mark.parametrize("floor_too", [False, True], ids=["seed above every peak", "floor above every peak"])
def test_no_flagged_image_has_an_empty_mask_in_eval_predict_or_the_detector(trained, tmp_path, floor_too):
    checkpoint, root, test = _with_thresholds(trained, tmp_path, floor_too)
    inference = load_for_inference(checkpoint, torch.device("cpu"))
    images = sorted((root / "nut" / "test").rglob("*.png"))

    detector = Detector(inference)
    decided = detector(images)
    flagged = [p for p in decided if p.is_anomalous]
    assert 0 < len(flagged) < len(decided)
    for p in flagged:
        assert p.mask.any() and p.regions, f"{p.path}: flagged with an empty mask"
        assert p.mask[np.unravel_index(np.argmax(p.anomaly_map), p.anomaly_map.shape)]  # the peak is in the mask
    assert not any(p.mask.any() for p in decided if not p.is_anomalous)  # nothing reaches the seed otherwise

    tiled_detector = Detector(inference, tile=True)
    tiled_detector.threshold = 0.0
    for p in tiled_detector([np.asarray(Image.open(path).convert("RGB").resize((2 * SIZE, 2 * SIZE))) for path in images]):
        assert p.is_anomalous and p.mask.any() and p.regions

    plain = Detector(inference)
    plain.pixel_threshold = 1e6  # a threshold one sets above every map: still a region for a flagged image
    for p in plain(images):
        assert p.mask.any() == p.is_anomalous and bool(p.regions) == p.is_anomalous

    rows = predict(inference, images, tmp_path / "predict", progress=False)
    assert sum(row["is_anomalous"] for row in rows) == len(flagged)
    for row in rows:
        mask = np.asarray(Image.open(tmp_path / "predict" / row["mask"])) > 0
        assert mask.any() == row["is_anomalous"] and bool(row["regions"]) == row["is_anomalous"], row["path"]
    written = json.loads((tmp_path / "predict" / "predictions.json").read_text())["images"]
    assert all(row["regions"] for row in written if row["is_anomalous"])

    report = evaluate(inference, MVTecDataset(root, "nut", split="test", size=SIZE), tmp_path / "eval", progress=False)
    assert report["image_recall"] + report["image_fpr"] > 0  # some images are flagged
    assert report["flagged_images_with_empty_mask"] == 0
