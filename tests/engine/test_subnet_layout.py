"""The coupling-aware rebuild's work: convolution subnets evaluated channels-last on CPU, no input gradient the
caller's step skips.

NOTE [channels-last rebuild] in pyramidflow/engine/subnet_layout.py: which subnets change layout, and why the
block's own maths and the engine's levels do not see it. Gradients are compared with autograd's in float64
(where the path is taken too); the work is counted with a dispatch mode (deterministic), the peak from the
profiler's allocation events.
"""

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pyramidflow.engine.subnets as subnets
from pyramidflow.engine import InvertibleSequential, register_coupling
from pyramidflow.engine.subnet_layout import as_channels_last, rebuilds_channels_last
from pyramidflow.memory import peak_memory

from _blocks import loss_of
from test_foreign_couplings import DTYPE, SHAPE, _assert_matches_autograd, _freia, _freia_inputs, _net, _step
from test_sample_chunks import _Doubled


def _conv_layouts(seq, inputs):
    """Per convolution call with a graph during one invertible backward: whether its input was channels-last."""
    layouts = []

    def hook(module, args, out):
        if torch.is_grad_enabled():
            layouts.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())

    seq.mode = "invertible"
    y, logdet = seq(inputs if len(inputs) > 1 else inputs[0])
    handles = [m.register_forward_hook(hook) for m in seq.modules() if isinstance(m, nn.Conv2d)]
    loss_of(y, logdet).backward()
    for handle in handles:
        handle.remove()
    return layouts


@pytest.mark.parametrize("cls", ["AllInOneBlock", "GLOWCouplingBlock", "RNVPCouplingBlock"])
@pytest.mark.parametrize("samples", [None, 1])
def test_conv_subnets_rebuild_channels_last_with_autograds_gradients(cls, samples):
    Fm, _ = _freia()
    blocks = [getattr(Fm, cls)([SHAPE], subnet_constructor=_net(), dims_c=[(2, 6, 6)]) for _ in range(2)]
    seq = InvertibleSequential(*blocks).to(DTYPE)
    x = _freia_inputs(True)
    _assert_matches_autograd(seq, x, samples=samples)
    layouts = _conv_layouts(seq, x)
    assert layouts and all(layouts)


def test_subnets_of_unknown_modules_or_drawing_dropout_keep_their_layout():
    Fm, _ = _freia()

    def own(c_in, c_out):
        return nn.Sequential(_net()(c_in, c_out), _Doubled())

    x = _freia_inputs(False)
    for build in (own, _net(dropout=0.3)):
        seq = InvertibleSequential(*[Fm.AllInOneBlock([SHAPE], subnet_constructor=build) for _ in range(2)]).to(DTYPE)
        layouts = _conv_layouts(seq, x)
        assert layouts and not any(layouts)
    seq.eval()  # dropout in eval mode draws nothing
    assert all(_conv_layouts(seq, x))


def test_layout_rule():
    conv = _net()(2, 4)
    image = torch.randn(1, 2, 5, 5)
    assert rebuilds_channels_last(conv, [image])
    assert not rebuilds_channels_last(conv, [image.to(torch.int64)])  # not floating
    assert not rebuilds_channels_last(nn.Sequential(nn.Linear(5, 5)), [image])  # no convolution to gain
    assert not rebuilds_channels_last(nn.Conv1d(2, 2, 3), [torch.randn(1, 2, 5)])  # not an image
    half = torch.randn(1, 4, 5, 5)[:, :2]
    leaf = as_channels_last(half)
    assert leaf.is_contiguous(memory_format=torch.channels_last) and torch.equal(leaf, half)
    assert leaf.untyped_storage().nbytes() == leaf.numel() * leaf.element_size()  # not the view's whole base


class _InputGradientConvolutions(TorchDispatchMode):
    """Elements of input gradient the convolutions' backward computes (in the backward of a step, a transposed
    convolution is one: NOTE [lean recorded evaluation] in pyramidflow/engine/lean_subnets.py)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution_backward.default and out[0] is not None:
            self.elements += out[0].numel()
        if func is torch.ops.aten.convolution.default and args[6]:  # transposed
            self.elements += out.numel()
        return out


class _AffinePerSample(nn.Module):
    """A FrEIA-convention affine coupling (as benchmarks/drift_report.py's), registered per sample."""

    def __init__(self, channels=4):
        super().__init__()
        self.half = channels // 2
        self.net = _net(hidden=16)(self.half, 2 * (channels - self.half))

    def forward(self, xs, c=[], rev=False, jac=True):
        (x,) = xs
        a, b = x[:, : self.half], x[:, self.half :]
        r, t = self.net(a).chunk(2, dim=1)
        s = torch.tanh(r)
        b = (b - t) * torch.exp(-s) if rev else b * torch.exp(s) + t
        return [torch.cat((a, b), dim=1)], (-1 if rev else 1) * s.flatten(1).sum(dim=1)


register_coupling(_AffinePerSample, subnets=("net",), per_sample=True)


@pytest.mark.parametrize("samples", [None, 1])
def test_no_input_gradient_the_step_skips(samples):
    """The first block's input needs no gradient: its subnet's first convolution computes none, as under autograd
    (the recorded evaluation's backward asks the engine which gradients it will use)."""
    torch.manual_seed(0)
    seq = InvertibleSequential(*[_AffinePerSample() for _ in range(3)]).to(DTYPE)
    x = torch.randn(3, 4, 6, 6, dtype=DTYPE)
    for block in seq.blocks:
        block.rebuild_samples = samples
    counted = {}
    for mode in ("autograd", "invertible"):
        seq.mode = mode
        y, logdet = seq(x)
        with _InputGradientConvolutions() as counter:
            loss_of(y, logdet).backward()
        counted[mode] = counter.elements
    assert counted["invertible"] == counted["autograd"] > 0
    _assert_matches_autograd(seq, (x,), samples=samples)
    x_grad = _step(seq, (x,), "invertible")[2][0]
    assert x_grad is not None and x_grad.abs().sum() > 0  # the caller's input asks for it: computed


def test_channels_last_rebuild_lowers_the_float32_peak(monkeypatch):
    """oneDNN reorders NCHW activations into a blocked layout and back (scratch as large as a hidden activation);
    channels-last it does not: one block's backward at batch 1 peaks lower. The saving is about one hidden
    activation with AVX-512 kernels and half of one with AVX2 (ONEDNN_MAX_CPU_ISA=AVX2); the bound is a quarter.
    The layout alone: the lean evaluation (tests/engine/test_lean_subnets.py) moves this small case's peak elsewhere."""
    monkeypatch.setattr(subnets, "lean_evaluation", lambda subnet, inputs: contextlib.nullcontext())
    torch.manual_seed(0)
    channels, size, hidden = 4, 48, 16
    seq = InvertibleSequential(*[_AffinePerSample(channels) for _ in range(2)])
    for block in seq.blocks:
        block.module.net = _net(hidden=hidden)(channels // 2, channels)
    x = torch.randn(1, channels, size, size)

    def step():
        y, logdet = seq(x)
        loss_of(y, logdet).backward()

    peaks = {}
    for layout in ("channels-last", "as given"):
        if layout == "as given":
            monkeypatch.setattr(subnets, "rebuilds_channels_last", lambda subnet, inputs: False)
        step()
        peaks[layout] = peak_memory(step, "cpu")[0]
    hidden_bytes = hidden * size * size * 4
    assert peaks["channels-last"] <= peaks["as given"] - hidden_bytes // 4, peaks
