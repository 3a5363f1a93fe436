"""Data: the synthetic generator, the MVTec / BTAD / folder loaders, transforms and the input errors."""

from __future__ import annotations

import hashlib
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyramidflow.data import (
    BTADDataset,
    FolderDataset,
    MVTecDataset,
    denormalize,
    is_texture_category,
    synthetic,
)
from pyramidflow.data.transforms import image_to_tensor, mask_to_tensor, random_flip_rotate

SIZE = 64


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic set shared by the read-only tests (do not modify it)."""
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), seed=0, size=SIZE, num_train=4, num_test=2)


@pytest.fixture()
def own_copy(synthetic_root, tmp_path) -> Path:
    """A private copy of the synthetic set that a test may break."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "set"))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))
    }


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------
# Synthetic generator.


def test_generator_is_deterministic_by_seed(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=3, size=48, categories=("fabric", "nut"), num_train=2, num_test=1)
    b = synthetic.generate(tmp_path / "b", seed=3, size=48, categories=("fabric", "nut"), num_train=2, num_test=1)
    c = synthetic.generate(tmp_path / "c", seed=4, size=48, categories=("fabric", "nut"), num_train=2, num_test=1)
    assert _digests(a) == _digests(b)
    digests_c = _digests(c)
    assert digests_c.keys() == _digests(a).keys()
    images = [k for k in digests_c if "ground_truth" not in k]
    assert all(digests_c[k] != _digests(a)[k] for k in images)


def test_generator_layout_and_masks(synthetic_root):
    assert synthetic.TEXTURES and synthetic.OBJECTS
    assert set(synthetic.CATEGORIES) == set(synthetic.TEXTURES) | set(synthetic.OBJECTS)
    for category in synthetic.CATEGORIES:
        folder = synthetic_root / category
        assert sorted(p.name for p in (folder / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(4)]
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(("good",) + synthetic.DEFECT_TYPES)
        assert not (folder / "ground_truth" / "good").exists()
        for kind in synthetic.DEFECT_TYPES:
            for image_path in sorted((folder / "test" / kind).iterdir()):
                mask_path = folder / "ground_truth" / kind / f"{image_path.stem}_mask.png"
                image, mask = Image.open(image_path), np.asarray(Image.open(mask_path))
                assert image.mode == "RGB" and image.size == (SIZE, SIZE)
                assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
                assert 0.002 <= (mask > 0).mean() <= 0.1, (category, kind, (mask > 0).mean())


def test_generator_texture_is_not_registered(synthetic_root):
    # Each fabric image shows the weave at its own phase: averaging washes the pattern out.
    folder = synthetic_root / synthetic.TEXTURES[0] / "train" / "good"
    train = np.stack([np.asarray(Image.open(p), dtype=np.float64).mean(axis=2) for p in sorted(folder.iterdir())])
    # Registered images would keep ~100% of the contrast; n independent phases keep ~1/sqrt(n).
    assert train.mean(axis=0).std() < 0.75 * train.std(axis=(1, 2)).min()


def test_generator_defects_are_locally_distinct(synthetic_root):
    # Inside the masks the test images differ from the mean training image far more than outside
    # (objects are registered; the texture is not, see the next test).
    for category in synthetic.OBJECTS:
        folder = synthetic_root / category
        train = [np.asarray(Image.open(p), dtype=np.float64) for p in sorted((folder / "train/good").iterdir())]
        mean = np.mean(train, axis=0)
        for kind in synthetic.DEFECT_TYPES:
            for image_path in sorted((folder / "test" / kind).iterdir()):
                mask = np.asarray(Image.open(folder / "ground_truth" / kind / f"{image_path.stem}_mask.png")) > 0
                error = np.abs(np.asarray(Image.open(image_path), dtype=np.float64) - mean).max(axis=2)
                assert error[mask].mean() > 3 * error[~mask].mean(), (category, kind)


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown categories \['carpet'\]"):
        synthetic.generate(tmp_path, categories=("carpet",))
    with pytest.raises(ValueError, match="size must be an integer >= 32, got 16"):
        synthetic.generate(tmp_path, size=16)
    with pytest.raises(ValueError, match="num_test must be an integer >= 1, got 0"):
        synthetic.generate(tmp_path, num_test=0)


def test_texture_names():
    assert all(synthetic.is_texture(c) and is_texture_category(c) for c in synthetic.TEXTURES)
    assert not any(is_texture_category(c) for c in synthetic.OBJECTS)
    assert is_texture_category("carpet") and not is_texture_category("bottle")


# ----------------------------------------------------------------------------------------------------
# MVTec loader on the synthetic set.


def test_mvtec_items(synthetic_root):
    train = MVTecDataset(synthetic_root, "nut", split="train", size=SIZE)
    test = MVTecDataset(synthetic_root, "nut", split="test", size=SIZE)
    assert len(train) == 4 and train.labels == [0] * 4
    assert len(test) == 2 * (1 + len(synthetic.DEFECT_TYPES))
    assert sorted(test.labels) == [0, 0] + [1] * (len(test) - 2)
    for item in test:
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert (item["mask"].sum() > 0) == (item["label"] == 1)
        assert Path(item["path"]).is_file()
    # Normalised with ImageNet statistics; denormalize gives the stored pixels back.
    item = test[0]
    stored = np.asarray(Image.open(item["path"]))
    assert np.abs(denormalize(item["image"]).astype(int) - stored).max() <= 1
    assert denormalize(torch.stack([item["image"]] * 2)).shape == (2, SIZE, SIZE, 3)


def test_mvtec_resizes_images_and_masks(synthetic_root):
    test = MVTecDataset(synthetic_root, "pcb", split="test", size=(40, 24))
    item = next(it for it in test if it["label"] == 1)
    assert item["image"].shape == (3, 40, 24) and item["mask"].shape == (1, 40, 24)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}  # nearest keeps the mask binary


