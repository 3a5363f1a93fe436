"""NOTE [forward in place]: which levels a block's forward may write over, and that writing there is exact.

Each case runs twice: with a block that asks ``may_overwrite(x)`` and with one that reads its ``context=``
(NOTE [call context]): both must be told the same."""

import pytest
import torch
from torch import nn

from pyramidflow.engine import InvertibleModule, InvertibleSequential, may_overwrite


class _Scale(InvertibleModule):
    """``y = exp(s) · x`` on one tensor; writes over ``x`` where the engine allows, and records what it was told."""

    def __init__(self, channels: int, seen: list) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(0.1 * torch.randn(1, channels, 1, 1, dtype=torch.float64))
        self.seen = seen

    def forward(self, xs):
        return self._forward(xs, may_overwrite(xs[0]))

    def _forward(self, xs, allowed):
        (x,) = xs
        self.seen.append(allowed)
        scale = self.log_scale.exp()
        y = x.mul_(scale) if allowed else x * scale
        return (y,), self.log_scale.sum().expand(x.shape[0]) * x[0, 0].numel()

    def inverse(self, ys):
        (y,) = ys
        return (y * (-self.log_scale).exp(),), -self.log_scale.sum().expand(y.shape[0]) * y[0, 0].numel()


class _ScaleByContext(_Scale):
    """:class:`_Scale` told by its context instead of asking."""

    def forward(self, xs, context=None):
        return self._forward(xs, context is not None and context.may_overwrite(0))


BLOCKS = pytest.mark.parametrize("block", [_Scale, _ScaleByContext], ids=["asks", "context"])


def _flow(block=_Scale, depth=3, **kwargs):
    torch.manual_seed(0)
    seen = []
    return InvertibleSequential(*[block(2, seen) for _ in range(depth)], **kwargs), seen


def _input(requires_grad=False):
    return torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(requires_grad)


@BLOCKS
@pytest.mark.parametrize("grad", [True, False], ids=["invertible", "no_grad"])
def test_a_block_may_overwrite_what_earlier_blocks_made_and_the_input_only_when_given_up(grad, block):
    for consume, expected in ((False, [False, True, True]), (True, [True, True, True])):
        flow, seen = _flow(block, drift="off")
        x = _input()
        kept = x.clone()
        with torch.set_grad_enabled(grad):
            flow(x, consume_input=consume)
        assert seen == expected
        assert torch.equal(x, kept) is not consume  # the caller's input is written over only when given up


@BLOCKS
def test_nothing_is_overwritten_that_someone_else_reads(block):
    cases = {
        "input requiring grad": (dict(drift="off"), dict(consume_input=True), True, [False, True, True]),
        "anchors": (dict(drift="recompute", anchor_every=1), dict(consume_input=True), False, [False, False, False]),
        "block 0 kept for recompute": (dict(drift="recompute"), dict(consume_input=True), False, [False, True, True]),
        "autograd mode": (dict(mode="autograd", drift="off"), dict(consume_input=True), False, [False, False, False]),
        "checkpoint mode": (dict(mode="checkpoint", drift="off"), dict(consume_input=True), False, [False, False, False]),
        "debug": (dict(debug=True, drift="off"), dict(consume_input=True), False, [False, False, False]),
    }
    for name, (settings, call, requires_grad, expected) in cases.items():
        flow, seen = _flow(block, **settings)
        x = _input(requires_grad)
        y, logdet = flow(x, **call)
        (y.square().sum() - logdet.sum()).backward()
        assert seen[: len(expected)] == expected, name
        assert not any(seen[len(expected):]), name  # backward's forward calls (a rebuild, a redo) write nothing


@BLOCKS
def test_a_backward_after_a_forward_in_place_gives_autograds_gradients(block):
    def gradients(mode, consume):
        flow, seen = _flow(block, mode=mode, drift="recompute")
        x = _input()
        y, logdet = flow(x, consume_input=consume, release_outputs=True, input_source=_input)
        (y.square().sum() - logdet.sum()).backward()
        return [p.grad for p in flow.parameters()], any(seen)

    reference, none_written = gradients("autograd", True)
    in_place, some_written = gradients("invertible", True)
    assert not none_written and some_written
    for got, want in zip(in_place, reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
