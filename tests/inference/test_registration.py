"""Registration: moved parts found back, maps and masks in the input's coordinates, the option's refusals."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from pyramidflow import Detector
from pyramidflow.checkpoint import CheckpointError, load_checkpoint
from pyramidflow.cli import main
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.inference.export import export_checkpoint
from pyramidflow.inference.registration import (ensure_reference, estimate_rigid, registered_maps,
                                                registration_reference, unwarp, warp)
from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train import TrainConfig, train

H, W = 61, 75  # not square, not powers of two: a mix-up of x and y or of the two scales shows


def _part() -> np.ndarray:
    """A grey-level part off the centre on a textured background, asymmetric so a rotation is visible."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    cy, cx = (H - 1) / 2, (W - 1) / 2
    image = 3 * ndimage.gaussian_filter(rng.normal(size=(H, W)), 2.0)
    image += 2.0 * ((xx - cx - 5) ** 2 / 200 + (yy - cy + 3) ** 2 / 90 < 1)
    image += 1.5 * ((abs(xx - cx + 8) < 4) & (abs(yy - cy - 6) < 10))
    return image


def _moved(image: np.ndarray, angle: float, shift) -> np.ndarray:
    """``image`` ``(H, W)`` rotated by ``angle`` about its centre, then moved by ``shift`` ``(x, y)`` pixels, with
    scipy (independent of the module): moved(v) = image(R^T (v - t)) in centred coordinates."""
    c, s = math.cos(angle), math.sin(angle)
    inverse_yx = np.array([[c, -s], [s, c]])  # R^T in (x, y) is [[c, s], [-s, c]]; swapped to (row, col)
    centre = (np.array(image.shape, dtype=float) - 1) / 2
    offset = centre - inverse_yx @ (centre + np.array([shift[1], shift[0]]))
    return ndimage.affine_transform(image, inverse_yx, offset=offset, order=3, mode="nearest")


def _rgb(gray: np.ndarray) -> torch.Tensor:
    return torch.tensor(gray, dtype=torch.float32)[None].repeat(3, 1, 1)


CASES = [(0.0, (0.0, 0.0)), (5.0, (3.3, -2.2)), (-7.5, (-4.1, 3.7)), (8.0, (4.5, 4.5)), (-3.0, (-2.0, 0.4))]


@pytest.mark.parametrize("degrees, shift", CASES)
def test_a_moved_part_is_found_and_aligned_back_within_a_pixel(degrees, shift):
    part = _part()
    moved = _rgb(_moved(part, math.radians(degrees), shift))[None]
    angle, found = estimate_rigid(moved, _rgb(part))
    assert abs(math.degrees(float(angle[0])) - degrees) < 0.3
    assert np.abs(found[0].numpy() - np.array(shift)).max() < 0.25
    # The error of the whole transform, at the frame's corners (where a rotation error moves pixels most).
    corners = torch.tensor([[-(W - 1) / 2, -(H - 1) / 2], [(W - 1) / 2, (H - 1) / 2], [(W - 1) / 2, -(H - 1) / 2]])
    a = math.radians(degrees)
    true = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c, s = math.cos(float(angle[0])), math.sin(float(angle[0]))
    estimated = torch.tensor([[c, -s], [s, c]])
    moved_by = (corners @ true.T + torch.tensor(shift)) - (corners @ estimated.T + found[0])
    assert moved_by.norm(dim=1).max() < 1.0
    aligned = warp(moved, angle, found)[0, 0].numpy()
    inner = (slice(12, -12), slice(12, -12))
    assert np.abs(aligned - part)[inner].mean() < 0.1 * np.abs(moved[0, 0].numpy() - part)[inner].mean() + 0.05


def test_warp_follows_the_written_convention_and_unwarp_undoes_it():
    """On an image of its own coordinates, warp must give R u + t (to a tenth of a pixel: bicubic sampling
    does not reproduce a ramp exactly), and unwarp (bilinear, exact on a ramp) must take R u + t back to u."""
    yy, xx = np.mgrid[0:H, 0:W]
    coords = torch.tensor(np.stack([xx - (W - 1) / 2, yy - (H - 1) / 2]), dtype=torch.float32)[None]  # u
    angle, shift = torch.tensor([0.1]), torch.tensor([[2.5, -1.5]])
    aligned = warp(coords, angle, shift)[0]
    c, s = math.cos(0.1), math.sin(0.1)
    expected = torch.stack([c * coords[0, 0] - s * coords[0, 1] + 2.5, s * coords[0, 0] + c * coords[0, 1] - 1.5])
    inner = (slice(None), slice(8, -8), slice(8, -8))  # where R u + t stays inside the frame
    assert torch.allclose(aligned[inner], expected[inner], atol=0.1)
    back = unwarp(expected[None], angle, shift)[0]
    assert torch.allclose(back[inner], coords[0][inner], atol=1e-4)