def test_image_resize_is_bilinear_and_mask_resize_nearest():
    stripes = np.zeros((8, 8, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    image = image_to_tensor(Image.fromarray(stripes), (4, 4))
    assert np.abs(denormalize(image).astype(int) - 128).max() <= 25  # neighbours mixed (nearest: 0 or 255)
    mask = mask_to_tensor(Image.fromarray(stripes[..., 0]), (4, 4))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        out += [r, r.flip(-1)]
    return out


def test_texture_augmentation_is_seeded_and_only_on_textures(synthetic_root):
    texture = synthetic.TEXTURES[0]
    plain = MVTecDataset(synthetic_root, texture, split="train", size=SIZE, augment=False)
    a = MVTecDataset(synthetic_root, texture, split="train", size=SIZE, generator=torch.Generator().manual_seed(7))
    b = MVTecDataset(synthetic_root, texture, split="train", size=SIZE, generator=torch.Generator().manual_seed(7))
    c = MVTecDataset(synthetic_root, texture, split="train", size=SIZE, generator=torch.Generator().manual_seed(8))
    assert a.augment and not plain.augment
    reads_a = [a[i % 4]["image"] for i in range(12)]
    reads_b = [b[i % 4]["image"] for i in range(12)]
    reads_c = [c[i % 4]["image"] for i in range(12)]
    assert all(torch.equal(x, y) for x, y in zip(reads_a, reads_b))
    assert not all(torch.equal(x, y) for x, y in zip(reads_a, reads_c))
    # Every augmented image is a flip/rotation of the stored one, and not always the identity.
    for i, image in enumerate(reads_a):
        assert any(torch.equal(image, candidate) for candidate in _dihedral(plain[i % 4]["image"]))
    assert not all(torch.equal(image, plain[i % 4]["image"]) for i, image in enumerate(reads_a))
    # The global generator, seeded, is reproducible too.
    global_rng = MVTecDataset(synthetic_root, texture, split="train", size=SIZE)
    torch.manual_seed(1)
    first = [global_rng[0]["image"] for _ in range(4)]
    torch.manual_seed(1)
    second = [global_rng[0]["image"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # Objects and test splits are never augmented by default.
    for category, split in ((synthetic.OBJECTS[0], "train"), (texture, "test")):
        dataset = MVTecDataset(synthetic_root, category, split=split, size=SIZE, generator=torch.Generator().manual_seed(0))
        assert not dataset.augment
        assert torch.equal(dataset[0]["image"], dataset[0]["image"])


def test_random_flip_rotate_moves_mask_with_image():
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(3, 5, 5)
    mask = (image[:1] % 7 == 0).float()
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        new_image, new_mask = random_flip_rotate(image, mask, generator)
        assert torch.equal(new_mask, (new_image[:1] % 7 == 0).float())
    wide = torch.zeros(3, 4, 6)
    assert random_flip_rotate(wide, wide[:1], generator)[0].shape == (3, 4, 6)  # non-square: no 90 degrees


# ----------------------------------------------------------------------------------------------------
# Bad input.


def test_missing_root_category_and_split(synthetic_root, tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        MVTecDataset(tmp_path / "nowhere", "nut")
    assert "nowhere" in _one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        MVTecDataset(synthetic_root, "nutt")
    assert "unknown category 'nutt'" in _one_line(excinfo) and "nut" in str(excinfo.value)
    with pytest.raises(FileNotFoundError) as excinfo:  # a real MVTec category that is not there
        MVTecDataset(synthetic_root, "carpet")
    assert str(synthetic_root / "carpet") in _one_line(excinfo)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        MVTecDataset(synthetic_root, "nut", split="val")
    with pytest.raises(ValueError, match="size"):
        MVTecDataset(synthetic_root, "nut", size=0)


def test_empty_folder_and_missing_mask(own_copy):
    for path in (own_copy / "nut/train/good").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError) as excinfo:
        MVTecDataset(own_copy, "nut", split="train")
    assert str(own_copy / "nut/train/good") in _one_line(excinfo) and "holds no image files" in str(excinfo.value)
    (own_copy / "pcb/ground_truth/spot/001_mask.png").unlink()
    with pytest.raises(FileNotFoundError) as excinfo:
        MVTecDataset(own_copy, "pcb", split="test")
    assert str(own_copy / "pcb/ground_truth/spot/001_mask.png") in _one_line(excinfo)


def test_not_an_image_fails_at_construction(own_copy):
    bad = own_copy / "nut/train/good/003.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError) as excinfo:
        MVTecDataset(own_copy, "nut", split="train")
    assert str(bad) in _one_line(excinfo)


def test_truncated_image_fails_when_read_naming_the_file(own_copy):
    bad = own_copy / "nut/train/good/002.png"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    dataset = MVTecDataset(own_copy, "nut", split="train", size=SIZE)  # the header is intact
    dataset[0]
    with pytest.raises(ValueError) as excinfo:
        dataset[2]
    assert str(bad) in _one_line(excinfo) and "truncated" in str(excinfo.value)


def test_mask_of_the_wrong_size(own_copy):
    mask_path = own_copy / "fabric/ground_truth/crack/000_mask.png"
    Image.open(mask_path).resize((SIZE // 2, SIZE)).save(mask_path)
    with pytest.raises(ValueError) as excinfo:
        MVTecDataset(own_copy, "fabric", split="test")
    message = _one_line(excinfo)
    assert str(mask_path) in message and f"32x{SIZE}" in message and f"{SIZE}x{SIZE}" in message
    lazy = MVTecDataset(own_copy, "fabric", split="test", verify=False)  # then it fails when read
    index = next(i for i, s in enumerate(lazy.samples) if s.mask == mask_path)
    with pytest.raises(ValueError, match=re.escape(str(mask_path))):
        lazy[index]


# ----------------------------------------------------------------------------------------------------
# Colour modes, BTAD and the generic folder layout.


def _write_modes(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    grey = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (16, 1))
    expected = {}
    Image.fromarray(grey, mode="L").save(folder / "grey.png")
    expected["grey"] = np.repeat(grey[..., None], 3, axis=2)
    Image.fromarray(grey, mode="L").convert("P").save(folder / "palette.png")
    expected["palette"] = expected["grey"]
    rgba = np.dstack([grey, grey // 2, 255 - grey, np.full_like(grey, 200)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    expected["rgba"] = rgba[..., :3]
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen.png")  # 16-bit grey
    expected["sixteen"] = expected["grey"]
    return expected


def test_grey_palette_rgba_and_16_bit_become_rgb(tmp_path):
    expected = _write_modes(tmp_path / "modes")
    dataset = FolderDataset(tmp_path / "modes", size=16)
    assert len(dataset) == 4
    for item in dataset:
        assert item["image"].shape == (3, 16, 16)
        got = denormalize(item["image"]).astype(int)
        assert np.abs(got - expected[Path(item["path"]).stem]).max() <= 1, item["path"]


def test_btad_layout(tmp_path):
    root = tmp_path / "btad"
    rng = np.random.default_rng(0)
    pixels = lambda: rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)  # noqa: E731
    for split, kind in (("train", "ok"), ("test", "ok"), ("test", "ko")):
        (root / "01" / split / kind).mkdir(parents=True)
    (root / "01/ground_truth/ko").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(pixels()).save(root / f"01/train/ok/{i:04d}.bmp")
    Image.fromarray(pixels()).save(root / "01/test/ok/0000.bmp")
    for i, ext in enumerate((".bmp", ".png")):
        Image.fromarray(pixels()).save(root / f"01/test/ko/{i:04d}{ext}")
        mask = np.zeros((20, 30), dtype=np.uint8)
        mask[5:10, 5 + 10 * i : 12 + 10 * i] = 255
        Image.fromarray(mask).save(root / f"01/ground_truth/ko/{i:04d}{'.png' if i == 0 else '.bmp'}")
    train = BTADDataset(root, "01", split="train", size=(20, 30))
    test = BTADDataset(root, "01", split="test", size=(20, 30))
    assert len(train) == 3 and not train.augment
    assert test.labels == [0, 1, 1]
    assert [int(item["mask"].sum()) for item in test] == [0, 35, 35]
    with pytest.raises(ValueError, match="unknown category '04'"):
        BTADDataset(root, "04")
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "02"))):
        BTADDataset(root, "02")
    (root / "01/ground_truth/ko/0001.bmp").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "01/ground_truth/ko/0001"))):
        BTADDataset(root, "01", split="test")


def test_folder_layout(tmp_path):
    rng = np.random.default_rng(1)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
    mask = np.zeros((24, 24), dtype=np.uint8)
    mask[2:6, 2:6] = 1  # stored as 0/1
    Image.fromarray(mask).save(masks / "a_mask.png")
    Image.fromarray(mask * 255).save(masks / "c.png")
    Image.fromarray(mask * 255).save(masks / "orphan.png")
    with pytest.warns(UserWarning, match="1 mask.*orphan.png"):
        test = FolderDataset(images, split="test", mask_dir=masks, size=24)
    assert test.labels == [1, 0, 1]
    assert [int(item["mask"].sum()) for item in test] == [16, 0, 16]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unknown = FolderDataset(images, split="test", size=24)
    assert unknown.labels == [-1, -1, -1] and unknown[0]["mask"].sum() == 0
    train = FolderDataset(images, size=24, texture=True, generator=torch.Generator().manual_seed(0))
    assert train.augment and train.labels == [0, 0, 0]
    with pytest.raises(ValueError, match="pass mask_dir only with split='test'"):
        FolderDataset(images, split="train", mask_dir=masks)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nomasks"))):
        FolderDataset(images, split="test", mask_dir=tmp_path / "nomasks")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))):
        (tmp_path / "empty").mkdir()
        FolderDataset(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------
# Bit depth (NOTE [bit depth] in data/_io.py), masks, and images too large to open.


def _grey(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values).save(path)
    return path


def _write_rgb_png(path: Path, width: int, height: int, bits: int, scanlines: bytes) -> Path:
    """An RGB PNG written chunk by chunk: Pillow writes neither 16 bits per channel nor a size it cannot open."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bits, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
                     + chunk(b"IEND", b""))
    return path


def _png_48_bit(path: Path, value: int, size: int = 4) -> Path:
    """A 16-bit-per-channel RGB PNG, every sample ``value``."""
    row = b"\x00" + np.full((size, 3), value, dtype=">u2").tobytes()
    return _write_rgb_png(path, size, size, 16, row * size)


def _pixel(image: Image.Image) -> int:
    values = np.asarray(image)
    assert values.shape[2] == 3 and (values == values[0, 0, 0]).all()
    return int(values[0, 0, 0])


def test_16_bit_images_are_scaled_by_the_file_depth_not_their_maximum(tmp_path):
    from pyramidflow.data._io import load_rgb

    at_255 = _grey(tmp_path / "max255.png", np.full((4, 4), 255, dtype=np.uint16))
    at_256 = _grey(tmp_path / "max256.png", np.full((4, 4), 256, dtype=np.uint16))
    full = _grey(tmp_path / "full.png", np.full((4, 4), 65535, dtype=np.uint16))
    assert Image.open(at_255).mode == "I;16"
    assert _pixel(load_rgb(at_255, "t")) == _pixel(load_rgb(at_256, "t")) == 1  # 255 / 65535 and 256 / 65535 of white
    assert _pixel(load_rgb(full, "t")) == 255


def test_a_stated_bit_depth_makes_12_bit_data_full_range(tmp_path):
    from pyramidflow.data._io import load_rgb

    twelve = _grey(tmp_path / "twelve.png", np.full((4, 4), 4095, dtype=np.uint16))
    assert _pixel(load_rgb(twelve, "t")) == 16  # as a 16-bit file: 4095 / 65535 of white
    assert _pixel(load_rgb(twelve, "t", bit_depth=12)) == 255
    assert _pixel(load_rgb(_grey(tmp_path / "half.png", np.full((4, 4), 2048, dtype=np.uint16)), "t", 12)) == 128
    eight = tmp_path / "eight.png"
    Image.new("L", (4, 4), 200).save(eight)
    assert _pixel(load_rgb(eight, "t", bit_depth=12)) == 200  # 8-bit files are read as they are


def test_values_beyond_the_stated_bit_depth_are_refused(tmp_path):
    from pyramidflow.data._io import load_rgb

    path = _grey(tmp_path / "bright.png", np.full((4, 4), 5000, dtype=np.uint16))
    with pytest.raises(ValueError, match=re.escape(f"t: {path} holds pixel values up to 5000") + r".*12-bit range 0\.\.4095"):
        load_rgb(path, "t", bit_depth=12)


@pytest.mark.parametrize("bit_depth", [7, 17, 12.0, True, "12"])
def test_bit_depth_must_be_an_int_from_8_to_16(tmp_path, bit_depth, synthetic_root):
    with pytest.raises(ValueError, match=r"bit_depth \(--bit-depth\) must be .* an int from 8 to 16"):
        MVTecDataset(synthetic_root, "nut", split="train", size=SIZE, bit_depth=bit_depth)


def test_a_data_set_reads_its_16_bit_images_at_its_bit_depth(tmp_path):
    folder = tmp_path / "twelve"
    folder.mkdir()
    _grey(folder / "a.png", np.full((8, 8), 4095, dtype=np.uint16))
    dataset = FolderDataset(folder, size=8, bit_depth=12)
    assert dataset.bit_depth == 12 and (denormalize(dataset[0]["image"]) == 255).all()
    assert (denormalize(FolderDataset(folder, size=8)[0]["image"]) == 16).all()


def test_16_bit_colour_files_refuse_a_bit_depth_below_16(tmp_path):
    from pyramidflow.data._io import load_rgb

    path = _png_48_bit(tmp_path / "colour48.png", 65535)
    assert _pixel(load_rgb(path, "t")) == 255 and _pixel(load_rgb(path, "t", bit_depth=16)) == 255
    with pytest.raises(ValueError, match=re.escape(f"t: {path} is a 16-bit colour image") + ".*bit_depth=12 cannot be applied"):
        load_rgb(path, "t", bit_depth=12)


def test_float_images_must_be_in_0_1_and_32_bit_integers_need_a_bit_depth(tmp_path):
    from pyramidflow.data._io import load_rgb

    unit = tmp_path / "unit.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(unit)
    assert _pixel(load_rgb(unit, "t")) == 128
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.full((4, 4), 3.0, dtype=np.float32)).save(wide)
    with pytest.raises(ValueError, match=re.escape(f"t: {wide} holds float pixels in [3, 3]") + r".*must be in \[0, 1\]"):
        load_rgb(wide, "t")
    integers = tmp_path / "int32.tif"
    Image.fromarray(np.full((4, 4), 4095, dtype=np.int32)).save(integers)
    with pytest.raises(ValueError, match=re.escape(f"t: {integers} holds 32-bit integer pixels") + ".*--bit-depth"):
        load_rgb(integers, "t")
    assert _pixel(load_rgb(integers, "t", bit_depth=12)) == 255


@pytest.mark.parametrize("marked", [
    np.uint8(100),  # a mask marked 100: under the old 127 cut-off
    np.uint8(2),  # a label image's class 2
    np.uint16(1),  # a 16-bit 0/1 mask
])
def test_any_non_zero_mask_pixel_is_a_defect(tmp_path, marked):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(images / "a.png")
    mask = np.zeros((16, 16), dtype=np.asarray(marked).dtype)
    mask[2:6, 3:8] = marked
    Image.fromarray(mask).save(masks / "a.png")
    [item] = FolderDataset(images, split="test", mask_dir=masks, size=16)
    assert item["label"] == 1 and int(item["mask"].sum()) == 20
    assert torch.equal(item["mask"][0] > 0, torch.from_numpy(mask > 0))


def test_an_empty_mask_of_a_defect_image_warns_naming_the_file(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    Image.new("L", (16, 16), 0).save(masks / "a.png")
    dataset = FolderDataset(images, split="test", mask_dir=masks, size=16)
    with pytest.warns(UserWarning, match=re.escape(f"mask {masks / 'a.png'} of defect image {images / 'a.png'} is empty")) as caught:
        dataset[0]
    assert caught[0].filename == __file__  # stacklevel=2: the caller's line


def _too_large_png(path: Path) -> Path:
    """A 20000 x 10000 PNG header (the pixel data are never reached)."""
    return _write_rgb_png(path, 20000, 10000, 8, b"\x00" * 64)


def test_an_image_too_large_to_open_is_one_value_error_naming_it(tmp_path):
    from pyramidflow.data._io import _header_size, load_rgb

    path = _too_large_png(tmp_path / "huge.png")
    for read in (_header_size, load_rgb):
        with pytest.raises(ValueError, match=re.escape(f"t: image {path} is too large to open") + ".*downscale or crop it"):
            read(path, "t")
