"""The pixel-threshold rules: the best-F1 threshold, defects drawn into good images, and what train reads and stores."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyramidflow import pixel_threshold as rules
from pyramidflow.calibration import pixel_threshold, stored_mask_rule
from pyramidflow.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.inference.maps import load_for_inference, predict_dataset
from pyramidflow.metrics import best_pixel_f1, mask_decision_metrics, pixel_decision_metrics
from pyramidflow.train import TrainConfig, train

from test_train import model_config

SIZE = 32


def test_best_pixel_f1_finds_the_best_of_all_thresholds():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 12, 12)) < 0.2
    maps = np.where(masks, rng.uniform(0.4, 1.0, masks.shape), rng.uniform(0.0, 0.7, masks.shape))
    best = best_pixel_f1(maps, masks)
    brute = max(pixel_decision_metrics(maps, masks, t)["pixel_f1"] for t in np.concatenate(([-1.0], np.unique(maps))))
    assert best["pixel_f1"] == pytest.approx(brute, abs=1e-12)
    assert pixel_decision_metrics(maps, masks, best["threshold"])["pixel_f1"] == pytest.approx(best["pixel_f1"], abs=1e-12)


def test_a_map_with_a_known_ideal_threshold_gets_it():
    # Defects at 0.8 or more, good pixels at 0.3 or less: every threshold in [0.3, 0.8) is ideal.
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:5, 2:5] = masks[1, 6:, :3] = True
    maps = np.where(masks, 0.8 + 0.1 * np.arange(64).reshape(8, 8) / 64, 0.3 * np.arange(64).reshape(8, 8) / 63)
    best = best_pixel_f1(maps, masks)
    assert best["pixel_f1"] == 1.0 and 0.3 <= best["threshold"] < 0.8


def _good_images(count: int = 4) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = rng.integers(60, 200, size=(1, SIZE, SIZE, 3))
    return np.clip(base + rng.integers(-3, 4, size=(count, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def test_pasted_defects_change_exactly_their_masks_and_are_seeded():
    good = _good_images()
    drawn, masks, kinds = rules.paste_defects(good, seed=3, strengths=(1.0, 0.5))
    again, _, _ = rules.paste_defects(good, seed=3, strengths=(1.0, 0.5))
    assert drawn.shape == (40, SIZE, SIZE, 3) and masks.shape == (40, SIZE, SIZE)
    assert kinds[:10] == list(synthetic.DEFECT_TYPES) + [f"{k} x0.5" for k in synthetic.DEFECT_TYPES] and kinds[10:20] == kinds[:10]
    assert rules.paste_defects(good, seed=3)[2] == 8 * list(synthetic.DEFECT_TYPES)  # the default: as drawn
    np.testing.assert_array_equal(drawn, again)
    source = np.repeat(good, 10, axis=0)
    changed = (drawn != source).any(axis=-1)
    assert masks.any(axis=(1, 2)).all()
    assert not (changed & ~masks).any()  # nothing outside a mask changes
    # half strength: the same defect, half the change (the drawing consumes the generator as at full strength)
    full, full_masks, _ = rules.paste_defects(good, seed=3, strengths=(1.0,))
    half = np.asarray(kinds) != np.asarray([k.split(" x")[0] for k in kinds])
    np.testing.assert_array_equal(full_masks, masks)
    change = drawn.astype(float) - source
    full_change = full.astype(float) - source
    np.testing.assert_array_equal(change[~half], full_change[~half])
    assert np.abs(change[half] - 0.5 * full_change[half]).max() <= 1.0  # rounding to uint8
    with pytest.raises(ValueError, match="uint8"):
        rules.paste_defects(good.astype(np.float32), seed=0)


def test_the_fitted_rule_is_the_best_of_its_candidates_over_kinds_and_never_below_the_floor():
    good = _good_images()

    def maps_of(images):  # the colour change itself: defects stand out by the drawn amount
        return np.abs(images.astype(np.float64) - np.repeat(good, len(images) // len(good), axis=0)).max(axis=-1)

    drawn, masks, kinds = rules.paste_defects(good, seed=0)
    maps = maps_of(drawn)
    rule = rules.synthetic_rule(good, maps_of, floor=0.5, seed=0)
    assert rule == rules.fit_mask_rule(maps, masks, kinds, floor=0.5, least_seed=maps_of(good).max())
    assert rule.low == 0.5 and rule.seed >= 0.5
    groups = [np.asarray(kinds) == k for k in set(kinds)]

    def mean_f1(seed, fraction):
        predicted = rules.MaskRule(seed, 0.5, fraction)(maps)
        return np.mean([mask_decision_metrics(predicted[g], masks[g])["pixel_f1"] for g in groups])

    seeds = [0.5] + [max(0.5, best_pixel_f1(maps[g], masks[g])["threshold"]) for g in groups]
    assert mean_f1(rule.seed, rule.fraction) == pytest.approx(max(mean_f1(s, f) for s in seeds for f in rules.FRACTIONS), abs=1e-12)
    assert rules.synthetic_rule(good, maps_of, floor=1e6, seed=0) == rules.MaskRule(1e6, 1e6, 0.0)


def test_each_kind_counts_once_so_a_faint_kind_is_not_left_below_the_seed():
    """A large strong kind with a halo and a small faint one: pooled pixels would put the seed between
    the halo and the strong peak, above every faint defect; each kind counting once keeps both."""
    maps, masks = np.zeros((4, 16, 16)), np.zeros((4, 16, 16), dtype=bool)
    for i in (0, 1):  # strong: 1.0 on a 6x6 square, a 0.5 halo of two pixels around it
        maps[i, 3:13, 3:13], masks[i, 5:11, 5:11] = 0.5, True
        maps[i, 5:11, 5:11] = 1.0
    for i in (2, 3):  # faint: 0.4 on a 2x2 square
        maps[i, 7:9, 7:9], masks[i, 7:9, 7:9] = 0.4, True
    rule = rules.fit_mask_rule(maps, masks, ["strong", "strong", "faint", "faint"], floor=0.05)
    assert rule.seed < 0.4 and 0.5 <= rule.fraction * 1.0 < 0.8 * 1.0
    np.testing.assert_array_equal(rule(maps), masks)
    pooled = best_pixel_f1(maps, masks)["threshold"]
    assert pooled > 0.4  # the pooled seed would have left the faint kind with empty masks
    # a seed kept above the good images' peaks: the lowest seed allowed, the floor unchanged
    above = rules.fit_mask_rule(maps, masks, ["strong", "strong", "faint", "faint"], floor=0.05, least_seed=0.3)
    assert above.seed == 0.3 and above.low == 0.05
    np.testing.assert_array_equal(above(maps), masks)
    assert rules.fit_mask_rule(maps, masks, ["strong", "strong", "faint", "faint"], floor=0.05, least_seed=0.45).seed >= 0.45


def test_a_mask_rule_keeps_regions_that_reach_the_seed_and_pixels_above_a_share_of_their_peak():
    maps = np.zeros((1, 6, 9))
    maps[0, 1:4, 1:4] = [[0.3, 0.5, 0.3], [0.5, 1.0, 0.5], [0.3, 0.5, 0.3]]  # a defect peaking at 1.0
    maps[0, 4:6, 6:9] = 0.4  # a faint blob that never reaches the seed
    mask = rules.MaskRule(seed=0.6, low=0.2, fraction=0.45)(maps)
    expected = np.zeros_like(mask)
    expected[0, 1:4, 1:4] = maps[0, 1:4, 1:4] > 0.45
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(rules.MaskRule.plain(0.35)(maps), maps > 0.35)
    # never more than the false-positive rule's mask at ``low``
    assert not (rules.MaskRule(seed=0.3, low=0.2, fraction=0.0)(maps) & ~(maps > 0.2)).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_flagged_maps_mask_holds_its_peak_and_is_unchanged_when_the_peak_reaches_the_seed(dtype):
    """NOTE [a flagged image has a mask]: seed and floor capped just below the map's own peak."""
    rng = np.random.default_rng(4)
    maps = rng.gamma(2.0, 0.1, size=(40, 13, 17)).astype(dtype)
    peaks = maps.max(axis=(1, 2))
    for rule in (rules.MaskRule(float(np.quantile(peaks, 0.5)), 0.3, 0.6), rules.MaskRule.plain(float(np.quantile(peaks, 0.7))),
                 rules.MaskRule(10.0, 10.0, 0.3)):
        unflagged, flagged = rule(maps), rule(maps, np.ones(len(maps), bool))
        for m, plain, capped, peak in zip(maps, unflagged, flagged, peaks):
            assert capped[np.unravel_index(np.argmax(m), m.shape)]
            if peak > rule.seed and peak > rule.low:  # the cap changes nothing where the rule already finds the peak
                np.testing.assert_array_equal(capped, plain)
            else:  # only the peak's region, trimmed to the fraction of its peak
                assert not plain.any()  # the contradiction the cap removes: flagged, nothing to show
                assert not (capped & ~(m > rule.fraction * peak)).any()
        np.testing.assert_array_equal(rule(maps, False), unflagged)
    one = rules.MaskRule(10.0, 0.3, 0.6)
    np.testing.assert_array_equal(one(maps[:2], [True, False]), np.stack([one(maps[0], True), one(maps[1])]))


