"""Gradients through InvertibleSequential equal plain autograd's, for inputs and every parameter."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyramidflow import InvertibleModule, InvertibleSequential
from pyramidflow import kernels
from pyramidflow.engine import AffineCoupling, Writable

from _blocks import gradients, loss_of, max_relative_error, perturbed_couplings


class CrossLevelCoupling(InvertibleModule):
    """Transforms one level of a 2-level pyramid conditioned on the other (generic reconstruct path)."""

    volume_preserving = False

    def __init__(self, channels, target):
        super().__init__()
        self.target = target
        self.net = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        nn.init.normal_(self.net.weight, std=0.1)

    def _rt(self, cond, size):
        r, t = self.net(F.interpolate(cond, size=size, mode="nearest")).chunk(2, dim=1)
        return r, t

    def forward(self, xs):
        x = xs[self.target]
        r, t = self._rt(xs[1 - self.target], x.shape[-2:])
        y, _ = kernels.affine_coupling(x, r, t)
        ys = list(xs)
        ys[self.target] = y
        return tuple(ys), kernels.soft_clamp(r, 2.0).flatten(1).sum(1)

    def inverse(self, ys):
        y = ys[self.target]
        r, t = self._rt(ys[1 - self.target], y.shape[-2:])
        x, _ = kernels.affine_coupling_inverse(y, r, t)
        xs = list(ys)
        xs[self.target] = x
        return tuple(xs), -kernels.soft_clamp(r, 2.0).flatten(1).sum(1)


class GenericCoupling(AffineCoupling):
    """The same coupling without its fused path: inverse, then forward again."""

    reconstruct = InvertibleModule.reconstruct


def test_gradcheck_float64_small():
    seq = perturbed_couplings(3, channels=4, hidden=4)
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        y, logdet = seq(x)
        return y, logdet

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("depth", [1, 4, 16])
def test_float64_matches_autograd(depth):
    seq = perturbed_couplings(depth)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    reference = gradients(seq, (x,), "autograd")
    for mode in ("invertible", "checkpoint"):
        assert max_relative_error(gradients(seq, (x,), mode), reference) <= 1e-10, mode


def test_fused_path_matches_generic_path():
    torch.manual_seed(1)
    fused = perturbed_couplings(6)
    generic = InvertibleSequential(*[GenericCoupling(4, 8, parity=i % 2) for i in range(6)]).double()
    generic.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    a = gradients(fused, (x,), "invertible")
    b = gradients(generic, (x,), "invertible")
    assert max_relative_error(a, b) <= 1e-12


def test_float32_error_stays_within_autograds_own():
    """Reconstruction rounds, but the float32 error must not blow up with depth.

    The perturbation grows outputs to about 70x the input over 16 blocks; far
    larger growth (std 0.2: 4e4x) makes any inverse-based engine drift, which
    is why scales are clamped.
    """
    seq64 = perturbed_couplings(16, channels=4, hidden=8, std=0.1)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    exact = gradients(seq64, (x,), "autograd")
    seq32 = copy.deepcopy(seq64).float()
    x32 = x.float()
    autograd_error = max_relative_error([g.double() for g in gradients(seq32, (x32,), "autograd")], exact)
    invertible_error = max_relative_error([g.double() for g in gradients(seq32, (x32,), "invertible")], exact)
    assert invertible_error <= 10 * max(autograd_error, 1e-7), (invertible_error, autograd_error)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_two_level_pyramid(dtype, tolerance):
    """Tuples of levels with different shapes, and levels that blocks pass through unchanged."""
    seq = InvertibleSequential(*[CrossLevelCoupling(3, target=i % 2) for i in range(4)]).to(dtype)
    xs = (torch.randn(2, 3, 64, 64, dtype=dtype), torch.randn(2, 3, 32, 32, dtype=dtype))
    reference = gradients(seq, xs, "autograd")
    assert len(reference) == 2 + 8
    assert max_relative_error(gradients(seq, xs, "invertible"), reference) <= tolerance


def test_input_without_grad_still_trains_parameters():
    seq = perturbed_couplings(4)
    y, logdet = seq(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert y.requires_grad
    loss_of(y, logdet).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seq.parameters())


def test_results_and_state_dict_identical_across_modes():
    seq = perturbed_couplings(4)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    keys = list(seq.state_dict())
    outputs = []
    for mode in ("autograd", "checkpoint", "invertible"):
        seq.mode = mode
        assert list(seq.state_dict()) == keys
        y, logdet = seq(x)
        outputs.append((y.detach(), logdet.detach()))
    for y, logdet in outputs[1:]:
        assert torch.equal(y, outputs[0][0]) and torch.equal(logdet, outputs[0][1])


def test_inverse_round_trip():
    seq = perturbed_couplings(8)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y, logdet = seq(x)
    x_back, logdet_inverse = seq.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-12)
    assert torch.allclose(logdet + logdet_inverse, torch.zeros(2, dtype=torch.float64), atol=1e-10)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        InvertibleSequential(AffineCoupling(4, 4), mode="fast")


def _error_with_outputs_given_up(seq, x):
    """The relative error of invertible mode's gradients with ``release_outputs=True`` against autograd's,
    and the input leaf."""
    reference = gradients(seq, (x,), "autograd")
    seq.mode = "invertible"
    seq.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    y, logdet = seq(leaf, release_outputs=True)
    loss_of(y, logdet).backward()
    return max_relative_error([leaf.grad] + [p.grad for p in seq.parameters()], reference), leaf


@pytest.mark.parametrize("depth", [1, 4])
def test_outputs_given_up_keep_gradients_equal_to_autograd(depth):
    """release_outputs=True: the rebuilt input goes into the output's storage, the gradient into its buffer."""
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    error, leaf = _error_with_outputs_given_up(perturbed_couplings(depth), x)
    assert error <= 1e-10
    assert torch.equal(leaf.detach(), x)  # the sequence's input is never written


class _RecordingCoupling(AffineCoupling):
    """An AffineCoupling whose reconstruct records what the engine let it overwrite."""

    def reconstruct(self, ys, writable=None):
        self.seen.append(writable)
        return super().reconstruct(ys, writable=writable)


class _PlainReconstructCoupling(AffineCoupling):
    """A user block written before ``writable`` existed: ``reconstruct(ys)`` only."""

    def reconstruct(self, ys):
        self.calls += 1
        return super().reconstruct(ys)


@pytest.mark.parametrize("cls", [_RecordingCoupling, _PlainReconstructCoupling])
def test_writable_goes_only_to_a_reconstruct_that_takes_it(cls):
    """The keyword in reconstruct's signature is the block's declaration: a block with it is told what it may
    overwrite, a block without it is called as before, and both give autograd's gradients."""
    assert cls.reconstruct_takes_writable == (cls is _RecordingCoupling)
    seq = perturbed_couplings(2)
    block = cls(4, 8).to(torch.float64)
    block.load_state_dict(seq.blocks[0].state_dict())
    block.seen, block.calls = [], 0
    seq.blocks[0] = block
    assert _error_with_outputs_given_up(seq, torch.randn(2, 4, 8, 8, dtype=torch.float64))[0] <= 1e-10
    if cls is _RecordingCoupling:
        assert len(block.seen) == 1 and isinstance(block.seen[0], Writable)
    else:
        assert block.calls == 1
