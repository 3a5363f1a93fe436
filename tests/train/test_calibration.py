"""Calibration on held-out good images: the seeded split, the threshold rules, and what train stores."""

import math

import numpy as np
import pytest
import torch

from pyramidflow.calibration import (
    MIN_CALIBRATION_IMAGES,
    calibration_split,
    check_threshold,
    image_threshold,
    pixel_threshold,
)
from pyramidflow.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pyramidflow.model import anomaly_map, image_score
from pyramidflow.train import TrainConfig, train

from test_train import RandomImages, model_config


def test_split_is_seeded_disjoint_and_holds_out_ten_percent_but_at_least_four():
    train_a, held_a = calibration_split(100, 0.1, seed=3)
    train_b, held_b = calibration_split(100, 0.1, seed=3)
    assert (train_a, held_a) == (train_b, held_b)
    assert len(held_a) == 10 and sorted(train_a + held_a) == list(range(100))
    assert calibration_split(100, 0.1, seed=4)[1] != held_a
    assert len(calibration_split(20, 0.1, seed=0)[1]) == MIN_CALIBRATION_IMAGES
    assert calibration_split(7, 0.0, seed=0) == (list(range(7)), [])


def test_split_refuses_a_set_too_small_to_hold_out_and_train():
    with pytest.raises(ValueError, match=r"5 good training images are too few.*--calibration-fraction 0"):
        calibration_split(5, 0.1, seed=0)
    with pytest.raises(ValueError, match="calibration_fraction must be in"):
        calibration_split(50, 1.0, seed=0)


def test_image_threshold_has_the_target_false_positive_rate_under_its_model():
    """Log-normal good scores, 4 held out: a fresh good image beats the threshold with probability fpr."""
    rng = np.random.default_rng(0)
    fpr, trials = 0.05, 4000
    held_out = np.exp(rng.normal(0.3, 0.2, size=(trials, 4)))
    fresh = np.exp(rng.normal(0.3, 0.2, size=trials))
    thresholds = np.array([image_threshold(row, fpr) for row in held_out])
    rate = float((fresh > thresholds).mean())
    # Binomial sd at 4000 trials is 0.0034; the plain Gaussian quantile (spread taken as known) gives ~0.10.
    assert abs(rate - fpr) < 0.015, rate
    # The largest held-out score alone, the naive rule, is beaten 1 time in 5.
    assert float((fresh > held_out.max(axis=1)).mean()) > 0.15


@pytest.mark.slow
def test_pooled_spread_keeps_the_rate_when_training_scores_are_lower():
    """Training scores are optimistic (lower level, same spread): they may set the spread, not the level."""
    rng = np.random.default_rng(1)
    fpr, trials = 0.05, 3000
    held_out = np.exp(rng.normal(0.3, 0.2, size=(trials, 4)))
    training = np.exp(rng.normal(0.0, 0.2, size=(trials, 28)))
    fresh = np.exp(rng.normal(0.3, 0.2, size=trials))
    pooled = np.array([image_threshold(h, fpr, spread_from=t) for h, t in zip(held_out, training)])
    assert abs(float((fresh > pooled).mean()) - fpr) < 0.015
    alone = np.array([image_threshold(h, fpr) for h in held_out])
    assert np.std(np.log(pooled)) < 0.5 * np.std(np.log(alone))  # a much steadier threshold
    # Setting the level on the training images too would flag good parts far too often.
    assert float((fresh > np.array([image_threshold(t, fpr) for t in training])).mean()) > 0.2


def test_image_threshold_formula_and_refusals():
    scores = np.array([1.0, 1.2, 0.9, 1.1, 1.05])
    logs = np.log(scores)
    from scipy import stats

    expected = math.exp(logs.mean() + stats.t.ppf(0.99, 4) * logs.std(ddof=1) * math.sqrt(1 + 1 / 5))
    assert image_threshold(scores, 0.01) == pytest.approx(expected, rel=1e-12)
    assert image_threshold(scores, 0.01) > image_threshold(scores, 0.1) > scores.max() * 0.9
    training = np.array([0.5, 0.7, 0.6])
    t = np.log(training)
    pooled_sd = math.sqrt((((logs - logs.mean()) ** 2).sum() + ((t - t.mean()) ** 2).sum()) / (4 + 2))
    expected = math.exp(logs.mean() + stats.t.ppf(0.99, 6) * pooled_sd * math.sqrt(1 + 1 / 5))
    assert image_threshold(scores, 0.01, spread_from=training) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 finite positive scores"):
        image_threshold([1.0], 0.01)
    with pytest.raises(ValueError, match="image_fpr must be a false-positive rate"):
        image_threshold(scores, 1.5)


