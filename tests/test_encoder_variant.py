"""The ResNet18 variant end to end, offline: train / eval / predict through the CLI with random local
weights, the checkpoint carrying the encoder, bit-for-bit resume, and the one-line errors."""

import json

import pytest
import torch
from PIL import Image

from pyramidflow.checkpoint import load_checkpoint
from pyramidflow.cli import main
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.inference.maps import load_for_inference
from pyramidflow.model import PyramidFlowConfig
from pyramidflow.model.encoder import ResNet18Stem
from pyramidflow.train import TrainConfig, train

SIZE = 64  # features 16 × 16 × 64
TINY = ["--levels", "2", "--stacks", "1", "--kernel-size", "3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=2, size=SIZE, categories=["nut"], num_train=8,
                              num_test=1)


def _random_weights(path):
    torch.manual_seed(5)
    stem = ResNet18Stem()
    with torch.no_grad():
        stem.bn1.running_mean.normal_(0.0, 0.1)  # non-default statistics: checked to survive the round trip
    torch.save(stem.state_dict(), path)
    return path


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_train_eval_predict_with_random_local_weights(data_root, tmp_path, capsys):
    weights = _random_weights(tmp_path / "resnet18.pt")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "2", "--device", "cpu", "--encoder", "resnet18", "--encoder-weights", str(weights),
                 *TINY]) == 0
    saved = torch.load(weights, weights_only=True)
    weights.unlink()  # eval and predict must not need the file: the checkpoint carries the encoder

    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt.model_config["encoder"], ckpt.model_config["encoder_weights"]) == ("resnet18", str(weights))
    assert ckpt.model_config["channels"] == 64
    assert torch.equal(ckpt.model["encoder.bn1.running_mean"], saved["bn1.running_mean"])
    assert tuple(ckpt.template[0].shape) == (1, 64, SIZE // 4, SIZE // 4)

    inference = load_for_inference(out / "checkpoint.pt", torch.device("cpu"))
    assert inference.image_size == (SIZE, SIZE)
    assert torch.equal(inference.model.encoder.conv1.weight, saved["conv1.weight"])
    assert not inference.model.encoder.training

    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("pixel_auroc", "image_auroc", "aupro"))

    images = data_root / "nut" / "test" / "spot"
    assert main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "pred"), str(images),
                 "--device", "cpu"]) == 0
    maps = sorted((tmp_path / "pred" / "maps").glob("*.png"))
    assert maps and Image.open(maps[0]).size == (SIZE, SIZE)  # upsampled from the 16 × 16 features


def test_resume_with_an_encoder_is_bit_for_bit(tmp_path):
    weights = str(_random_weights(tmp_path / "w.pt"))
    config = PyramidFlowConfig(encoder="resnet18", encoder_weights=weights, kernel_size=3, num_stacks=1, num_levels=2,
                               hidden_channels=8)
    root = synthetic.generate(tmp_path / "data", size=32, categories=["fabric"], num_train=4, num_test=1)
    data = MVTecDataset(root, "fabric", split="train", size=32)

    def settings(steps):
        return TrainConfig(steps=steps, checkpoint_every=None, log_every=1, device="cpu", dtype="float64",
                           calibration_fraction=0.0)  # 4 images: too few to hold out 4

    straight = train(config, settings(4), data, tmp_path / "straight", progress=False)
    train(config, settings(2), data, tmp_path / "resumed", progress=False)
    resumed = train(config, settings(4), data, tmp_path / "resumed", resume=True, progress=False)
    assert straight.losses == resumed.losses
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_encoder_without_weights_is_one_line_naming_both_options(data_root, tmp_path, capsys):
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path), "--size", str(SIZE),
                   "--steps", "1", "--encoder", "resnet18", *TINY])
    assert status != 0
    line = _error_line(capsys)
    assert "'imagenet'" in line and "PATH" in line


def test_missing_weights_file_is_one_line_naming_it(data_root, tmp_path, capsys):
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path / "o"), "--size",
                   str(SIZE), "--steps", "1", "--encoder", "resnet18", "--encoder-weights", str(tmp_path / "gone.pt"),
                   *TINY])
    assert status != 0
    assert "gone.pt" in _error_line(capsys)


def test_size_must_fit_the_encoder_stride(data_root, tmp_path, capsys):
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path), "--size", "60",
                   "--steps", "1", "--encoder", "resnet18", "--encoder-weights", "imagenet", *TINY])
    assert status != 0
    assert "--size: image size 60×60" in (line := _error_line(capsys)) and "divisible by 4·2**1 (the encoder's stride 4) = 8" in line


def test_size_hint_is_the_nearest_valid_size(data_root, tmp_path, capsys):
    """90 px with 8 px steps (stride 4, two levels): 88 is nearer than 96 (rounding to the stride first gave 96)."""
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path), "--size", "90",
                   "--steps", "1", "--encoder", "resnet18", "--encoder-weights", "imagenet", *TINY])
    assert status != 0
    assert "the nearest valid size is 88×88" in _error_line(capsys)
