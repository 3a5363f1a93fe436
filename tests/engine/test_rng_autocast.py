"""Recomputation replays the forward's RNG draws and autocast state."""

import pytest
import torch
from torch import nn

from pyramidflow import InvertibleSequential
from pyramidflow.engine import AffineCoupling

from _blocks import gradients, loss_of, max_relative_error


class DropoutCoupling(AffineCoupling):
    def __init__(self, channels, hidden, parity):
        super().__init__(channels, hidden, parity=parity)
        self.net.insert(2, nn.Dropout(0.3))
        nn.init.normal_(self.net[-1].weight, std=0.1)


def _seeded_gradients(seq, x, mode):
    torch.manual_seed(123)
    return gradients(seq, (x,), mode)


@pytest.mark.parametrize("mode", ["invertible", "checkpoint"])
def test_dropout_replayed(mode):
    seq = InvertibleSequential(*[DropoutCoupling(4, 8, i % 2) for i in range(4)]).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    reference = _seeded_gradients(seq, x, "autograd")
    assert max_relative_error(_seeded_gradients(seq, x, mode), reference) <= 1e-10


def test_replay_leaves_the_global_rng_stream_alone():
    seq = InvertibleSequential(*[DropoutCoupling(4, 8, i % 2) for i in range(4)])
    x = torch.randn(2, 4, 8, 8)
    draws = []
    for mode in ("autograd", "invertible"):
        seq.mode = mode
        torch.manual_seed(7)
        loss_of(*seq(x)).backward()
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])


def test_cpu_bf16_autocast_same_dtypes_as_autograd():
    seq = InvertibleSequential(*[AffineCoupling(4, 8, parity=i % 2) for i in range(4)])
    for block in seq.blocks:
        nn.init.normal_(block.net[-1].weight, std=0.1)
    x = torch.randn(2, 4, 8, 8)
    network_dtypes = []
    for block in seq.blocks:
        block.net.register_forward_hook(lambda module, args, out: network_dtypes.append(out.dtype))
    results = {}
    for mode in ("autograd", "invertible", "checkpoint"):
        seq.mode = mode
        seq.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, logdet = seq(x)
            loss = loss_of(y.float(), logdet.float())
        loss.backward()
        results[mode] = (y.dtype, logdet.dtype, [p.grad.dtype for p in seq.parameters()], [p.grad for p in seq.parameters()])
    for mode in ("invertible", "checkpoint"):
        assert results[mode][:3] == results["autograd"][:3], mode
        # bf16 has 8 bits of mantissa: the reconstruction from bf16 outputs rounds at that level.
        assert max_relative_error(results[mode][3], results["autograd"][3]) <= 0.1, mode
    # Every evaluation of the networks, recomputations in backward included, ran under autocast.
    assert len(network_dtypes) == 4 * (1 + 2 + 2)  # autograd, invertible, checkpoint and set(network_dtypes) == {torch.bfloat16}
