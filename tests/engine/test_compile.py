"""torch.compile of a model holding InvertibleSequential works and keeps the memory saving."""

import pytest
import torch

from pyramidflow.memory import saved_tensor_bytes

from _blocks import loss_of, max_relative_error, perturbed_couplings


@pytest.mark.slow
def test_compiled_model_keeps_gradients_and_saving():
    seq = perturbed_couplings(8, channels=8, hidden=16, dtype=torch.float32)
    x = torch.randn(2, 8, 64, 64)

    seq.mode = "autograd"
    autograd_saved, loss = saved_tensor_bytes(lambda: loss_of(*seq(x)))
    loss.backward()
    expected = [p.grad.clone() for p in seq.parameters()]

    seq.mode = "invertible"
    seq.zero_grad(set_to_none=True)
    compiled = torch.compile(seq)
    loss_of(*compiled(x)).backward()  # compiles (graph breaks around the Function are allowed)
    seq.zero_grad(set_to_none=True)
    compiled_saved, loss = saved_tensor_bytes(lambda: loss_of(*compiled(x)))
    loss.backward()

    assert compiled_saved * 10 <= autograd_saved, (compiled_saved, autograd_saved)
    assert max_relative_error([p.grad for p in seq.parameters()], expected) <= 1e-5
