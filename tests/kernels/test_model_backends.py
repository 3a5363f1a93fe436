"""The model on the Triton kernels (interpreted on CPU) equals the model on the reference, gradients included.

This runs the engine's fused reconstruct through the kernels' lazy reconstruction
(x filled during the local backward), the path a CUDA training step takes.
"""

import pytest
import torch

from pyramidflow.model import PyramidFlow, PyramidFlowConfig, fourier_loss

pytest.importorskip("triton", reason="triton is not installed")


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_triton_backend_matches_reference_in_a_training_step(volume_norm):
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=2, volume_norm=volume_norm, kernels=backend)
        model = PyramidFlow(config)
        for p in model.parameters():
            if p.requires_grad:
                p.data.add_(0.05 * torch.randn_like(p))
        images = torch.randn(2, 3, 8, 8)
        loss = fourier_loss(model(images))
        loss.backward()
        results[backend] = (loss.detach(), [p.grad for p in model.parameters() if p.requires_grad])
    assert torch.allclose(results["triton"][0], results["reference"][0], rtol=1e-5)
    for grad, reference in zip(results["triton"][1], results["reference"][1]):
        assert torch.allclose(grad, reference, rtol=1e-4, atol=1e-6)


def test_config_rejects_unknown_backend():
    with pytest.raises(ValueError, match="kernels must be one of"):
        PyramidFlowConfig(kernels="cuda")


def test_a_mean_with_a_graph_is_refused_by_the_triton_backend():
    """Synchronized VN passes a mean with a graph; the Triton op would treat it as a constant."""
    from pyramidflow import kernels

    x, r, t = torch.randn(3, 2, 2, 4, 4).unbind(0)
    mean = torch.zeros(1, 1, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="running_mean as a constant"):
        kernels.affine_coupling(x, r, t, volume_norm="CVN", running_mean=mean, backend="triton")
    y, _ = kernels.affine_coupling(x, r, t, volume_norm="CVN", running_mean=mean)
    y.sum().backward()
    assert mean.grad is not None
