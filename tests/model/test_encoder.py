"""The ResNet18 encoder variant: the stem's maths, its weights (local file, imagenet), freezing, config and
sizes; then end to end through the CLI: train / eval / predict with random local weights, the checkpoint
carrying the encoder, bit-for-bit resume, and the one-line errors.

Everything runs offline: weights are random ones saved to a temporary file, and the ``imagenet``
path is exercised with a stand-in torchvision module.
"""

import json
import sys
import types
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pyramidflow.checkpoint import load_checkpoint
from pyramidflow.cli import main
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.inference.maps import load_for_inference
from pyramidflow.model import PyramidFlow, PyramidFlowConfig, anomaly_map, fourier_loss, laplacian_compose
from pyramidflow.model.encoder import ResNet18Stem, build_encoder, encoder_skeleton, load_encoder_weights
from pyramidflow.train import TrainConfig, train

TINY = dict(kernel_size=3, num_stacks=1, num_levels=2, hidden_channels=8)


def _random_bn(stem):
    """Non-trivial running statistics and affine parameters, so that eval-mode batch norm is tested."""
    with torch.no_grad():
        for module in stem.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return stem


@pytest.fixture
def weights_file(tmp_path):
    """Random stem weights in torchvision's full-resnet18 layout (plus keys of later stages, to be ignored)."""
    torch.manual_seed(3)
    state = _random_bn(ResNet18Stem()).state_dict()
    state["layer2.0.conv1.weight"] = torch.randn(128, 64, 3, 3)
    state["fc.weight"] = torch.randn(1000, 512)
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)
    return path


def _stem_by_hand(stem, x):
    """ResNet18 up to layer1 from torch.nn.functional primitives, in the published order."""

    def bn(module, y):
        return F.batch_norm(y, module.running_mean, module.running_var, module.weight, module.bias, training=False,
                            eps=module.eps)

    y = F.relu(bn(stem.bn1, F.conv2d(x, stem.conv1.weight, stride=2, padding=3)))
    y = F.max_pool2d(y, 3, stride=2, padding=1)
    for block in stem.layer1:
        h = F.relu(bn(block.bn1, F.conv2d(y, block.conv1.weight, padding=1)))
        y = F.relu(y + bn(block.bn2, F.conv2d(h, block.conv2.weight, padding=1)))
    return y


# -- the stem ----------------------------------------------------------------------------------------


def test_stem_quarter_resolution_64_channels():
    assert ResNet18Stem()(torch.randn(2, 3, 64, 96)).shape == (2, 64, 16, 24)


def test_stem_equals_resnet18_written_out():
    stem = _random_bn(ResNet18Stem()).double()
    x = torch.randn(2, 3, 40, 56, dtype=torch.float64)
    torch.testing.assert_close(stem(x), _stem_by_hand(stem, x), rtol=1e-12, atol=1e-12)


def test_stem_equals_torchvision_resnet18(tmp_path):
    """Needs an importable torchvision (the encoders extra); skipped where it is absent or does not fit torch."""
    try:
        from torchvision.models import resnet18
    except Exception as error:  # ImportError, or RuntimeError from a torchvision built for another torch
        pytest.skip(f"torchvision not usable here: {type(error).__name__}")
    reference = _random_bn(resnet18()).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pt")
    stem = load_encoder_weights(ResNet18Stem(), tmp_path / "resnet18.pt")
    x = torch.randn(1, 3, 64, 64)
    expected = reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(x)))))
    torch.testing.assert_close(stem(x), expected, rtol=1e-5, atol=1e-5)


# -- weights -----------------------------------------------------------------------------------------


def test_full_resnet18_state_dict_loads(weights_file):
    stem = build_encoder("resnet18", str(weights_file))
    saved = torch.load(weights_file, weights_only=True)
    for key, value in stem.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_stem_only_state_dict_without_batch_counters_loads(tmp_path):
    source = _random_bn(ResNet18Stem())
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "stem.pt")
    stem = build_encoder("resnet18", tmp_path / "stem.pt")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(stem(x), source(x), rtol=0, atol=0)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt.*'imagenet'"):
        build_encoder("resnet18", tmp_path / "nowhere.pt")


