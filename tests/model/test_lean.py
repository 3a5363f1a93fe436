"""The coupling's lean reconstruct ops against plain autograd, and the in-place rules they rely on."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pyramidflow.engine import InvertibleError
from pyramidflow.model import PyramidFlow, PyramidFlowConfig
from pyramidflow.model.lean import conditioning, recomputed_network, transformed_level
from pyramidflow.model.loss import objective_loss
from pyramidflow import kernels


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("sizes, target", [([(4, 4)], (8, 8)), ([(8, 8), (2, 2)], (4, 4)), ([(5, 7)], None)])
@pytest.mark.parametrize("chunks", [1, 3])
def test_recomputed_network_matches_plain_autograd(sizes, target, chunks):
    torch.manual_seed(0)
    parts = [torch.randn(3, 2, *s, dtype=torch.float64, requires_grad=True) for s in sizes]
    in_channels = 2 * len(parts)
    w_in = torch.randn(5, in_channels, 3, 3, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    upstream = None
    results = []
    for lean in (False, True):
        if lean:
            rt = recomputed_network(parts, target, w_in, w_out, 0.2, chunks)
        else:
            rt = F.conv2d(F.leaky_relu(F.conv2d(conditioning(parts, target), w_in, padding=1), 0.2), w_out, padding=1)
        upstream = torch.randn_like(rt) if upstream is None else upstream
        results.append((rt.detach(), *torch.autograd.grad(rt, [*parts, w_in, w_out], upstream)))
    for plain, lean in zip(*results):
        assert _relative(lean, plain) <= 1e-12


def _plain_level(x, rt, weight, kwargs):
    r, t = rt.chunk(2, dim=1)
    y, _ = kernels.affine_coupling(x, r, t, backend="reference", **kwargs)
    return F.conv2d(y, weight[:, :, None, None])


@pytest.mark.parametrize("volume_norm, training", [("CVN", True), ("SVN", True), ("CVN", False), (None, True)])
@pytest.mark.parametrize("storage_writable, gradient_writable", [(False, False), (True, False), (False, True), (True, True)])
def test_transformed_level_matches_plain_autograd(volume_norm, training, storage_writable, gradient_writable):
    torch.manual_seed(1)
    x_true = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    rt = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    weight = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0] + 0.1 * torch.randn(4, 4, dtype=torch.float64)
    running_mean = None if training or volume_norm is None else 0.1 * torch.randn(1, 1, 5, 6, dtype=torch.float64)
    kwargs = dict(volume_norm=volume_norm, clamp=2.0, running_mean=running_mean)
    grad_y = torch.randn(3, 4, 5, 6, dtype=torch.float64)

    leaves = [t.clone().requires_grad_(True) for t in (x_true, rt, weight)]
    y = _plain_level(*leaves, kwargs)
    expected = torch.autograd.grad(y, leaves, grad_y)

    rt_leaf, w_leaf = rt.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    y_given, g_given = y.detach().clone(), grad_y.clone()
    rt_in, w_in = rt_leaf * 1, w_leaf * 1  # fresh non-leaf tensors, as the block hands them over
    x, y_local = transformed_level(y_given, rt_in, w_in, torch.linalg.inv(weight), writable=(storage_writable, gradient_writable),
                                   affine_kwargs=dict(kwargs, backend="reference"))  # fmt: skip
    grads = torch.autograd.grad(y_local, [x, rt_leaf, w_leaf], g_given)
    assert _relative(x.detach(), x_true) <= 1e-12
    for got, want in zip(grads, expected):
        assert _relative(got, want) <= 1e-10
    # What was not writable is untouched (NOTE [writing in place in backward]).
    if not storage_writable:
        assert torch.equal(y_given, y.detach())
    if not gradient_writable:
        assert torch.equal(g_given, grad_y)


def _model(volume_norm, encoder_like=False):
    torch.manual_seed(0)
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, num_levels=3, volume_norm=volume_norm)
    model = PyramidFlow(config).double().train()
    with torch.no_grad():
        for block in model.flow.blocks:
            block.net.conv_out.weight.normal_(std=0.1)
    return model


def _step_grads(model, mode, images, release_outputs):
    model = copy.deepcopy(model)
    model.mode = mode
    latents, logdet = model(images, return_logdet=True, release_outputs=release_outputs)
    objective_loss(model.config.objective, latents, logdet).backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN", None])
@pytest.mark.parametrize("release_outputs", [False, True])
def test_model_gradients_equal_autograd_float64(volume_norm, release_outputs):
    model = _model(volume_norm)
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    reference = _step_grads(model, "autograd", images, False)
    grads = _step_grads(model, "invertible", images, release_outputs)
    assert max(_relative(g, r) for g, r in zip(grads, reference)) <= 1e-10


def test_kept_latents_are_unchanged_by_backward():
    """Without release_outputs, the latents the caller keeps read the same after backward."""
    model = _model("CVN")
    latents = model(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    before = [z.detach().clone() for z in latents]
    objective_loss("fourier", latents).backward()
    for z, b in zip(latents, before):
        assert torch.equal(z.detach(), b)


def test_a_gradient_shared_with_another_branch_stays_right():
    """``latent + other`` hands the very same gradient tensor to the flow and to ``other``: it must not be overwritten."""
    model = _model("CVN")
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    results = []
    for mode in ("autograd", "invertible"):
        m = copy.deepcopy(model)
        m.mode = mode
        leaf = torch.zeros(2, 4, 16, 16, dtype=torch.float64, requires_grad=True)
        # made before the flow runs, so autograd runs its backward after the flow's: it reads the shared gradient last
        other = leaf * 2.0
        latents = list(m(images))
        latents[0] = latents[0] + other
        objective_loss("fourier", latents).backward()
        results.append([leaf.grad] + [p.grad for p in m.parameters() if p.requires_grad])
    assert max(_relative(g, r) for g, r in zip(results[1], results[0])) <= 1e-10


def test_second_backward_after_giving_the_outputs_up_raises():
    model = _model("CVN")
    latents = model(torch.randn(2, 3, 16, 16, dtype=torch.float64), release_outputs=True)
    loss = objective_loss("fourier", latents)
    loss.backward(retain_graph=True)
    with pytest.raises(InvertibleError, match="given up"):
        loss.backward()


def test_output_changed_in_place_before_backward_still_raises_with_release():
    model = _model("CVN")
    latents = model(torch.randn(2, 3, 16, 16, dtype=torch.float64), release_outputs=True)
    loss = objective_loss("fourier", latents)
    with torch.no_grad():
        latents[1].add_(1.0)
    with pytest.raises(InvertibleError, match="modified in place"):
        loss.backward()
