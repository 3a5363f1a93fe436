"""The lean recorded evaluation: an activation and the convolution after it as one step of a coupling's rebuild.

NOTE [lean recorded evaluation] in pyramidflow/engine/lean_subnets.py: which pairs run as one step, why their
backward holds fewer hidden activations, and why the gradients are autograd's. Gradients are compared with
autograd's in float64 and with the recorded evaluation's own (lean path off) bit for bit in float32; that the
lean path ran is counted from ATen calls (no activation backward op), the peak from the profiler's allocation
events (deterministic).
"""

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pyramidflow.engine.subnets as subnets
from pyramidflow.engine import InvertibleSequential
from pyramidflow.engine.errors import InvertibleError
from pyramidflow.engine.lean_subnets import _derivative_of, lean_evaluation
from pyramidflow.memory import peak_memory

from _blocks import loss_of
from test_foreign_couplings import DTYPE, _assert_matches_autograd, _step
from test_sample_chunks import _Doubled
from test_subnet_layout import _AffinePerSample

_ACTIVATION_BACKWARDS = (torch.ops.aten.threshold_backward.default, torch.ops.aten.leaky_relu_backward.default)


class _Ops(TorchDispatchMode):
    """ATen calls of one backward: activation backward ops, and transposed convolutions (the lean path's
    input gradient where oneDNN runs both directions)."""

    def __init__(self):
        super().__init__()
        self.activation_backwards = 0
        self.transposed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.activation_backwards += func in _ACTIVATION_BACKWARDS
        self.transposed += func is torch.ops.aten.convolution.default and bool(args[6])
        return func(*args, **(kwargs or {}))


def _backward_ops(seq, x, mode):
    seq.zero_grad(set_to_none=True)
    seq.mode = mode
    y, logdet = seq(x)
    with _Ops() as ops:
        loss_of(y, logdet).backward()
    return ops


def _flow(subnet, channels=4, blocks=2, dtype=DTYPE):
    """A flow of registered per-sample affine couplings whose subnets ``subnet(c_in, c_out)`` builds."""
    torch.manual_seed(0)
    seq = InvertibleSequential(*[_AffinePerSample(channels) for _ in range(blocks)])
    for block in seq.blocks:
        block.module.net = subnet(channels // 2, channels)
    return seq.to(dtype)


def _conv_act_conv(activation, bias=True, hidden=8):
    def build(c_in, c_out):
        # nested: the pair spans the inner Sequential's end and the outer one's next module
        return nn.Sequential(nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1, bias=bias), activation()),
                             nn.Conv2d(hidden, c_out, 3, padding=1, bias=bias))

    return build


_ACTIVATIONS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.2), "relu-in-place": lambda: nn.ReLU(inplace=True)}


