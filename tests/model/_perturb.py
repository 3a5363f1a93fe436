"""Non-zero weights for the coupling tests (the last conv starts at zero)."""

import torch


def perturbed(module, seed=0, std=0.1):
    """``module`` with ``std`` noise added to every trainable parameter, so every path of the gradient is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module