def test_weights_of_another_network_are_refused(tmp_path):
    torch.save({"conv1.weight": torch.randn(64, 3, 7, 7)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt: not a ResNet18 state dict, it lacks bn1.weight"):
        build_encoder("resnet18", tmp_path / "partial.pt")
    state = ResNet18Stem().state_dict()
    state["conv1.weight"] = torch.randn(32, 3, 7, 7)
    torch.save(state, tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"conv1.weight is \(32, 3, 7, 7\) but ResNet18 has \(64, 3, 7, 7\)"):
        build_encoder("resnet18", tmp_path / "narrow.pt")


def test_unreadable_weights_file_is_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read .*junk.pt"):
        build_encoder("resnet18", tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt holds a list, not a state dict"):
        build_encoder("resnet18", tmp_path / "list.pt")


def _fake_torchvision(monkeypatch, get_state_dict):
    weights = types.SimpleNamespace(IMAGENET1K_V1=types.SimpleNamespace(get_state_dict=get_state_dict))
    models = types.ModuleType("torchvision.models")
    models.ResNet18_Weights = weights
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def test_imagenet_takes_torchvisions_weights(monkeypatch):
    source = _random_bn(ResNet18Stem())
    calls = []
    _fake_torchvision(monkeypatch, lambda progress: calls.append(progress) or source.state_dict())
    stem = build_encoder("resnet18", "imagenet")
    assert calls == [False]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(stem(x), source(x), rtol=0, atol=0)


def test_imagenet_offline_names_the_path_option(monkeypatch):
    def offline(progress):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    _fake_torchvision(monkeypatch, offline)
    with pytest.raises(RuntimeError, match="cannot download .*name resolution.*encoder_weights=PATH") as info:
        build_encoder("resnet18", "imagenet")
    assert "\n" not in str(info.value)


def test_imagenet_without_torchvision_names_the_extra_and_the_path_option(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(RuntimeError, match=r"needs a torchvision.*\[encoders\].*encoder_weights=PATH"):
        build_encoder("resnet18", "imagenet")


# -- config ------------------------------------------------------------------------------------------


def test_config_without_weights_names_both_options():
    with pytest.raises(ValueError, match="encoder='resnet18' needs encoder_weights: 'imagenet'.*PATH"):
        PyramidFlowConfig(encoder="resnet18")


def test_config_checks(tmp_path):
    config = PyramidFlowConfig(encoder="resnet18", encoder_weights=tmp_path / "w.pt")
    assert (config.channels, config.input_stride, config.size_multiple) == (64, 4, 32)
    assert config.encoder_weights == str(tmp_path / "w.pt")  # a plain str: checkpoints load weights_only
    assert (PyramidFlowConfig().channels, PyramidFlowConfig().size_multiple) == (16, 8)
    with pytest.raises(ValueError, match="channels=16; set channels=64"):
        PyramidFlowConfig(encoder="resnet18", encoder_weights="imagenet", channels=16)
    with pytest.raises(ValueError, match="encoder='none'"):
        PyramidFlowConfig(encoder_weights="imagenet")
    with pytest.raises(ValueError, match="encoder must be one of"):
        PyramidFlowConfig(encoder="resnet50", encoder_weights="imagenet")


def test_model_builds_the_config_encoder(weights_file):
    model = PyramidFlow(PyramidFlowConfig(encoder="resnet18", encoder_weights=str(weights_file), **TINY))
    assert isinstance(model.encoder, ResNet18Stem) and model.lift is None
    latents = model(torch.randn(2, 3, 32, 48))
    assert [tuple(z.shape) for z in latents] == [(2, 64, 8, 12), (2, 64, 4, 6)]


def test_image_size_error_names_the_nearest_valid_size(weights_file):
    model = PyramidFlow(PyramidFlowConfig(encoder="resnet18", encoder_weights=str(weights_file), **TINY))
    with pytest.raises(ValueError, match="divisible by 4·2\\*\\*1 \\(the encoder's stride 4\\) = 8; the nearest valid size is 40×32"):
        model(torch.randn(1, 3, 36, 32))


def test_encoder_stays_frozen_through_a_training_step(weights_file):
    model = PyramidFlow(PyramidFlowConfig(encoder="resnet18", encoder_weights=str(weights_file), **TINY)).train()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert not model.encoder.training and not any(p.requires_grad for p in model.encoder.parameters())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    fourier_loss(model(torch.randn(2, 3, 32, 32))).backward()
    optimizer.step()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"  # running stats and counters included
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.flow.blocks[0].net.conv_out.weight.grad is not None


def test_skeleton_has_random_weights_to_load_into():
    assert encoder_skeleton("none") is None
    assert isinstance(encoder_skeleton("resnet18"), ResNet18Stem)


# -- anomaly maps at the image's size ------------------------------------------------------------------


def test_anomaly_map_upsamples_to_the_image_size():
    latents = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4))
    template = tuple(torch.randn(1, 3, z.shape[-2], z.shape[-1]) for z in latents)
    at_features = anomaly_map(latents, template)
    expected = laplacian_compose([(z - t).abs().mean(1, keepdim=True) for z, t in zip(latents, template)])
    torch.testing.assert_close(at_features, expected)
    upsampled = anomaly_map(latents, template, (32, 32))
    assert upsampled.shape == (2, 1, 32, 32)
    torch.testing.assert_close(upsampled, F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False))
    torch.testing.assert_close(anomaly_map(latents, template, (8, 8)), expected)


# -- end to end through the CLI ---------------------------------------------------------------------

SIZE = 64  # features 16 × 16 × 64
TINY_FLAGS = ["--levels", "2", "--stacks", "1", "--kernel-size", "3"]


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
                 *TINY_FLAGS]) == 0
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
                   "--steps", "1", "--encoder", "resnet18", *TINY_FLAGS])
    assert status != 0
    line = _error_line(capsys)
    assert "'imagenet'" in line and "PATH" in line


def test_missing_weights_file_is_one_line_naming_it(data_root, tmp_path, capsys):
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path / "o"), "--size",
                   str(SIZE), "--steps", "1", "--encoder", "resnet18", "--encoder-weights", str(tmp_path / "gone.pt"),
                   *TINY_FLAGS])
    assert status != 0
    assert "gone.pt" in _error_line(capsys)


def test_size_must_fit_the_encoder_stride(data_root, tmp_path, capsys):
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path), "--size", "60",
                   "--steps", "1", "--encoder", "resnet18", "--encoder-weights", "imagenet", *TINY_FLAGS])
    assert status != 0
    assert "--size: image size 60×60" in (line := _error_line(capsys)) and "divisible by 4·2**1 (the encoder's stride 4) = 8" in line


def test_size_hint_is_the_nearest_valid_size(data_root, tmp_path, capsys):
    """90 px with 8 px steps (stride 4, two levels): 88 is nearer than 96 (rounding to the stride first gave 96)."""
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path), "--size", "90",
                   "--steps", "1", "--encoder", "resnet18", "--encoder-weights", "imagenet", *TINY_FLAGS])
    assert status != 0
    assert "the nearest valid size is 88×88" in _error_line(capsys)