def test_pixels_with_no_source_take_the_reference():
    image = torch.zeros(1, 3, H, W)
    fill = torch.full((3, H, W), 7.0)
    aligned = warp(image, torch.tensor([0.0]), torch.tensor([[10.0, 0.0]]), fill=fill)[0, 0]
    assert torch.allclose(aligned[:, -9:], torch.tensor(7.0), atol=1e-4)
    assert torch.allclose(aligned[:, :-11], torch.tensor(0.0), atol=1e-4)


def test_a_defect_on_a_moved_part_lands_at_its_place_in_the_input():
    part = _part()
    degrees, shift = 6.0, (4.0, -3.0)
    moved = _moved(part, math.radians(degrees), shift)
    spot_y, spot_x = 40, 20  # in the moved image's own coordinates
    moved[spot_y - 1:spot_y + 2, spot_x - 1:spot_x + 2] += 6.0
    reference = _rgb(part)

    def difference(aligned: torch.Tensor) -> np.ndarray:  # a stand-in model: the map is |image - reference|
        return (aligned - reference).abs().mean(1).numpy()

    maps = registered_maps(difference, _rgb(moved)[None], reference)
    assert maps.shape == (1, H, W)
    peak_y, peak_x = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert abs(peak_y - spot_y) <= 1 and abs(peak_x - spot_x) <= 1
    # Without registration the whole moved part lights up as strongly as the defect.
    unregistered = difference(_rgb(moved)[None])[0]
    far = np.hypot(*np.mgrid[0:H, 0:W] - np.array([spot_y, spot_x])[:, None, None]) > 6
    assert maps[0][far].max() < 0.5 * maps[0].max() < unregistered[far].max()


def test_the_reference_must_match_the_images():
    with pytest.raises(ValueError, match="reference has shape"):
        estimate_rigid(torch.zeros(1, 3, 32, 32), torch.zeros(3, 32, 30))


SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained with augmentation on (the reference must be the images as they are, not flipped)."""
    root = synthetic.generate(tmp_path_factory.mktemp("data"), seed=5, size=SIZE, categories=("nut",), num_train=8,
                              num_test=1)
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3)
    run = train(config, TrainConfig(steps=2, device="cpu", augment=True),
                MVTecDataset(root, "nut", split="train", size=SIZE), tmp_path_factory.mktemp("run"), progress=False)
    return run.checkpoint_path, root


def _without_reference(path, tmp_path):
    """A copy of the checkpoint at ``path`` as written before ``train`` stored the reference."""
    old = tmp_path / "old.pt"
    state = torch.load(path, weights_only=True)
    del state["registration"]
    torch.save(state, old)
    return old


def test_train_stores_the_mean_of_every_good_training_image_as_they_are(trained):
    """Held-out calibration images included (as ``eval --register`` adds it to an older checkpoint), unaugmented."""
    path, root = trained
    checkpoint = load_checkpoint(path)
    assert checkpoint.calibration["held_out"]
    plain = MVTecDataset(root, "nut", split="train", size=SIZE, augment=False)
    reference = checkpoint.registration["reference"]
    assert reference.shape == (3, SIZE, SIZE) and reference.dtype == torch.float32
    expected = np.mean([plain[i]["image"].double().numpy() for i in range(len(plain))], axis=0)
    np.testing.assert_allclose(reference.numpy(), expected, rtol=0, atol=1e-5)


def test_a_defect_on_a_moved_part_is_masked_at_its_place_in_the_input(trained):
    """Through the Detector, straight from training (no eval first): the mask and the region that hold the
    defect are where the defect is in the moved image, not where it would be on the aligned one."""
    path, root = trained
    good = np.array(Image.open(root / "nut" / "test" / "good" / "000.png").convert("RGB"), dtype=np.float64)
    moved = np.stack([_moved(good[..., c], math.radians(7.0), (2.5, -1.5)) for c in range(3)], -1)
    spot_y, spot_x = 9, 22
    moved[spot_y - 1:spot_y + 2, spot_x - 1:spot_x + 2] = 255.0
    detector = Detector.load(path, device="cpu", register=True)
    detector.threshold = 0.0  # flagged, so the mask holds at least the region around the peak
    [p] = detector([np.clip(moved, 0, 255).astype(np.uint8)])
    peak_y, peak_x = np.unravel_index(p.anomaly_map.argmax(), p.anomaly_map.shape)
    assert abs(peak_y - spot_y) <= 1 and abs(peak_x - spot_x) <= 1
    assert p.mask[spot_y, spot_x]
    x0, y0, x1, y1 = max(p.regions, key=lambda region: region["peak"])["bbox"]  # stop exclusive
    assert x0 <= spot_x < x1 and y0 <= spot_y < y1


def test_checkpoints_without_a_reference_load_and_refuse_registration_clearly(trained, tmp_path):
    path, root = trained
    old = _without_reference(path, tmp_path)
    assert load_checkpoint(old).registration is None
    image = root / "nut" / "test" / "good" / "000.png"
    assert Detector.load(old, device="cpu")([image])[0].anomaly_map.shape == (SIZE, SIZE)
    with pytest.raises(CheckpointError, match="no registration reference.*eval --register"):
        Detector.load(old, device="cpu", register=True)


def test_the_reference_of_an_older_checkpoint_is_stored_once_and_registration_keeps_the_input_size(trained, tmp_path):
    path, root = trained
    copy = _without_reference(path, tmp_path)
    train_set = MVTecDataset(root, "nut", split="train", size=SIZE)
    ensure_reference(load_checkpoint(copy), train_set)
    stored = load_checkpoint(copy)
    assert torch.equal(stored.registration["reference"], registration_reference(train_set))
    assert all(torch.equal(a, b) for a, b in zip(stored.template, load_checkpoint(path).template))
    pixels = np.array(Image.open(root / "nut" / "test" / "good" / "000.png").convert("RGB").resize((40, 48)))
    [p] = Detector.load(copy, device="cpu", register=True)([pixels])
    assert p.anomaly_map.shape == (48, 40) and p.mask.shape == (48, 40) and np.isfinite(p.anomaly_map).all()
    with pytest.raises(NotImplementedError, match="tile=True"):
        Detector.load(copy, device="cpu", register=True, tile=True)


def test_export_refuses_registration(trained, tmp_path):
    path, _ = trained
    with pytest.raises(NotImplementedError, match="export: register=True"):
        export_checkpoint(path, tmp_path / "model.pt", format="torchscript", register=True)
    assert not (tmp_path / "model.pt").exists()


def test_eval_and_predict_register_from_the_command_line(trained, tmp_path):
    path, root = trained
    assert main(["predict", "--checkpoint", str(path), "--out", str(tmp_path / "fresh"), "--register", "--device",
                 "cpu", str(root / "nut" / "test" / "good")]) == 0
    test_only = tmp_path / "test_only"  # eval reads no training image when the checkpoint holds the reference
    for part in ("test", "ground_truth"):
        shutil.copytree(root / "nut" / part, test_only / "nut" / part)
    assert main(["eval", "--checkpoint", str(path), "--data", str(test_only), "--category", "nut", "--out",
                 str(tmp_path / "eval_fresh"), "--device", "cpu", "--register", "--no-report"]) == 0
    copy = _without_reference(path, tmp_path)
    assert main(["predict", "--checkpoint", str(copy), "--out", str(tmp_path / "refused"), "--register", "--device",
                 "cpu", str(root / "nut" / "test" / "good")]) != 0
    assert main(["eval", "--checkpoint", str(copy), "--data", str(root), "--category", "nut", "--out",
                 str(tmp_path / "eval"), "--device", "cpu", "--register"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["register"] is True
    assert load_checkpoint(copy).registration is not None
    assert main(["predict", "--checkpoint", str(copy), "--out", str(tmp_path / "pred"), "--register", "--device",
                 "cpu", str(root / "nut" / "test" / "good")]) == 0
