"""Recomputation replays the forward's RNG draws and autocast state."""

import copy

import pytest
import torch
from torch import nn

from pyramidflow import InvertibleModule, InvertibleSequential
from pyramidflow.engine import AffineCoupling

from _blocks import bf16_autocast_step, gradients, loss_of, max_relative_error


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


class AdditiveBlock(InvertibleModule):
    """``y_b = x_b + F(x_a)`` with dropout or batch norm inside F, on the generic reconstruct (inverse, then
    forward): both evaluations in backward must see what forward's F saw."""

    volume_preserving = True

    def __init__(self, channels, middle):
        super().__init__()
        half = channels // 2
        self.f = nn.Sequential(nn.Conv2d(half, 8, 3, padding=1), nn.ReLU(), middle, nn.Conv2d(8, channels - half, 3, padding=1))

    def forward(self, xs):
        (x,) = xs
        a, b = x.chunk(2, dim=1)
        return (torch.cat([a, b + self.f(a)], dim=1),), None

    def inverse(self, ys):
        (y,) = ys
        a, b = y.chunk(2, dim=1)
        return (torch.cat([a, b - self.f(a)], dim=1),), None


class WrongInverse(AdditiveBlock):
    """Its inverse is off by 1e-3: drift="recompute" must redo it from an exact input."""

    def inverse(self, ys):
        (x,), logdet = super().inverse(ys)
        return (x + 1e-3,), logdet


def _sandwich(middle, wrong=None, **kwargs):
    """Two additive blocks around an AffineCoupling (issue 27's case); a :class:`WrongInverse` at index ``wrong``."""
    torch.manual_seed(0)
    blocks = [AdditiveBlock(4, middle()), AffineCoupling(4, 8), AdditiveBlock(4, middle())]
    if wrong is not None:
        blocks.insert(wrong, WrongInverse(4, middle()))
    nn.init.normal_(blocks[1].net[-1].weight, std=0.1)
    return InvertibleSequential(*blocks, **kwargs).double()


_PATHS = {
    "rebuilt": {},
    "anchored": {"anchor_every": 1},  # every block run forward again from its exact input
    "recompute": {"drift": "recompute", "wrong": 2},  # the redo runs blocks 0 and 1 forward again
    "recompute, anchored": {"drift": "recompute", "anchor_every": 2, "wrong": 3},  # the redo runs block 2 from its anchor
}


@pytest.mark.parametrize("path", list(_PATHS))
def test_dropout_in_a_generic_block_equals_autograd(path):
    settings = dict(_PATHS[path])
    seq = _sandwich(lambda: nn.Dropout(0.5), **settings)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    torch.manual_seed(5)
    reference = gradients(seq, (x,), "autograd")
    torch.manual_seed(5)
    assert max_relative_error(gradients(seq, (x,), "invertible"), reference) <= 1e-10
    if "wrong" in settings:
        assert seq.last_recomputed == (settings["wrong"],)


def test_batch_norm_in_a_generic_block_equals_autograd():
    seq = _sandwich(lambda: nn.BatchNorm2d(8))
    reference = copy.deepcopy(seq)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    expected = gradients(reference, (x,), "autograd")
    assert max_relative_error(gradients(seq, (x,), "invertible"), expected) <= 1e-10
    for (name, a), b in zip(reference.state_dict().items(), seq.state_dict().values()):
        assert torch.equal(a, b), name  # running statistics updated once, as autograd does


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
        y, logdet = bf16_autocast_step(seq, x, mode)
        results[mode] = (y.dtype, logdet.dtype, [p.grad.dtype for p in seq.parameters()], [p.grad for p in seq.parameters()])
    for mode in ("invertible", "checkpoint"):
        assert results[mode][:3] == results["autograd"][:3], mode
        # bf16 has 8 bits of mantissa: the reconstruction from bf16 outputs rounds at that level.
        assert max_relative_error(results[mode][3], results["autograd"][3]) <= 0.1, mode
    # Every evaluation of the networks, recomputations in backward included, ran under autocast.
    assert len(network_dtypes) == 4 * (1 + 2 + 2)  # autograd, invertible, checkpoint and set(network_dtypes) == {torch.bfloat16}
