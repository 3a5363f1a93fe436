"""Activation memory does not grow with depth in invertible mode: counted and measured."""

import torch

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
    assert invertible[4] > 0  # what the loss saves (the outputs, for its square): the probe sees saved tensors
    assert invertible[16] <= 1.05 * invertible[4], invertible
    assert autograd[16] >= 3.5 * autograd[4], autograd
    assert invertible[16] < autograd[4]


def _measured_peak(depth: int, mode: str) -> int:
    """Peak bytes of one backward step of ``depth`` couplings (16 channels, hidden 32, 128x128, batch 1)."""
    torch.manual_seed(0)
    seq = perturbed_couplings(depth, channels=16, hidden=32, std=0.01, dtype=torch.float32)
    seq.mode = mode
    x = torch.randn(1, 16, 128, 128)

    def step():
        loss_of(*seq(x)).backward()

    step()  # warm-up: gradient buffers exist before the measured step
    return peak_memory_cpu(step)[0]


def test_measured_peak_flat_in_depth():
    """The measured peak (allocation events in time order) of invertible mode does not grow with depth.

    Going from 2 to 16 couplings adds 14 blocks of activations to autograd's
    peak and, to invertible mode's, only per-block bookkeeping (parameter
    gradients, fingerprints): under 5% of autograd's growth.
    """
    peaks = {(mode, depth): _measured_peak(depth, mode) for mode in ("autograd", "invertible") for depth in (2, 16)}
    autograd_growth = peaks["autograd", 16] - peaks["autograd", 2]
    assert autograd_growth > 40 * 2**20, peaks  # 14 blocks of activations, about 4 MiB each: the probe sees them
    assert peaks["invertible", 16] - peaks["invertible", 2] <= 0.05 * autograd_growth, peaks
    assert peaks["invertible", 16] <= 0.3 * peaks["autograd", 16], peaks