def test_a_peak_fraction_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        rules.MaskRule(0.5, 0.1, 1.0)


def test_unknown_pixel_rules_are_refused():
    with pytest.raises(ValueError, match="pixel_rule must be one of synthetic, fpr"):
        TrainConfig(steps=1, pixel_rule="f1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on synthetic nut images, with every image file the run opened."""
    root = tmp_path_factory.mktemp("data")
    synthetic.generate(root, size=SIZE, categories=("nut",), num_train=10, num_test=2)
    opened: list[str] = []
    real_open = Image.open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    out = tmp_path_factory.mktemp("run")
    Image.open = spy
    try:
        dataset = MVTecDataset(root, "nut", split="train", size=SIZE)
        train(model_config(), TrainConfig(steps=2, checkpoint_every=None, device="cpu"), dataset, out, progress=False)
    finally:
        Image.open = real_open
    return root, out / CHECKPOINT_NAME, opened


def test_train_never_opens_a_test_image_or_a_mask(trained):
    root, _, opened = trained
    read = {Path(p).relative_to(root).parts[1] for p in opened}
    assert read == {"train"}, f"train opened files under {read}"


def test_the_default_rule_is_stored_and_keeps_good_masks_empty_at_least_as_often(trained):
    root, checkpoint, _ = trained
    calibration = load_checkpoint(checkpoint).calibration
    assert calibration["pixel_rule"] == rules.DEFAULT_PIXEL_RULE == "synthetic"
    assert calibration["pixel_threshold"] >= calibration["pixel_fpr_threshold"] > 0
    import torch

    inference = load_for_inference(checkpoint, torch.device("cpu"))
    test = predict_dataset(inference.model, inference.template, MVTecDataset(root, "nut", split="test", size=SIZE),
                           device=torch.device("cpu"), progress=False)
    rule = stored_mask_rule(load_checkpoint(checkpoint))
    assert rule == rules.MaskRule(calibration["pixel_threshold"], calibration["pixel_fpr_threshold"],
                                  calibration["pixel_peak_fraction"])
    good = test.maps[test.labels == 0]
    empty_now = [not rule(m).any() for m in good]
    empty_fpr = [not rules.MaskRule.plain(calibration["pixel_fpr_threshold"])(m).any() for m in good]
    assert all(now or not fpr for now, fpr in zip(empty_now, empty_fpr))
    held = predict_dataset(inference.model, inference.template,
                           torch.utils.data.Subset(MVTecDataset(root, "nut", split="train", size=SIZE, augment=False), calibration["held_out"]),
                           device=torch.device("cpu"), progress=False)
    assert calibration["pixel_fpr_threshold"] == pytest.approx(pixel_threshold(held.maps, 0.001), rel=1e-5)
