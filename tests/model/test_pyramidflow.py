"""The whole model: layout, parameter count, reconstruction, engine modes, loss, template and anomaly map."""

import copy

import pytest
import torch
from torch import nn

from pyramidflow.model import (
    PyramidFlow,
    PyramidFlowConfig,
    anomaly_map,
    fit_template,
    fourier_loss,
    image_score,
    laplacian_compose,
    stack_layout,
)

from model._counting import CountedNetwork


def perturb(model, std=0.01):
    """Move every coupling away from its identity init so the flow is not a rotation.

    The std is per weight; with the default C = 16, k = 7 (fan-in 1568) 0.01 gives raw log-scales
    of order 1. Much larger values saturate the clamp in every block and make the 16-block map so
    ill-conditioned that float32 cannot invert it to 1e-4 (float64 still does, to 1e-12).
    """
    with torch.no_grad():
        for block in model.flow.blocks:
            block.net.conv_out.weight.normal_(0.0, std)
            block.conv.log_diagonal.normal_(0.0, 0.2)
    return model


def small(**overrides):
    settings = dict(channels=4, kernel_size=3, num_stacks=2, num_levels=3)
    settings.update(overrides)
    return PyramidFlowConfig(**settings)


# -- layout and size -------------------------------------------------------------------------------


def expected_counts(config):
    """Trainable parameters from the method's formulas (Sec. 3.2), independent of the model code."""
    c, k, levels = config.channels, config.kernel_size, config.num_levels
    hidden = 2 * c
    starts = list(range(0, levels, 2)) + list(range(1, levels, 2))
    three = sum(1 for s in starts if s + 2 < levels)
    two = sum(1 for s in starts if not s + 2 < levels and s + 1 < levels) + 1  # + the "up" block on (0, 1)

    def network(in_channels):  # conv k×k in -> hidden, conv k×k hidden -> 2C, no biases
        return in_channels * hidden * k * k + hidden * 2 * c * k * k

    conv1x1 = c * c  # strict lower + strict upper + log-diagonal
    per_stack = three * (network(2 * c) + conv1x1) + two * (network(c) + conv1x1)
    return config.num_stacks * per_stack, 3 * c


