"""Count what backward recomputes: network evaluations and running-statistic updates."""

import pytest
import torch
from torch import nn

from pyramidflow import InvertibleModule, InvertibleSequential
from pyramidflow.engine import AffineCoupling

from _blocks import gradients, loss_of, max_relative_error


class GenericCoupling(AffineCoupling):
    reconstruct = InvertibleModule.reconstruct


def _count_net_calls(seq):
    calls = []
    for block in seq.blocks:
        block.net.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("cls,per_backward", [(AffineCoupling, 1), (GenericCoupling, 2)])
def test_network_evaluations_per_backward(cls, per_backward):
    depth = 5
    seq = InvertibleSequential(*[cls(4, 8, parity=i % 2) for i in range(depth)])
    calls = _count_net_calls(seq)
    y, logdet = seq(torch.randn(2, 4, 8, 8))
    assert len(calls) == depth
    loss_of(y, logdet).backward()
    assert len(calls) == depth + per_backward * depth


class NormedCoupling(AffineCoupling):
    """A coupling whose network holds batch norm: running statistics and a step counter."""

    def __init__(self, channels, hidden, parity):
        super().__init__(channels, hidden, parity=parity)
        # No bias before batch norm: its gradient is zero analytically, so only rounding noise to compare.
        self.net[0] = nn.Conv2d(channels // 2, hidden, 3, padding=1, bias=False)
        self.net.insert(1, nn.BatchNorm2d(hidden))


@pytest.mark.parametrize("mode", ["invertible", "checkpoint"])
def test_running_statistics_updated_once_per_step(mode):
    torch.manual_seed(0)
    reference = InvertibleSequential(*[NormedCoupling(4, 8, i % 2) for i in range(3)], mode="autograd").double()
    for block in reference.blocks:
        nn.init.normal_(block.net[-1].weight, std=0.1)
    seq = InvertibleSequential(*[NormedCoupling(4, 8, i % 2) for i in range(3)], mode=mode).double()
    seq.load_state_dict(reference.state_dict())
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    for model in (reference, seq):
        for _ in range(2):
            loss_of(*model(x)).backward()
    for (name, a), b in zip(reference.state_dict().items(), seq.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(int(block.net[1].num_batches_tracked) == 2 for block in seq.blocks)


def test_batch_norm_gradients_match_in_training():
    torch.manual_seed(0)
    seq = InvertibleSequential(*[NormedCoupling(4, 8, i % 2) for i in range(3)]).double()
    for block in seq.blocks:
        nn.init.normal_(block.net[-1].weight, std=0.1)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    state = {k: v.clone() for k, v in seq.state_dict().items()}
    reference = gradients(seq, (x,), "autograd")
    seq.load_state_dict(state)
    assert max_relative_error(gradients(seq, (x,), "invertible"), reference) <= 1e-10


@pytest.mark.gpu
def test_no_host_sync_in_a_step_gpu():
    """GPU test: one training step never waits on the device (no per-block NaN checks or .item())."""
    seq = InvertibleSequential(*[AffineCoupling(4, 8, parity=i % 2) for i in range(4)]).cuda()
    x = torch.randn(2, 4, 16, 16, device="cuda")
    loss_of(*seq(x)).backward()  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_of(*seq(x)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
