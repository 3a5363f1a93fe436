"""The ops that write into their operands (affine_coupling_into, affine_coupling_bwd_into) against autograd."""

from __future__ import annotations

import pytest
import torch

from pyramidflow import kernels
from pyramidflow.kernels import reference

MODES = [(None, False), ("CVN", False), ("CVN", True), ("SVN", False), ("SVN", True)]
SHAPE = (3, 5, 7, 9)  # enough samples and channels for several slices


def _operands(mode, dtype=torch.float64):
    torch.manual_seed(0)
    x, t, g = (torch.randn(SHAPE, dtype=dtype) for _ in range(3))
    r = 2.0 * torch.randn(SHAPE, dtype=dtype)
    volume_norm, eval_ = mode
    mean = None
    if eval_:
        mean = 0.3 * torch.randn((1, 1, 7, 9) if volume_norm == "CVN" else (1, 5, 1, 1), dtype=dtype)
    return x, r, t, g, dict(volume_norm=volume_norm, clamp=2.0, running_mean=mean)


@pytest.mark.parametrize("mode", MODES)
def test_forward_into_its_input_matches_affine_coupling(mode):
    x, r, t, _, opts = _operands(mode)
    y, mean = reference.affine_coupling(x, r, t, **opts)
    out = x.clone()
    got_mean = kernels.affine_coupling_into(out, r, t, out=out, **opts, backend="reference")
    torch.testing.assert_close(out, y, rtol=1e-13, atol=1e-13)
    assert (got_mean is None) == (mean is None)
    if mean is not None:
        torch.testing.assert_close(got_mean, mean, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_backward_into_its_operands_matches_autograd(mode):
    """x over y, grad_x over g, grad_r over r, grad_t over t: the values autograd gives for affine_coupling."""
    x, r, t, g, opts = _operands(mode)
    leaves = [a.clone().requires_grad_(True) for a in (x, r, t)]
    y, _ = reference.affine_coupling(*leaves, **opts)
    want = torch.autograd.grad(y, leaves, g)
    y = y.detach()
    operands = [y.clone(), r.clone(), t.clone(), g.clone()]
    y_, r_, t_, g_ = operands
    kernels.affine_coupling_bwd_into(y_, r_, t_, g_, out=(y_, g_, r_, t_), **opts, backend="reference")
    torch.testing.assert_close(y_, x, rtol=1e-12, atol=1e-12)
    for got, expected in zip((g_, r_, t_), want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_triton_backend_fills_the_same_outputs(mode):
    """Under the interpreter on CPU (tests/conftest.py), the Triton backend writes what the reference writes."""
    pytest.importorskip("triton", reason="triton cannot be imported")
    x, r, t, g, opts = _operands(mode, torch.float32)
    y, _ = reference.affine_coupling(x, r, t, **opts)
    results = []
    for backend in ("reference", "triton"):
        y_, r_, t_, g_ = (a.clone() for a in (y, r, t, g))
        kernels.affine_coupling_bwd_into(y_, r_, t_, g_, out=(y_, g_, r_, t_), **opts, backend=backend)
        out = x.clone()
        kernels.affine_coupling_into(out, r, t, out=out, **opts, backend=backend)
        results.append((y_, g_, r_, t_, out))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