def test_pixel_threshold_is_the_conformal_order_statistic():
    values = np.random.default_rng(1).permutation(np.arange(1.0, 2001.0))
    # ceil(2001 * 0.99) = 1981: the 1981st smallest value.
    assert pixel_threshold(values, 0.01) == 1981.0
    assert (values > pixel_threshold(values, 0.01)).mean() <= 0.01
    assert pixel_threshold(values[:50], 0.001) == values[:50].max()  # too few pixels for the rate


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), np.float32(-1.0), torch.tensor(float("nan"))])
def test_thresholds_outside_the_score_range_are_refused(value):
    with pytest.raises(ValueError, match=r"outside the score range \[0, inf\)"):
        check_threshold(value, "--image-threshold")


@pytest.mark.parametrize("value", [True, "1", torch.tensor([1.0]), 1j])
def test_thresholds_that_are_not_real_numbers_are_type_errors(value):
    with pytest.raises(TypeError, match="--image-threshold must be a real number"):
        check_threshold(value, "--image-threshold")


def test_thresholds_in_range_pass():
    assert check_threshold(0, "t") == 0.0 and check_threshold(2.5, "t") == 2.5 and check_threshold(None, "t") is None


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(2), torch.tensor(0.5), np.array(0.5)])
def test_thresholds_of_any_real_number_type_pass(value):
    result = check_threshold(value, "t")
    assert type(result) is float and result == float(value)


def test_a_required_threshold_refuses_none():
    with pytest.raises(TypeError, match="Detector.threshold must be a real number, got None"):
        check_threshold(None, "Detector.threshold", optional=False)


def test_train_sets_the_thresholds_on_the_held_out_images_only(tmp_path):
    data = RandomImages(count=10, augment=False)
    config = TrainConfig(steps=4, checkpoint_every=None, device="cpu", image_fpr=0.05, pixel_fpr=0.01)
    train(model_config(), config, data, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    calibration = ckpt.calibration
    kept, held_out = calibration_split(10, 0.1, seed=0)
    assert calibration["held_out"] == held_out and calibration["seed"] == 0 and calibration["source"] == "held-out"
    model = ckpt.build_model()
    with torch.no_grad():
        # The template is the mean latent of the kept images only ...
        for level, template in zip(model(data.images[kept]), ckpt.template):
            torch.testing.assert_close(level.mean(dim=0, keepdim=True), template, rtol=1e-5, atol=1e-6)
        # ... and the thresholds come from the held-out images' maps.
        maps = anomaly_map(model(data.images[held_out]), ckpt.template)
        training_scores = image_score(anomaly_map(model(data.images[kept]), ckpt.template)).double().numpy()
    scores = image_score(maps).double().numpy()
    np.testing.assert_allclose(calibration["scores"], scores, rtol=1e-5)
    expected = image_threshold(scores, 0.05, spread_from=training_scores)
    assert calibration["image_threshold"] == pytest.approx(expected, rel=1e-5)
    assert calibration["pixel_fpr_threshold"] == pytest.approx(pixel_threshold(maps.double().numpy(), 0.01), rel=1e-5)
    assert calibration["pixel_rule"] == "synthetic" and calibration["pixel_threshold"] >= calibration["pixel_fpr_threshold"]


def test_the_fpr_pixel_rule_is_one_threshold_at_the_target_rate(tmp_path):
    data = RandomImages(count=10, augment=False)
    config = TrainConfig(steps=2, checkpoint_every=None, device="cpu", pixel_fpr=0.01, pixel_rule="fpr")
    train(model_config(), config, data, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    _, held_out = calibration_split(10, 0.1, seed=0)
    with torch.no_grad():
        maps = anomaly_map(ckpt.build_model()(data.images[held_out]), ckpt.template)
    calibration = ckpt.calibration
    assert calibration["pixel_rule"] == "fpr" and calibration["pixel_peak_fraction"] == 0.0
    assert calibration["pixel_threshold"] == calibration["pixel_fpr_threshold"]
    assert calibration["pixel_threshold"] == pytest.approx(pixel_threshold(maps.double().numpy(), 0.01), rel=1e-5)


def test_resume_refuses_a_changed_calibration_split(tmp_path):
    from pyramidflow.checkpoint import CheckpointError

    config = TrainConfig(steps=2, checkpoint_every=None, device="cpu")
    train(model_config(), config, RandomImages(count=10, augment=False), tmp_path, progress=False)
    more = TrainConfig(steps=4, checkpoint_every=None, device="cpu")
    with pytest.raises(CheckpointError, match="calibration split held out images"):
        train(model_config(), more, RandomImages(count=12, augment=False), tmp_path, resume=True, progress=False)