@pytest.mark.parametrize("layout", ["channels-last", "as given"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", sorted(_ACTIVATIONS))
def test_gradients_match_autograd(activation, bias, layout, monkeypatch):
    if layout == "as given":
        monkeypatch.setattr(subnets, "rebuilds_channels_last", lambda subnet, inputs: False)
    seq = _flow(_conv_act_conv(_ACTIVATIONS[activation], bias))
    x = torch.randn(3, 4, 6, 6, dtype=DTYPE)
    _assert_matches_autograd(seq, (x,))
    _assert_matches_autograd(seq, (x,), samples=1)
    assert _backward_ops(seq, x, "autograd").activation_backwards > 0
    assert _backward_ops(seq, x, "invertible").activation_backwards == 0  # the lean path ran


def _without_lean(monkeypatch):
    monkeypatch.setattr(subnets, "lean_evaluation", lambda subnet, inputs: contextlib.nullcontext())


@pytest.mark.parametrize("dtype, size", [(torch.float32, 6), (torch.float64, 80), (torch.float32, 80)],
                         ids=["convolution_backward", "float64", "transposed on oneDNN"])
@pytest.mark.parametrize("activation", ["relu", "leaky"])
def test_gradients_equal_the_recorded_evaluations_bit_for_bit(activation, dtype, size, monkeypatch):
    """The same ATen convolution backward as autograd's; in float32 at the larger size the input gradient is a
    transposed convolution, which oneDNN runs with the kernel of its convolution backward (checked with AVX-512
    and AVX2)."""
    seq = _flow(_conv_act_conv(_ACTIVATIONS[activation], hidden=16), dtype=dtype)
    x = torch.randn(1, 4, size, size, dtype=dtype)
    lean = [g.clone() for g in _step(seq, (x,), "invertible")[2]]
    transposed = _backward_ops(seq, x, "invertible").transposed
    on_onednn = dtype == torch.float32 and size == 80 and torch.backends.mkldnn.is_available()
    assert transposed > 0 if on_onednn else transposed == 0
    _without_lean(monkeypatch)
    recorded = _step(seq, (x,), "invertible")
    assert all(torch.equal(a, b) for a, b in zip(lean, recorded[2]))


def _bits(x):
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def _activation_grad(derivative, grad, r):
    """The lean backward's last step alone, both ways: ``grad`` made the activation's input gradient from its output
    ``r``, and from where ``r`` passes it; the two must agree."""
    with_r = grad.clone(memory_format=torch.preserve_format)
    derivative.backward_(with_r, r)
    from_passes = grad.clone(memory_format=torch.preserve_format)
    passes = torch.empty_like(r, dtype=torch.bool)
    derivative.passes(r, passes)
    derivative.from_passes_(from_passes, passes)
    assert torch.equal(_bits(with_r), _bits(from_passes))
    return from_passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_derivatives_are_torchs_to_the_bit(dtype):
    """Read from the output as torch reads it: NaN, -0.0, infinite gradients included (NOTE [lean recorded
    evaluation]); in pieces, in either layout, and at once where the layouts differ."""
    special = torch.tensor([0.0, -0.0, 1.5, -2.0, float("nan"), float("inf"), -float("inf"), 1e-30], dtype=dtype)
    h = torch.cat([special, torch.randn(3_000, dtype=dtype)]).reshape(1, 1, -1, 4).repeat(1, 2, 1, 1)
    grad = torch.randn_like(h)
    grad.view(-1)[:16] = torch.tensor([float("nan"), float("inf"), -1.0, 0.0] * 4, dtype=dtype)
    slope = 0.3
    cases = [
        (nn.ReLU(), torch.relu(h), torch.ops.aten.threshold_backward(grad, torch.relu(h), 0)),
        (nn.LeakyReLU(slope), nn.functional.leaky_relu(h, slope), torch.ops.aten.leaky_relu_backward(grad, h, slope, False)),
    ]
    for activation, r, expected in cases:
        derivative = _derivative_of(activation)
        for layout in (torch.contiguous_format, torch.channels_last):
            ours = _activation_grad(derivative, grad.contiguous(memory_format=layout), r.contiguous(memory_format=layout))
            assert torch.equal(_bits(ours.contiguous()), _bits(expected))
        at_once = _activation_grad(derivative, grad.transpose(2, 3), r.transpose(2, 3))  # not dense: at once
        assert torch.equal(_bits(at_once.transpose(2, 3).contiguous()), _bits(expected))
    assert _derivative_of(nn.LeakyReLU(-0.1)) is None  # its output's sign no longer tells its input's
    assert _derivative_of(nn.GELU()) is None


class _Residual(nn.Module):
    """The activation's output used twice (the convolution's input and the sum): not a plain chain."""

    def __init__(self, channels):
        super().__init__()
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        r = self.act(x)
        return self.conv(r) + r


def _hooked_activation(c_in, c_out):
    net = _conv_act_conv(nn.ReLU)(c_in, c_out)
    net[0][1].register_forward_hook(lambda module, args, out: None)
    return net


_FALLBACKS = {
    "a module of one's own": lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), _Doubled(),
                                                               nn.Conv2d(8, c_out, 3, padding=1)),
    "an output used twice": lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), _Residual(8),
                                                              nn.Conv2d(8, c_out, 3, padding=1)),
    "a negative slope": _conv_act_conv(lambda: nn.LeakyReLU(-0.1)),
    "a hook on the activation": _hooked_activation,
    "a reflection-padded convolution": lambda c_in, c_out: nn.Sequential(
        nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c_out, 3, padding=1, padding_mode="reflect")),
}