@pytest.mark.parametrize("num_levels", [2, 4, 8])
def test_parameter_count_shapes_and_layout(num_levels):
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, num_levels=num_levels)
    model = PyramidFlow(config)
    trainable, frozen = expected_counts(config)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == frozen
    blocks = list(model.flow.blocks)
    per_stack = len(stack_layout(num_levels))
    assert len(blocks) == 2 * per_stack
    assert sorted(b.level for b in blocks[:per_stack]) == list(range(num_levels)), "each level once per stack"
    with torch.no_grad():
        latents = model(torch.randn(2, 3, 128, 128))
    assert [tuple(z.shape) for z in latents] == [(2, 4, 128 // 2**i, 128 // 2**i) for i in range(num_levels)]


def test_layout_follows_the_method():
    assert stack_layout(2) == [("down", 0), ("up", 0)]
    assert stack_layout(3) == [("three", 0), ("up", 0), ("down", 1)]
    assert stack_layout(8) == [("three", 0), ("three", 2), ("three", 4), ("down", 6), ("up", 0),
                               ("three", 1), ("three", 3), ("three", 5)]


def test_bad_image_size_names_nearest_valid_size():
    model = PyramidFlow(small(num_levels=4))
    with pytest.raises(ValueError, match="nearest valid size is 32×40"):
        model(torch.randn(1, 3, 30, 37))


# -- reconstruction --------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_model_reconstructs_images(training):
    model = perturb(PyramidFlow(PyramidFlowConfig(num_levels=4, num_stacks=4)))  # C = 16, k = 7
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        model.train()
        model(images)  # a training step sets the running means
        model.train(training)
        latents = model(images)
        rebuilt = model.inverse(latents)
    features = model.pyramid.decompose(model.features(images))
    assert (latents[0] - features[0]).norm() > features[0].norm(), "the flow must not be near the identity"
    error = ((rebuilt - images).norm() / images.norm()).item()
    assert error <= 1e-4


# -- volume normalisation at another resolution -------------------------------------------------------


def test_cvn_eval_at_another_resolution_raises():
    model = PyramidFlow(small())
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
        model.eval()
        model(torch.randn(1, 3, 16, 16))
        with pytest.raises(ValueError, match="trained at 16×16"):
            model(torch.randn(1, 3, 32, 32))
        fresh = PyramidFlow(small())  # a lazily sized CVN running mean loads from a state dict
        fresh.load_state_dict(model.state_dict())
        images = torch.randn(1, 3, 16, 16)
        torch.testing.assert_close(fresh.eval()(images), model(images))
        model.reset_running_stats()
        model(torch.randn(1, 3, 32, 32))


def test_svn_eval_at_another_resolution_runs():
    model = PyramidFlow(small(volume_norm="SVN"))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
        model.eval()
        assert model(torch.randn(1, 3, 32, 32))[0].shape == (1, 4, 32, 32)


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, volume_norm, num_levels",
    [("carpet", "SVN", 8), ("grid", "SVN", 4), ("bottle", "SVN", 4), ("transistor", "SVN", 8),
     ("metal_nut", "CVN", 8), ("screw", "CVN", 2), ("leather", "CVN", 4), ("01", "CVN", 4), ("Carpet", "SVN", 8)],
)
def test_for_category(name, volume_norm, num_levels):
    config = PyramidFlowConfig.for_category(name)
    assert (config.volume_norm, config.num_levels, config.channels, config.num_stacks) == (volume_norm, num_levels, 16, 4)


def test_for_category_overrides_and_defaults():
    assert PyramidFlowConfig.for_category("screw", num_levels=3, channels=8).num_levels == 3
    config = PyramidFlowConfig()
    assert (config.channels, config.kernel_size, config.num_stacks, config.num_levels) == (16, 7, 4, 4)
    assert (config.volume_norm, config.mode, config.clamp, config.momentum, config.downsample) == (
        "CVN", "invertible", 2.0, 0.1, "max")


@pytest.mark.parametrize(
    "overrides, error, match",
    [(dict(kernel_size=4), ValueError, "kernel_size must be odd"), (dict(num_levels=1), ValueError, "num_levels"),
     (dict(volume_norm="BN"), ValueError, "volume_norm"), (dict(mode="fast"), ValueError, "mode"),
     (dict(clamp=0), ValueError, "clamp"), (dict(downsample="area"), ValueError, "downsample"),
     (dict(channels=2.5), TypeError, "channels must be an int")],
)
def test_config_validation(overrides, error, match):
    with pytest.raises(error, match=match):
        PyramidFlowConfig(**overrides)


def test_lift_needs_enough_channels():
    with pytest.raises(ValueError, match="at least in_channels"):
        PyramidFlow(PyramidFlowConfig(channels=2, num_levels=2))


def test_encoder_is_frozen_and_has_no_inverse():
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    model = PyramidFlow(small(), encoder=encoder)
    assert not any(p.requires_grad for p in encoder.parameters())
    model.train()
    assert not encoder.training
    images = torch.randn(2, 3, 16, 16)
    latents = model(images)
    with pytest.raises(NotImplementedError, match="inverse_features"):
        model.inverse(latents)
    with torch.no_grad():
        torch.testing.assert_close(model.inverse_features(latents), model.features(images), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        PyramidFlow(small(channels=8), encoder=nn.Conv2d(3, 4, 1))(torch.randn(1, 3, 16, 16))


# -- engine modes ----------------------------------------------------------------------------------


def _step(model, mode, images):
    model = copy.deepcopy(model)
    model.mode = mode
    model.train()
    fourier_loss(model(images)).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    means = [b.volume_norm.running_mean.clone() for b in model.flow.blocks]
    return grads, means


def _relative_error(a, b):
    num = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b))
    return (num / sum(float(y.double().square().sum()) for y in b)) ** 0.5


@pytest.mark.parametrize("perturbed", [False, True])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_modes_agree_float64(perturbed, volume_norm):
    model = PyramidFlow(small(volume_norm=volume_norm)).double()
    if perturbed:
        perturb(model, std=0.2)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reference, reference_means = _step(model, "autograd", images)
    for mode in ("invertible", "checkpoint"):
        grads, means = _step(model, mode, images)
        assert _relative_error(grads, reference) <= 1e-8, mode
        for a, b in zip(means, reference_means):
            assert torch.equal(a, b), f"{mode}: running means differ after one step"
    if perturbed:
        assert all(m.abs().sum() > 0 for m in reference_means), "one step must have moved every running mean"


