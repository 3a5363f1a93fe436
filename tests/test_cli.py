"""The command line end to end on synthetic data, and its one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyramidflow.cli import main
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.metrics import pixel_auroc

SIZE = 64
SMALL = ["--channels", "4", "--kernel-size", "3", "--stacks", "2", "--levels", "3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=1, size=SIZE, num_train=8, num_test=2)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                   "--steps", "4", "--device", "cpu", *SMALL])
    assert status == 0
    return out / "checkpoint.pt"


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_train_eval_predict(trained, data_root, tmp_path, capsys):
    assert trained.is_file()
    assert main(["eval", "--checkpoint", str(trained), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path / "eval"), "--device", "cpu", "--smooth", "1"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("pixel_auroc", "image_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["per_defect_type"]) == set(synthetic.DEFECT_TYPES)
    panels = sorted((tmp_path / "eval" / "overlays").rglob("*.png"))
    assert len(panels) == metrics["num_images"] and Image.open(panels[0]).mode == "RGB"
    assert "pixel AUROC" in capsys.readouterr().out

    images = data_root / "nut" / "test" / "spot"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(tmp_path / "pred"), str(images), "--device", "cpu"]) == 0
    scores = json.loads((tmp_path / "pred" / "predictions.json").read_text())["images"]
    assert len(scores) == len(list(images.iterdir()))
    assert len(list((tmp_path / "pred" / "maps").glob("*.png"))) == len(scores)
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == len(scores)
    assert len(list((tmp_path / "pred" / "overlays").rglob("*.png"))) == len(scores)


def test_synth_writes_the_mvtec_layout(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--size", "32", "--seed", "3"]) == 0
    for category in synthetic.CATEGORIES:
        assert any((tmp_path / category / "train" / "good").iterdir())
        assert (tmp_path / category / "ground_truth").is_dir()


def test_missing_data_folder(tmp_path, capsys):
    status = main(["train", "--data", str(tmp_path / "nowhere"), "--category", "nut", "--out", str(tmp_path / "o"), "--steps", "1"])
    assert status != 0
    assert "nowhere" in _error_line(capsys)


def test_size_not_divisible(data_root, tmp_path, capsys):
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path), "--size", "60", "--steps", "1"])
    assert status != 0
    assert "--size 64" in _error_line(capsys)


def test_truncated_image_is_named(data_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root / "nut", root / "nut")
    victim = sorted((root / "nut" / "train" / "good").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    status = main(["train", "--data", str(root), "--category", "nut", "--out", str(tmp_path / "o"), "--size", str(SIZE),
                   "--steps", "8", "--device", "cpu", *SMALL])
    assert status != 0
    assert victim.name in _error_line(capsys)


def test_resume_with_another_config_is_refused(trained, data_root, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained, out / "checkpoint.pt")
    args = ["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE), "--steps", "6",
            "--device", "cpu", "--resume", *SMALL]
    args[args.index("--channels") + 1] = "8"
    assert main(args) != 0
    assert "channels" in _error_line(capsys)


def test_eval_of_unknown_checkpoint(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), "--data", str(tmp_path), "--category", "nut", "--out", str(tmp_path / "e")]) != 0
    assert str(bad) in _error_line(capsys)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--size", "32", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["categories"]) == set(synthetic.CATEGORIES)
    for key in ("pixel_auroc", "image_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    for category in synthetic.CATEGORIES:
        assert (tmp_path / category / "checkpoint.pt").is_file()
        assert any((tmp_path / category / "overlays").rglob("*.png"))


@pytest.mark.slow
def test_short_training_beats_the_mean_image_baseline_on_the_texture(tmp_path):
    """PyramidFlow's maps must beat the per-pixel distance to the mean training image (issue 4)."""
    size, category = 64, synthetic.TEXTURES[0]
    root = synthetic.generate(tmp_path / "data", seed=2, size=size, categories=(category,), num_train=16, num_test=3)
    assert main(["train", "--data", str(root), "--category", category, "--out", str(tmp_path / "run"), "--size", str(size),
                 "--steps", "60", "--device", "cpu", "--channels", "8", "--kernel-size", "5", "--volume-norm", "SVN"]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data", str(root),
                 "--category", category, "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    ours = json.loads((tmp_path / "eval" / "metrics.json").read_text())["pixel_auroc"]

    train = MVTecDataset(root, category, split="train", size=size, augment=False)
    test = MVTecDataset(root, category, split="test", size=size)
    mean = torch.stack([item["image"] for item in train]).mean(dim=0)
    maps = np.stack([(item["image"] - mean).norm(dim=0).numpy() for item in test])
    masks = np.stack([item["mask"][0].numpy() for item in test])
    baseline = pixel_auroc(maps, masks)
    print(f"pixel AUROC: PyramidFlow {ours:.4f}, mean-image baseline {baseline:.4f}")
    assert ours > baseline, (ours, baseline)
