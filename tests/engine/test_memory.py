"""Activation memory does not grow with depth in invertible mode: counted and measured."""

import torch

from pyramidflow import InvertibleSequential
from pyramidflow.engine import AffineCoupling
from pyramidflow.memory import peak_memory_cpu, saved_tensor_bytes

from _blocks import loss_of, perturbed_couplings


def _saved_bytes(depth, mode):
    seq = perturbed_couplings(depth, channels=8, hidden=16, dtype=torch.float32)
    seq.mode = mode
    x = torch.randn(2, 8, 32, 32)
    saved, _ = saved_tensor_bytes(lambda: loss_of(*seq(x)))
    return saved


def test_saved_bytes_flat_in_depth():
    invertible = {depth: _saved_bytes(depth, "invertible") for depth in (4, 16)}
    autograd = {depth: _saved_bytes(depth, "autograd") for depth in (4, 16)}
    assert invertible[4] > 0  # the final outputs are saved, through autograd's own mechanism
    assert invertible[16] <= 1.05 * invertible[4], invertible
    assert autograd[16] >= 3.5 * autograd[4], autograd
    assert invertible[16] < autograd[4]


def test_peak_memory_of_a_training_step():
    """8 couplings, 16 channels, 256x256, hidden 32, batch 1: at most 18% of autograd's peak."""
    seq = InvertibleSequential(*[AffineCoupling(16, 32, parity=i % 2) for i in range(8)])
    for block in seq.blocks:
        torch.nn.init.normal_(block.net[-1].weight, std=0.01)
    x = torch.randn(1, 16, 256, 256)

    def step():
        loss_of(*seq(x)).backward()

    peaks = {}
    for mode in ("autograd", "invertible"):
        seq.mode = mode
        step()  # warm-up: gradient buffers exist before the measured step
        peaks[mode], _ = peak_memory_cpu(step)
    assert peaks["autograd"] > 100 * 2**20  # the measurement sees the activations at all
    assert peaks["invertible"] <= 0.18 * peaks["autograd"], peaks
