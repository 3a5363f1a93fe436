"""Small blocks of every convention the engine accepts, built for the tests."""

import torch
from torch import nn

from pyramidflow.engine import AffineCoupling, InvertibleSequential


def perturbed_couplings(depth, channels=4, hidden=8, std=0.1, kernel_size=3, dtype=torch.float64):
    """A stack of AffineCouplings moved away from their identity initialisation."""
    blocks = [AffineCoupling(channels, hidden, kernel_size=kernel_size, parity=i % 2) for i in range(depth)]
    for block in blocks:
        nn.init.normal_(block.net[-1].weight, std=std)
        nn.init.normal_(block.net[-1].bias, std=std)
    return InvertibleSequential(*blocks).to(dtype)


def loss_of(y, logdet):
    """A flow's negative log-likelihood up to constants, as a scalar."""
    ys = y if isinstance(y, tuple) else (y,)
    return 0.5 * sum(t.square().sum() for t in ys) - logdet.sum()


def backward_step(seq, inputs, mode):
    """One forward and backward of ``loss_of`` in ``mode`` on fresh leaves of ``inputs``: ``(y, logdet, leaves)``."""
    seq.mode = mode
    seq.zero_grad(set_to_none=True)
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    y, logdet = seq(leaves if len(leaves) > 1 else leaves[0])
    loss_of(y, logdet).backward()
    return y, logdet, leaves


def bf16_autocast_step(seq, x, mode):
    """One step in ``mode`` with the forward under CPU bfloat16 autocast and the loss in float32: ``(y, logdet)``."""
    seq.mode = mode
    seq.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = seq(x)
        loss = loss_of(y.float(), logdet.float())
    loss.backward()
    return y, logdet


def gradients(seq, inputs, mode):
    """Gradients of the inputs and every parameter after one backward in ``mode``."""
    _, _, leaves = backward_step(seq, inputs, mode)
    return [x.grad for x in leaves] + [p.grad for p in seq.parameters()]


def max_relative_error(grads, reference):
    return max(float((g - r).norm() / r.norm().clamp_min(1e-300)) for g, r in zip(grads, reference))


class FrEIAStyleAffine(nn.Module):
    """A FrEIA-convention block: list in, list out, rev/jac flags, log-det per sample."""

    def __init__(self, channels):
        super().__init__()
        self.log_scale = nn.Parameter(0.1 * torch.randn(channels))
        self.shift = nn.Parameter(0.1 * torch.randn(channels))

    def forward(self, x, c=[], rev=False, jac=True):
        (x,) = x
        s = self.log_scale.view(1, -1, 1, 1)
        t = self.shift.view(1, -1, 1, 1)
        y = (x - t) * torch.exp(-s) if rev else x * torch.exp(s) + t
        logdet = s.sum() * x[0, 0].numel() * torch.ones(x.shape[0], dtype=x.dtype)
        return [y], (-logdet if rev else logdet)


class NormflowsStyleAffine(nn.Module):
    """A normflows-convention block: forward/inverse on a tensor, returning (z, log_det)."""

    def __init__(self, channels):
        super().__init__()
        self.log_scale = nn.Parameter(0.1 * torch.randn(channels))

    def forward(self, z):
        s = self.log_scale.view(1, -1, 1, 1)
        return z * torch.exp(s), s.sum() * z[0, 0].numel() * torch.ones(z.shape[0], dtype=z.dtype)

    def inverse(self, z):
        s = self.log_scale.view(1, -1, 1, 1)
        return z * torch.exp(-s), -s.sum() * z[0, 0].numel() * torch.ones(z.shape[0], dtype=z.dtype)


class MemcnnStyleAdditive(nn.Module):
    """A memcnn-convention additive coupling: forward/inverse return tensors (volume preserving)."""

    def __init__(self, channels):
        super().__init__()
        self.f = nn.Conv2d(channels // 2, channels - channels // 2, 3, padding=1)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, b + self.f(a)], dim=1)

    def inverse(self, y):
        a, b = y.chunk(2, dim=1)
        return torch.cat([a, b - self.f(a)], dim=1)