def test_modes_agree_float32_within_autograd_error():
    model = perturb(PyramidFlow(small()), std=0.2)
    images = torch.randn(2, 3, 32, 32)
    reference, _ = _step(copy.deepcopy(model).double(), "autograd", images.double())
    errors = {mode: _relative_error(_step(model, mode, images)[0], reference) for mode in ("autograd", "invertible", "checkpoint")}
    assert 0 < errors["autograd"] < 1e-4
    assert errors["invertible"] <= 10 * errors["autograd"], errors
    assert errors["checkpoint"] <= 10 * errors["autograd"], errors


def test_invertible_mode_evaluates_each_network_twice_per_step():
    """Once in forward, once in backward (the fused reconstruct); the generic path would need three."""
    model = perturb(PyramidFlow(small()), std=0.2)
    counters = [CountedNetwork(block.net) for block in model.flow.blocks]
    images = torch.randn(2, 3, 16, 16)
    levels = model.pyramid.decompose(images)
    fourier_loss(model(images)).backward()
    for counter, block in zip(counters, model.flow.blocks):
        assert counter.evaluations(levels[block.level]) == 2, block


def test_mode_passes_through():
    model = PyramidFlow(small(mode="checkpoint"))
    assert model.mode == model.flow.mode == "checkpoint"
    model.mode = "autograd"
    assert model.flow.mode == "autograd"
    with pytest.raises(ValueError, match="mode"):
        model.mode = "fast"


# -- loss, template, anomaly map ---------------------------------------------------------------------


def test_fourier_loss_matches_a_slow_loop():
    latents = tuple(torch.randn(3, 2, 16 // 2**i, 16 // 2**i, dtype=torch.float64) for i in range(3))
    terms = []
    for a in range(3):
        for b in range(a + 1, 3):
            diffs = [(z[a:a + 1] - z[b:b + 1]) ** 2 for z in latents]
            pair_map = laplacian_compose(diffs).mean(dim=1)[0]
            terms.append(torch.fft.fft2(pair_map).abs().mean())
    torch.testing.assert_close(fourier_loss(latents), torch.stack(terms).mean())


def test_fourier_loss_edges():
    z = (torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="batch size of at least 2"):
        fourier_loss(z)
    same = tuple(torch.cat([x, x]) for x in z)
    assert fourier_loss(same).item() == 0.0


def test_template_anomaly_map_and_score():
    model = perturb(PyramidFlow(small()), std=0.2)
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        model(images[:2])  # one training step sets the running means
    batches = [images[:2], (images[2:4], "labels"), {"image": images[4:], "label": [0]}]
    template = fit_template(model, batches)
    assert model.training, "fit_template restores the training mode"
    model.eval()
    with torch.no_grad():
        latents = model(images)
    for level, t in zip(latents, template):
        assert t.shape == (1,) + level.shape[1:]
        torch.testing.assert_close(t, level.mean(dim=0, keepdim=True), rtol=1e-5, atol=1e-6)
    maps = anomaly_map(latents, template)
    assert maps.shape == (5, 1, 16, 16)
    expected = laplacian_compose([(z - t).abs().mean(dim=1, keepdim=True) for z, t in zip(latents, template)])
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(image_score(maps), maps.amax(dim=(1, 2, 3)))
    assert anomaly_map(template, template).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="no image"):
        fit_template(model, [])
    with pytest.raises(ValueError, match="levels"):
        anomaly_map(latents[:2], template)


def test_no_false_drift_warning_and_one_drift_per_block():
    """A healthy float32 model (fresh, and slightly perturbed) rebuilds far inside the default tolerance."""
    import warnings

    from pyramidflow import DriftWarning

    for std in (0.0, 0.01):
        torch.manual_seed(0)
        model = PyramidFlow(small())
        if std:
            perturb(model, std=std)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("error", DriftWarning)
            fourier_loss(model(torch.randn(2, 3, 32, 32))).backward()
        drifts = model.flow.last_drift
        assert len(drifts) == len(model.flow.blocks)
        assert max(drifts) < 1e-5, drifts
