"""Images are read as viewers show them: the EXIF orientation tag is applied to every image the library reads
(NOTE [images as viewers show them] in pyramidflow/data/_io.py)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyramidflow.data._io import AnomalyDataset, Sample, _header_size, load_mask, load_rgb
from pyramidflow.inference.detector import _to_rgb

ORIENTATION = 0x0112
# tag -> how the stored pixels relate to the shown ones: viewers apply the tag to `stored(shown)` and get `shown`.
STORED = {
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, 1),  # the phone held upright: the sensor's picture is a quarter turn to the left
    8: lambda a: np.rot90(a, -1),
    2: lambda a: a[:, ::-1],
    5: lambda a: np.rot90(a, -1)[:, ::-1],
}


def _shown_picture(height: int = 6, width: int = 10) -> np.ndarray:
    """An RGB picture with no symmetry, so that every wrong turn or flip changes it."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _save_stored(path: Path, shown: np.ndarray, tag: int, **options) -> Path:
    exif = Image.Exif()
    exif[ORIENTATION] = tag
    Image.fromarray(np.ascontiguousarray(STORED[tag](shown))).save(path, exif=exif, **options)
    return path


@pytest.mark.parametrize("tag", sorted(STORED))
def test_an_image_is_read_as_viewers_show_it(tmp_path, tag):
    shown = _shown_picture()
    path = _save_stored(tmp_path / "part.png", shown, tag)
    np.testing.assert_array_equal(np.asarray(load_rgb(path, "t")), shown)
    assert _header_size(path, "t") == (shown.shape[1], shown.shape[0])  # (width, height) as shown


def test_a_phone_jpeg_stored_turned_is_read_upright(tmp_path):
    shown = np.zeros((40, 64, 3), dtype=np.uint8)
    shown[:10, :20] = 255  # a white block at the shown top left
    path = _save_stored(tmp_path / "phone.jpg", shown, 6, quality=95)
    image = np.asarray(load_rgb(path, "t"), dtype=np.int64)
    assert image.shape == shown.shape
    assert np.abs(image - shown).mean() < 4  # JPEG rounding only; a quarter turn would move the block entirely
    assert _header_size(path, "t") == (64, 40)


def test_masks_are_turned_like_their_images(tmp_path):
    shown_mask = np.zeros((6, 10, 3), dtype=np.uint8)
    shown_mask[1, 7] = 255
    path = _save_stored(tmp_path / "mask.png", shown_mask, 6)
    mask = np.asarray(load_mask(path, "t"))
    assert mask.shape == (6, 10) and mask[1, 7] == 255 and mask.sum() == 255


def test_a_data_set_pairs_a_turned_image_with_its_upright_mask(tmp_path):
    shown = _shown_picture(8, 12)
    image = _save_stored(tmp_path / "000.png", shown, 6)
    mask_pixels = np.zeros((8, 12), dtype=np.uint8)
    mask_pixels[2:4, 9:11] = 255
    Image.fromarray(mask_pixels).save(tmp_path / "000_mask.png")
    dataset = AnomalyDataset([Sample(image, tmp_path / "000_mask.png", 1, "crack")], name="t", split="test",
                             size=(8, 12), texture=False, augment=False, generator=None, verify=True)
    item = dataset[0]
    assert item["image"].shape == (3, 8, 12)
    assert item["mask"][0, 2:4, 9:11].all() and item["mask"].sum() == 4


def test_the_detector_turns_a_pil_image_with_an_orientation_tag(tmp_path):
    shown = _shown_picture()
    path = _save_stored(tmp_path / "part.jpg", shown, 6, quality=100)
    with Image.open(path) as opened:
        from_pil = np.asarray(_to_rgb(opened, "<image 0>", None), dtype=np.int64)
    from_path = np.asarray(_to_rgb(path, str(path), None), dtype=np.int64)
    assert from_pil.shape == from_path.shape == shown.shape
    np.testing.assert_array_equal(from_pil, from_path)