@pytest.mark.parametrize("case", sorted(_FALLBACKS))
def test_other_subnets_take_todays_path_with_the_same_gradients(case):
    seq = _flow(_FALLBACKS[case])
    x = torch.randn(3, 4, 6, 6, dtype=DTYPE)
    _assert_matches_autograd(seq, (x,))
    ops = _backward_ops(seq, x, "invertible")
    assert ops.activation_backwards > 0 and ops.transposed == 0


def test_modules_restored_and_a_second_backward_refused():
    net = _conv_act_conv(nn.ReLU)(2, 4)
    children = [m for m in net.modules()]
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    with lean_evaluation(net, [x]):
        assert any(type(m).__name__ == "_Lean" for m in net.modules())
        out = net(x)
    assert [m for m in net.modules()] == children
    out.sum().backward(retain_graph=True)
    with pytest.raises(InvertibleError, match="backpropagated twice"):
        out.sum().backward()
    with pytest.raises(ValueError), lean_evaluation(net, [x]):
        raise ValueError("restored on the way out")
    assert [m for m in net.modules()] == children


def test_lean_evaluation_lowers_the_float32_peak(monkeypatch):
    """Batch 1: the subnet's backward is the block's; without the lean path the activation's backward holds its
    output, its gradient and its input's gradient at once. The bound is half a hidden activation (the saving
    measured is 0.87 of one with AVX-512 and with AVX2 kernels, ONEDNN_MAX_CPU_ISA=AVX2)."""
    channels, size, hidden = 4, 80, 16
    seq = _flow(_conv_act_conv(nn.ReLU, hidden=hidden), channels=channels, dtype=torch.float32)
    x = torch.randn(1, channels, size, size)

    def step():
        y, logdet = seq(x)
        loss_of(y, logdet).backward()

    peaks = {}
    for lean in (True, False):
        if not lean:
            _without_lean(monkeypatch)
        step()
        peaks[lean] = peak_memory(step, "cpu")[0]
    assert peaks[True] <= peaks[False] - hidden * size * size * 4 // 2, peaks


@pytest.mark.parametrize("activation", ["relu", "leaky"])
def test_one_evaluations_backward_holds_one_hidden_activation_at_a_time(activation):
    """One recorded evaluation at batch 1, channels-last, sizes where oneDNN runs every convolution: autograd's ops
    peak at 3.3 hidden activations (3.5 with LeakyReLU), the lean step at 1.8 (the hidden activation, its bool, an
    eighth of it widened, the first convolution's output gradient); the same with AVX2 kernels. The bound is 2."""
    torch.manual_seed(0)
    size, hidden = 80, 16
    net = _conv_act_conv(_ACTIVATIONS[activation], hidden=hidden)(4, 4)
    x = torch.randn(1, 4, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(1, 4, size, size)

    def evaluation(lean):
        with lean_evaluation(net, [x]) if lean else contextlib.nullcontext():
            out = net(x).contiguous()  # as the rebuild hands it on (NOTE [channels-last rebuild])
        torch.autograd.grad(out, [x, *net.parameters()], grad)

    peaks = {}
    for lean in (True, False):
        evaluation(lean)
        peaks[lean] = peak_memory(lambda: evaluation(lean), "cpu")[0] / (hidden * size * size * 4)
    assert peaks[True] <= 2 < peaks[False], peaks


@pytest.mark.parametrize("size, groups", [(81, 2), (8, 1)], ids=["transposed on oneDNN", "convolution_backward"])
def test_strided_dilated_grouped_convolution_bit_for_bit(size, groups):
    """The transposed convolution gives back the input's size (odd, strided: an output padding) and groups."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.LeakyReLU(0.05),
                        nn.Conv2d(16, 8, 3, stride=2, padding=2, dilation=2, groups=groups))
    x = torch.randn(1, 4, size, size).contiguous(memory_format=torch.channels_last)
    grads = {}
    for lean in (True, False):
        leaf = x.clone(memory_format=torch.preserve_format).requires_grad_()
        with lean_evaluation(net, [leaf]) if lean else contextlib.nullcontext():
            out = net(leaf)
        with _Ops() as ops:
            grads[lean] = torch.autograd.grad(out, [leaf, *net.parameters()], torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        if lean:
            on_onednn = size == 81 and torch.backends.mkldnn.is_available()
            assert ops.transposed > 0 if on_onednn else ops.transposed == 0
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))
