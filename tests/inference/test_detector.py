"""The Python API: inputs of every kind, maps at the input's resolution, thresholds, batching, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pyramidflow.inference.detector as detector_module
from pyramidflow import Detector, Prediction
from pyramidflow.calibration import stored_mask_rule
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.inference.evaluate import evaluate
from pyramidflow.inference.maps import load_for_inference, predict_dataset
from pyramidflow.inference.predict import predict
from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train import TrainConfig, train

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data"), seed=5, size=SIZE, categories=("nut",), num_train=6, num_test=1)
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3)
    run = train(config, TrainConfig(steps=2, device="cpu"), MVTecDataset(root, "nut", split="train", size=SIZE),
                tmp_path_factory.mktemp("run"), progress=False)
    return run.checkpoint_path, root


def test_every_input_kind_gives_the_same_prediction(trained):
    checkpoint, root = trained
    path = root / "nut" / "test" / "spot" / "000.png"
    pixels = np.array(Image.open(path).convert("RGB"))
    detector = Detector.load(checkpoint, device="cpu")
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    results = detector([path, str(path), Image.open(path), pixels, tensor, tensor[0]])
    assert len(results) == 6 and all(isinstance(p, Prediction) for p in results)
    for p in results[1:]:
        np.testing.assert_allclose(p.anomaly_map, results[0].anomaly_map, rtol=1e-6, atol=1e-7)
        assert p.score == pytest.approx(results[0].score, rel=1e-6)
    assert results[0].path == str(path)


def test_maps_equal_those_of_eval_at_the_trained_size(trained):
    """One way to compute maps: the detector's equal predict_dataset's (eval and the old predict)."""
    checkpoint, root = trained
    inference = load_for_inference(checkpoint, torch.device("cpu"))
    test = MVTecDataset(root, "nut", split="test", size=SIZE)
    expected = predict_dataset(inference.model, inference.template, test, device=torch.device("cpu"), progress=False)
    got = Detector(inference)([item for item in expected.paths])
    np.testing.assert_allclose(np.stack([p.anomaly_map for p in got]), expected.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([p.score for p in got], expected.scores, rtol=1e-5)


def test_map_and_mask_at_the_input_resolution_and_the_score_at_the_model_resolution(trained):
    checkpoint, _ = trained
    detector = Detector.load(checkpoint, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    [p] = detector(image)
    assert p.anomaly_map.shape == p.mask.shape == (45, 70) and p.mask.dtype == bool
    inference = detector.inference
    from pyramidflow.data.transforms import image_to_tensor
    from pyramidflow.inference.maps import anomaly_maps

    model_map = anomaly_maps(inference.model, inference.template, image_to_tensor(Image.fromarray(image), (SIZE, SIZE))[None])[0]
    assert p.score == pytest.approx(float(model_map.max()), rel=1e-6)
    np.testing.assert_array_equal(p.mask, stored_mask_rule(inference.checkpoint)(p.anomaly_map))
    assert not (p.mask & ~(p.anomaly_map > inference.checkpoint.calibration["pixel_fpr_threshold"])).any()
    assert sum(r["area"] for r in p.regions) == int(p.mask.sum())


def test_thresholds_default_to_the_calibrated_ones_and_can_be_changed(trained):
    checkpoint, root = trained
    detector = Detector.load(checkpoint, device="cpu")
    calibration = detector.inference.checkpoint.calibration
    assert detector.threshold == calibration["image_threshold"] and detector.pixel_threshold == calibration["pixel_threshold"]
    images = sorted((root / "nut" / "test").rglob("*.png"))
    scores = [p.score for p in detector(images)]
    detector.threshold = float(np.median(scores))
    flags = [p.is_anomalous for p in detector(images)]
    assert flags == [s > detector.threshold for s in scores] and any(flags) and not all(flags)
    detector.pixel_threshold = 0.0
    assert all(p.mask.all() for p in detector(images[:2]))
    with pytest.raises(ValueError, match="Detector.threshold -1.0 is outside the score range"):
        detector.threshold = -1.0


def test_batched_under_inference_mode(trained, monkeypatch):
    checkpoint, root = trained
    calls = []
    original = detector_module.anomaly_maps

    def spy(model, template, images, *reference):
        calls.append((images.shape[0], torch.is_inference_mode_enabled()))
        return original(model, template, images, *reference)

    monkeypatch.setattr(detector_module, "anomaly_maps", spy)
    images = sorted((root / "nut" / "test").rglob("*.png"))[:5]
    one_by_one = Detector.load(checkpoint, device="cpu", batch_size=1)(images)
    calls.clear()
    batched = Detector.load(checkpoint, device="cpu", batch_size=2)(images)
    assert calls == [(2, True), (2, True), (1, True)]
    for a, b in zip(one_by_one, batched):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named(trained, tmp_path):
    checkpoint, _ = trained
    detector = Detector.load(checkpoint, device="cpu")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png"):
        detector(broken)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        detector(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(TypeError, match="cannot read"):
        detector(3.5)


def test_tiled_refuses_an_image_smaller_than_the_trained_size(trained):
    checkpoint, _ = trained
    detector = Detector.load(checkpoint, device="cpu", tile=True)
    with pytest.raises(ValueError, match=r"at least the trained size 32x32.*this one is 40x20"):
        detector(np.zeros((20, 40, 3), dtype=np.uint8))
    [p] = detector(np.zeros((32, 48, 3), dtype=np.uint8))
    assert p.anomaly_map.shape == (32, 48)


def test_a_checkpoint_from_before_calibration_still_loads(trained, tmp_path):
    """No ``calibration`` key: the thresholds fall back to the training score statistics."""
    checkpoint, _ = trained
    state = torch.load(checkpoint, weights_only=True)
    del state["calibration"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    detector = Detector.load(old, device="cpu")
    assert detector.inference.checkpoint.calibration is None
    assert detector.threshold == state["score_stats"]["image_max"]
    assert detector.pixel_threshold == state["score_stats"]["pixel_quantile"]
    assert len(detector(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))) == 1


# ----------------------------------------------------------------------------------------------------
# Inputs read as the user meant: float pixels, thresholds, the device, smoothing, the bit depth.


@pytest.mark.parametrize("values, message", [
    (lambda: torch.full((3, SIZE, SIZE), 128.0), r"is a float tensor with values in \[128, 128\].*divide 0-255 pixels by 255"),
    (lambda: torch.full((3, SIZE, SIZE), -0.5), r"is a float tensor with values in \[-0.5, -0.5\]"),
    (lambda: torch.full((3, SIZE, SIZE), float("nan")), "holds NaN pixels"),
])
def test_float_pixels_outside_0_1_or_nan_are_refused(trained, values, message):
    detector = Detector.load(trained[0], device="cpu")
    with pytest.raises(ValueError, match="Detector: <tensor 0> " + message):
        detector(values()[None])


def test_integer_tensors_other_than_uint8_are_a_type_error(trained):
    detector = Detector.load(trained[0], device="cpu")
    with pytest.raises(TypeError, match=r"torch.int64 tensor; give RGB as uint8"):
        detector(torch.full((3, SIZE, SIZE), 200, dtype=torch.int64))


def test_threshold_none_is_refused_on_assignment(trained):
    detector = Detector.load(trained[0], device="cpu")
    before = detector.threshold
    with pytest.raises(TypeError, match="Detector.threshold must be a real number, got None"):
        detector.threshold = None
    with pytest.raises(TypeError, match="Detector.pixel_threshold must be a real number, got None"):
        detector.pixel_threshold = None
    assert detector.threshold == before and len(detector(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))) == 1


@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), np.int64(3)])
def test_thresholds_of_any_real_number_type_are_accepted(trained, value):
    detector = Detector.load(trained[0], device="cpu")
    detector.threshold = value
    detector.pixel_threshold = value
    assert detector.threshold == detector.pixel_threshold == float(value) and type(detector.threshold) is float
    [p] = detector(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
    assert p.is_anomalous == (p.score > float(value))


def test_load_on_cuda_without_cuda_is_one_clear_error(trained, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device='cuda' was asked for but torch sees no CUDA device"):
        Detector.load(trained[0], device="cuda")


@pytest.mark.parametrize("sigma", [1e9, -1.0, float("nan"), float("inf")])
def test_smoothing_outside_0_to_the_image_side_is_refused_naming_smooth(trained, sigma):
    inference = load_for_inference(trained[0], torch.device("cpu"))
    with pytest.raises(ValueError, match=rf"smoothing_sigma \(--smooth\) must be a number of pixels from 0 \(off\) to {SIZE}"):
        Detector(inference, smoothing_sigma=sigma)


def _with_bit_depth(checkpoint, bit_depth, path):
    from pyramidflow.checkpoint import save_checkpoint_atomic

    state = torch.load(checkpoint, weights_only=True)
    if bit_depth is None:
        del state["train_config"]["bit_depth"]  # as in a checkpoint that predates the setting
    else:
        state["train_config"]["bit_depth"] = bit_depth
    return save_checkpoint_atomic(state, path)


def test_inference_reads_16_bit_files_at_the_checkpoints_bit_depth(trained, tmp_path):
    checkpoint, root = trained
    eight = np.asarray(Image.open(root / "nut" / "test" / "spot" / "000.png").convert("L"))
    twelve = tmp_path / "twelve.png"
    Image.fromarray(np.rint(eight.astype(np.float64) * 4095 / 255).astype(np.uint16)).save(twelve)
    reference = Detector.load(checkpoint, device="cpu")(eight[..., None].repeat(3, axis=2))[0]

    detector = Detector.load(_with_bit_depth(checkpoint, 12, tmp_path / "twelve.pt"), device="cpu")
    assert detector.bit_depth == 12 and detector.inference.bit_depth == 12
    np.testing.assert_allclose(detector(twelve)[0].anomaly_map, reference.anomaly_map, rtol=1e-5, atol=1e-6)
    assert Detector.load(checkpoint, device="cpu", bit_depth=12)(twelve)[0].score == pytest.approx(reference.score, rel=1e-5)

    old = Detector.load(_with_bit_depth(checkpoint, None, tmp_path / "old.pt"), device="cpu")
    assert old.bit_depth is None  # an old checkpoint: every file at its own depth
    assert old(twelve)[0].score != pytest.approx(reference.score, rel=1e-3)


def test_training_records_the_data_sets_bit_depth(tmp_path):
    from pyramidflow.checkpoint import load_checkpoint

    root = synthetic.generate(tmp_path / "data", seed=6, size=SIZE, categories=("nut",), num_train=6, num_test=1)
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3)
    data = MVTecDataset(root, "nut", split="train", size=SIZE, bit_depth=12)
    run = train(config, TrainConfig(steps=1, device="cpu", calibration_fraction=0), data, tmp_path / "run", progress=False)
    assert load_checkpoint(run.checkpoint_path).train_config["bit_depth"] == 12
    with pytest.raises(ValueError, match="TrainConfig.bit_depth=10 but the data set reads images at bit_depth=12"):
        train(config, TrainConfig(steps=1, device="cpu", bit_depth=10), data, tmp_path / "other", progress=False)


# ----------------------------------------------------------------------------------------------------
# A flagged image always has a mask and a region, in eval, predict and the Detector (NOTE [a flagged image
# has a mask]). The case that contradicted itself: the image threshold flags an image whose map peak is
# below the mask rule's seed (a defect unlike the ones the rule was set on).


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
