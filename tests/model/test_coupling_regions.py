"""The coupling run by regions (model/coupling_regions.py) and F's backward against plain autograd, and the in-place rules they rely on."""

import copy

import pytest
import torch
from torch import nn

from pyramidflow.engine import InvertibleError, InvertibleSequential
from pyramidflow.engine.block import CallContext, Writable
from pyramidflow.model import PyramidFlow, PyramidFlowConfig
from pyramidflow.model.coupling import AffineParameterNet, ThreeLevelCoupling, TwoLevelCoupling
from pyramidflow.model.loss import objective_loss

from model._perturb import perturbed

REBUILD = CallContext(grad=True, rebuild=True)  # how the engine calls reconstruct


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


PADS = [None, (1, 1, 1, 1), (0, 1, 1, 0), (2, 0, 0, 1)]


@pytest.mark.parametrize("input_pad, hidden_pad", [(None, None), (PADS[2], PADS[3]), (PADS[3], PADS[1])])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("activation", [nn.LeakyReLU(0.2, inplace=True), nn.ELU(), nn.LeakyReLU(-0.1)])
def test_window_backward_matches_autograd(input_pad, hidden_pad, stride, activation):
    """F's backward written by hand (and its autograd fallback for other activations) against autograd on
    :meth:`window`, with the model's padding and a border window's uneven zeros, stride 1 and 2."""
    torch.manual_seed(0)
    net = AffineParameterNet(4, 3, 5, 3).double()
    net.activation = activation
    perturbed(net, std=0.2)
    cond = torch.randn(2, 4, 9, 11, dtype=torch.float64, requires_grad=True)
    rt = net.window(cond, input_pad, hidden_pad, stride)
    grad_rt = torch.randn_like(rt)
    expected = torch.autograd.grad(rt, [cond, net.conv_in.weight, net.conv_out.weight], grad_rt)
    got_rt, state = net.window_with_state(cond.detach(), input_pad, hidden_pad, stride)
    got = net.window_backward(state, cond.detach(), grad_rt, input_pad, hidden_pad, stride)
    assert state.hidden is None  # the hidden activation is freed by backward
    assert _relative(got_rt, rt.detach()) <= 1e-14
    for g, e in zip(got, expected):
        assert _relative(g, e) <= 1e-12
    again = net.window_backward(net.window_state(cond.detach(), input_pad), cond.detach(), grad_rt, input_pad, hidden_pad, stride)
    for g, e in zip(again, expected):
        assert _relative(g, e) <= 1e-12


def _block_gradients(block, mode, xs, upstream):
    flow = InvertibleSequential(copy.deepcopy(block), mode=mode)
    leaves = [x.clone().requires_grad_(True) for x in xs]
    ys, _ = flow(leaves)
    torch.autograd.backward(list(ys), upstream)
    return [y.detach() for y in ys] + [leaf.grad for leaf in leaves] + [p.grad for p in flow.parameters() if p.requires_grad]


def _with_network(make, tile, change):
    torch.manual_seed(0)
    block = make(tile)
    if change == "relu":
        block.net.activation = nn.ReLU(inplace=True)
    elif change == "elu":
        block.net.activation = nn.ELU()
    elif change == "slope":
        block.net.activation = nn.LeakyReLU(0.3, inplace=True)
    elif change == "width":
        conv_in, conv_out = block.net.conv_in, block.net.conv_out
        block.net.conv_in = nn.Conv2d(conv_in.in_channels, 7, conv_in.kernel_size, padding=conv_in.padding, bias=False)
        block.net.conv_out = nn.Conv2d(7, conv_out.out_channels, conv_out.kernel_size, padding=conv_out.padding, bias=False)
    return perturbed(block.double(), std=0.2)


@pytest.mark.parametrize("change", ["relu", "elu", "slope", "width"])
@pytest.mark.parametrize("kind", ["up", "down", "three"])
def test_the_network_is_written_once(change, kind):
    """F is defined in the module (NOTE [F written once]): change its activation or width there, and the plain
    autograd, untiled region and tiled region paths give the same float64 gradients."""
    make = {
        "up": lambda tile: TwoLevelCoupling(0, "up", 3, kernel_size=3, tile=tile),
        "down": lambda tile: TwoLevelCoupling(0, "down", 3, kernel_size=3, tile=tile),
        "three": lambda tile: ThreeLevelCoupling(0, 3, kernel_size=3, tile=tile),
    }[kind]
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 24 >> i, 24 >> i, generator=generator, dtype=torch.float64) for i in range(3)]
    upstream = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in xs]
    reference = _block_gradients(_with_network(make, None, change), "autograd", xs, upstream)
    for tile in (None, 8) if kind != "three" else (8,):  # untiled, a three-level block on level 1 runs plain
        block = _with_network(make, tile, change)
        assert block._runs_regions(xs, REBUILD, reconstruct=True)
        got = _block_gradients(block, "invertible", xs, upstream)
        assert len(got) == len(reference)
        for g, r in zip(got, reference):
            assert _relative(g, r) <= 1e-10, (tile, change)


