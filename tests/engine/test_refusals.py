"""Clear errors instead of wrong gradients."""

import pytest
import torch
from torch import nn

from pyramidflow import InvertibleSequential
from pyramidflow.engine import AffineCoupling, InvertibleError

from _blocks import loss_of, perturbed_couplings


def test_block_without_inverse_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"block 1 \(Conv2d\) has no inverse.*inverse\(y\)"):
        InvertibleSequential(AffineCoupling(4, 4), nn.Conv2d(4, 4, 1))


def test_output_modified_in_place_before_backward():
    seq = perturbed_couplings(3)
    y, _ = seq(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    loss = y.sum()  # saves nothing itself: only the engine can notice
    y.mul_(2)
    with pytest.raises(InvertibleError, match="modified in place.*Clone the output"):
        loss.backward()


@pytest.mark.parametrize("mode", ["autograd", "invertible"])
def test_parameters_changed_between_forward_and_backward_raise_like_autograd(mode):
    seq = perturbed_couplings(3)
    seq.mode = mode
    optimizer = torch.optim.SGD(seq.parameters(), lr=0.1)
    loss = loss_of(*seq(torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)))
    for p in seq.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # before backward: the weights backward would rebuild with are no longer forward's
    expected = (
        r"parameter 'net.0.weight' of block 0 \(AffineCoupling\) was modified in place after forward \(version \d+ -> \d+\), "
        r"e.g. by optimizer.step\(\) before backward\(\).*Call backward\(\) before changing the parameters"
        if mode == "invertible" else "modified by an inplace operation"
    )
    with pytest.raises(RuntimeError, match=expected):
        loss.backward()


def test_create_graph_is_refused():
    seq = perturbed_couplings(2)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    loss = loss_of(*seq(x))
    with pytest.raises(NotImplementedError, match="create_graph=True.*mode='autograd'"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_double_backward_through_plain_autograd_still_works():
    """The way out named in the message does work."""
    seq = perturbed_couplings(2, std=0.1)
    seq.mode = "autograd"
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_of(*seq(x)), x, create_graph=True)
    grad.square().sum().backward()
    assert x.grad is not None


def test_batched_grads_are_served_correctly():
    """torch.autograd.grad(..., is_grads_batched=True) falls back to a loop over our backward: same answer."""
    seq = perturbed_couplings(2)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    grad_outputs = torch.randn(3, 2, 4, 8, 8, dtype=torch.float64)
    results = []
    for mode in ("autograd", "invertible"):
        seq.mode = mode
        y, _ = seq(x)
        results.append(torch.autograd.grad(y, x, grad_outputs, is_grads_batched=True)[0])
    assert torch.allclose(results[0], results[1], atol=1e-12)


def test_tensor_requiring_grad_outside_parameters_is_refused():
    """Invertible mode cannot route a gradient to a tensor a block merely holds."""
    block = AffineCoupling(4, 4)
    block.offset = torch.zeros(1, requires_grad=True)
    seq = InvertibleSequential(block)
    with pytest.raises(NotImplementedError, match="'offset'.*nn.Parameter"):
        seq(torch.randn(1, 4, 4, 4))


def test_backward_twice_without_retain_graph_is_torchs_usual_error():
    seq = perturbed_couplings(2)
    loss = loss_of(*seq(torch.randn(2, 4, 8, 8, dtype=torch.float64)))
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_non_tensor_input_is_refused():
    with pytest.raises(TypeError, match="expected a tensor or a non-empty tuple of tensors"):
        perturbed_couplings(1)([1.0, 2.0])
