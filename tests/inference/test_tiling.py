"""Tiled inference: tile layout, exact blending, and a defect in a 4x larger image found in place."""

import numpy as np
import pytest
import torch

from pyramidflow import Detector
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.model import PyramidFlowConfig
from pyramidflow.inference.tiling import check_tileable, tile_starts, tile_window, tiled_anomaly_map
from pyramidflow.train import TrainConfig, train

SIZE = 64


@pytest.mark.parametrize("length, tile", [(64, 64), (128, 64), (150, 64), (97, 32), (33, 32)])
def test_tiles_cover_the_image_inside_its_bounds_with_half_a_tile_of_overlap(length, tile):
    starts = tile_starts(length, tile)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(0 < b - a <= tile // 2 for a, b in zip(starts, starts[1:]))
    covered = np.zeros(length, int)
    for s in starts:
        covered[s:s + tile] += 1
    assert covered.min() >= 1


def test_hann_weights_sum_to_one_at_half_overlap():
    w = tile_window(64)
    assert (w > 0).all()
    np.testing.assert_allclose(w[32:] + w[:32], 1.0, atol=1e-12)


def test_blending_reproduces_a_map_the_tiles_agree_on():
    """If every tile reports the true map of its area, the blend is that map: no seam, no border error."""
    height, width, tile = 100, 130, (32, 48)
    field = torch.rand(3, height, width)
    blended = tiled_anomaly_map(field, tile, lambda tiles: tiles[:, 0].numpy() * 2.0, batch_size=3)
    np.testing.assert_allclose(blended, field[0].numpy() * 2.0, rtol=1e-5, atol=1e-6)


def test_smaller_image_is_refused_with_the_trained_size():
    with pytest.raises(ValueError, match=r"img: tiled inference needs images at least the trained size 64x64.*60x100"):
        check_tileable(100, 60, (64, 64), "img")


def _big_fabric(seed: int) -> np.ndarray:
    """A good fabric image twice the trained side (4x the pixels), with the trained weave period."""
    rng = np.random.default_rng(seed)
    renderer = synthetic._Fabric(rng, 2 * SIZE)
    renderer.period = SIZE / 16.0  # the weave at the pixel scale the model was trained on
    image, _, _ = renderer.render(rng)
    return synthetic._finish(rng, image)


@pytest.fixture(scope="module")
def texture_detector(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data"), seed=3, size=SIZE, categories=("fabric",), num_train=12, num_test=1)
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, num_levels=3, volume_norm="SVN")
    run = train(config, TrainConfig(steps=30, device="cpu"), MVTecDataset(root, "fabric", split="train", size=SIZE),
                tmp_path_factory.mktemp("run"), progress=False)
    return Detector.load(run.checkpoint_path, device="cpu", tile=True)


@pytest.mark.slow
def test_defect_in_a_4x_larger_image_is_found_in_place_and_seams_stay_dark(texture_detector):
    good = _big_fabric(seed=11)
    defective = good.copy()
    top, left = 84, 30  # away from every seam (tile starts 0, 32, 64)
    defective[top:top + 6, left:left + 6] = (20, 20, 200)  # an ink blot
    good_p, bad_p = texture_detector([good, defective])
    assert good_p.anomaly_map.shape == (2 * SIZE, 2 * SIZE)
    y, x = np.unravel_index(np.argmax(bad_p.anomaly_map), bad_p.anomaly_map.shape)
    assert top - 3 <= y < top + 9 and left - 3 <= x < left + 9, (y, x)
    assert bad_p.score > good_p.score
    # Seams: the two pixel rows / columns that meet at each tile border inside the image (32, 64, 96).
    starts = tile_starts(2 * SIZE, SIZE)
    borders = sorted(set(starts[1:]) | {s + SIZE for s in starts[:-1]})
    seam = {p for b in borders for p in (b - 1, b)}
    y, x = np.unravel_index(np.argmax(good_p.anomaly_map), good_p.anomaly_map.shape)
    assert y not in seam and x not in seam, ((y, x), borders)