@pytest.mark.parametrize("tile", [None, 8])
def test_an_activation_with_parameters_gets_its_gradient(tile):
    """A PReLU's weight is F's too: such a network's backward runs under plain autograd, exactly."""
    make = lambda tile: TwoLevelCoupling(0, "up", 3, kernel_size=3, tile=tile)  # noqa: E731
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 24 >> i, 24 >> i, generator=generator, dtype=torch.float64) for i in range(2)]
    upstream = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in xs]
    results = []
    for mode, tile_of_mode in (("autograd", None), ("invertible", tile)):
        torch.manual_seed(0)
        block = make(tile_of_mode)
        block.net.activation = nn.PReLU(init=0.3)
        results.append(_block_gradients(perturbed(block.double(), std=0.2), mode, xs, upstream))
    assert not block._runs_regions(xs, REBUILD, reconstruct=True)
    assert len(results[0]) == len(results[1])
    for got, want in zip(results[1], results[0]):
        assert _relative(got, want) <= 1e-10


@pytest.mark.parametrize("volume_norm, training", [("CVN", True), ("SVN", True), ("CVN", False), (None, True)])
@pytest.mark.parametrize("storage_writable, gradient_writable", [(False, False), (True, False), (False, True), (True, True)])
def test_reconstruct_matches_plain_autograd(volume_norm, training, storage_writable, gradient_writable):
    """The untiled region path of one block against its plain forward under autograd, and the storages
    the engine did not allow to be overwritten stay untouched (NOTE [writing in place in backward])."""
    torch.manual_seed(1)
    block = perturbed(TwoLevelCoupling(0, "up", 4, kernel_size=3, volume_norm=volume_norm).double(), std=0.2)
    generator = torch.Generator().manual_seed(2)
    xs = tuple(torch.randn(3, 4, 10 >> i, 12 >> i, generator=generator, dtype=torch.float64) for i in range(2))
    if not training:
        with torch.no_grad():
            block(xs)  # a running mean
        block.eval()
    params = [p for p in block.parameters() if p.requires_grad]
    leaves = [x.clone().requires_grad_(True) for x in xs]
    ys, logdet = block(leaves)
    grad_y = [torch.randn(y.shape, generator=generator, dtype=torch.float64) for y in ys]
    grad_logdet = [] if logdet is None else [torch.randn(3, generator=generator, dtype=torch.float64)]
    expected = torch.autograd.grad([*ys, *([logdet] if grad_logdet else [])], [*leaves, *params], grad_y + grad_logdet)
    y_given, g_given = ys[0].detach().clone(), grad_y[0].clone()
    writable = Writable((storage_writable, False), (gradient_writable, False))
    assert block._runs_regions(xs, REBUILD, reconstruct=True)
    rebuilt, local, logdet_local = block.reconstruct((y_given, ys[1].detach()), writable=writable)
    assert (logdet_local is None) == (logdet is None)
    if logdet is not None:  # NOTE [log-det without volume normalisation]: its value and its gradient
        assert _relative(logdet_local.detach(), logdet.detach()) <= 1e-12
    outputs = [*local, *([logdet_local] if grad_logdet else [])]
    grads = torch.autograd.grad(outputs, [*rebuilt, *params], [g_given, grad_y[1], *grad_logdet])
    assert _relative(rebuilt[0].detach(), xs[0]) <= 1e-12
    for got, want in zip(grads, expected):
        assert _relative(got, want) <= 1e-10
    if not storage_writable:
        assert torch.equal(y_given, ys[0].detach())
    if not gradient_writable:
        assert torch.equal(g_given, grad_y[0])


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


def test_the_path_is_chosen_from_the_engines_context():
    """NOTE [one path per call]: a tiled level-0 coupling runs the regions without a graph, with one only as
    backward's rebuild, never for a tracer; and writes over its input level only where the context says so."""
    block = TwoLevelCoupling(0, "up", 3, kernel_size=3, tile=8)
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 24 >> i, 24 >> i, generator=generator) for i in range(2)]
    forward = {
        CallContext(grad=False): True,
        CallContext(grad=False, tracing=True): False,
        CallContext(grad=True): False,
        CallContext(grad=True, rebuild=True): True,
        CallContext(grad=True, rebuild=True, tracing=True): False,
    }
    assert {context: block._runs_regions(xs, context) for context in forward} == forward
    assert block._runs_regions(xs, REBUILD, reconstruct=True)
    assert not block._runs_regions(xs, CallContext(grad=True, rebuild=True, tracing=True), reconstruct=True)
    with torch.no_grad():
        for overwritable in ((True, False), (False, True), ()):
            x = xs[0].clone()
            ys, _ = block([x, xs[1]], context=CallContext(grad=False, overwritable=overwritable))
            assert (ys[0].data_ptr() == x.data_ptr()) is (overwritable[:1] == (True,)), overwritable
