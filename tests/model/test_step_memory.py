"""Measured training-step peaks of PyramidFlow: invertible mode flat in depth and below checkpoint mode."""

import torch

from pyramidflow.memory import peak_memory_cpu
from pyramidflow.model import PyramidFlow, PyramidFlowConfig
from pyramidflow.train import TrainConfig
from pyramidflow.train.step import make_optimizer, training_step


def _step_peak(mode: str, num_stacks: int) -> int:
    """Peak bytes of one training step (after a warm-up step), C = 8, k = 3, L = 4, 64 px, batch 2."""
    torch.manual_seed(0)
    model = PyramidFlow(PyramidFlowConfig(channels=8, kernel_size=3, num_stacks=num_stacks, mode=mode)).train()
    settings = TrainConfig(steps=1)  # the method's settings, as training uses them
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    images = torch.randn(2, 3, 64, 64)

    def step() -> None:  # THE training step (pyramidflow.train.step), as the loop runs it
        training_step(model, optimizer, images, model_config=model.config, config=settings)

    step()  # Adam's state and the gradients exist before the probe
    return peak_memory_cpu(step)[0]


def test_invertible_peak_is_flat_in_depth_and_below_checkpoint():
    peaks = {(mode, n): _step_peak(mode, n) for mode in ("autograd", "checkpoint", "invertible") for n in (1, 4)}
    autograd_growth = peaks["autograd", 4] - peaks["autograd", 1]
    assert autograd_growth > 2 * 2**20, peaks  # 12 more blocks of activations: the probe sees them
    # 12 more blocks add their parameter gradients and fingerprints only (measured: about 4% of autograd's growth)
    assert peaks["invertible", 4] - peaks["invertible", 1] <= 0.1 * autograd_growth, peaks
    assert peaks["invertible", 4] <= 0.8 * peaks["checkpoint", 4], peaks  # the paper's depth (4 stacks)
    assert peaks["invertible", 1] <= 0.8 * peaks["checkpoint", 1], peaks
