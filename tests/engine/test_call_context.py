"""NOTE [call context]: the engine says how it calls a block, to blocks that take ``context=``, and
``is_rebuilding()`` / ``may_overwrite(x)`` read the same state for blocks that do not."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import pyramidflow
from pyramidflow.engine import CallContext, FrEIAAdapter, InvertibleModule, InvertibleSequential, is_rebuilding, may_overwrite
from pyramidflow.model.coupling import TwoLevelCoupling

from _blocks import loss_of


class _Recorder(InvertibleModule):
    """``y = exp(s) · x``, recording per forward call the context it got and what the public functions said.
    ``skew`` makes the inverse inexact, so that ``drift="recompute"`` redoes a block from an exact input."""

    def __init__(self, calls: list, skew: float = 0.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1, 2, 1, 1), 0.1, dtype=torch.float64))
        self.calls, self.skew = calls, skew

    def forward(self, xs, context=None):
        (x,) = xs
        self.calls.append((context, is_rebuilding(), may_overwrite(x)))
        return (x * self.log_scale.exp(),), self.log_scale.sum().expand(x.shape[0]) * x[0, 0].numel()

    def inverse(self, ys):
        (y,) = ys
        return (y * (-self.log_scale).exp() * (1 + self.skew),), -self.log_scale.sum().expand(y.shape[0]) * y[0, 0].numel()


def _input():
    return torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _agrees(call) -> bool:
    """The public functions answered what the context says (a call by hand: nothing)."""
    context, rebuilding, overwrite = call
    if context is None:
        return not rebuilding and not overwrite
    return rebuilding == context.rebuild and overwrite == context.may_overwrite(0)


def test_the_keyword_is_the_declaration():
    class Plain(InvertibleModule):
        def forward(self, xs):
            return xs, None

    calls = []
    assert _Recorder.forward_takes_context and not _Recorder.reconstruct_takes_context
    assert not Plain.forward_takes_context and not Plain.reconstruct_takes_context
    assert TwoLevelCoupling.forward_takes_context and TwoLevelCoupling.reconstruct_takes_context
    assert not FrEIAAdapter.forward_takes_context  # foreign blocks are called as they were (tests/engine/test_adapters.py)
    InvertibleSequential(Plain(), _Recorder(calls), drift="off")(_input())  # Plain gets no keyword
    assert calls[0][0] == CallContext(grad=False, overwritable=(False,))  # the caller's input is not given up


def test_a_plain_module_put_into_the_blocks_is_called_without_the_keyword():
    """A module that is no InvertibleModule, swapped into a sequence's blocks by hand (the memcnn peer
    benchmark wraps each PyramidFlow block so), is called as it always was, in every mode."""

    class Swapped(nn.Module):
        def forward(self, xs):
            return tuple(x * 2 for x in xs), None

    for mode in ("autograd", "checkpoint"):
        seq = InvertibleSequential(_Recorder([]), mode=mode, drift="off")
        seq.blocks = nn.ModuleList([Swapped()])
        x = _input().requires_grad_(True)
        (y,) = seq(x)[:1]
        assert torch.equal(y, x * 2)


def test_every_call_of_a_step_is_described():
    """Invertible mode with anchors and a drifting block: forward (no graph, the levels earlier blocks made
    are overwritable), the anchors' rebuilds (a graph, ``rebuild``), the generic reconstruct's forward (by
    hand: no context), and the redo from an anchor (no graph, nothing overwritable)."""
    calls = []
    seq = InvertibleSequential(*[_Recorder(calls, skew=1e-3) for _ in range(3)], drift="recompute", anchor_every=2)
    y, logdet = seq(_input(), consume_input=True)
    forward = calls[:]
    assert [c[0] for c in forward] == [
        CallContext(grad=False, overwritable=(False,)),  # block 0's input is an anchor
        CallContext(grad=False, overwritable=(True,)),   # made by block 0
        CallContext(grad=False, overwritable=(False,)),  # block 2's input is an anchor
    ]
    calls.clear()
    loss_of(y, logdet).backward()
    rebuild, redo = CallContext(grad=True, rebuild=True), CallContext(grad=False)
    # block 2 from its anchor; block 1 by the generic reconstruct, drifts, and is redone from block 0's anchor;
    # block 0 from its anchor
    assert [c[0] for c in calls] == [rebuild, None, redo, rebuild, rebuild]
    assert seq.last_recomputed == (1,)
    assert all(_agrees(call) for call in forward + calls)


def test_reconstruct_is_told_it_rebuilds():
    class Told(_Recorder):
        def reconstruct(self, ys, context=None):
            self.calls.append(("reconstruct", context))
            return super().reconstruct(ys)

    calls = []
    seq = InvertibleSequential(Told(calls), drift="off")
    loss_of(*seq(_input().requires_grad_())).backward()
    assert Told.reconstruct_takes_context
    assert calls[1:] == [("reconstruct", CallContext(grad=True, rebuild=True)), (None, False, False)]  # then its forward, by hand


@pytest.mark.parametrize("mode, grad, expected", [
    ("autograd", True, CallContext(grad=True)),
    ("checkpoint", True, CallContext(grad=True)),
    ("invertible", False, CallContext(grad=False, overwritable=(False,))),
])
def test_each_mode_says_whether_a_graph_is_recorded(mode, grad, expected):
    calls = []
    seq = InvertibleSequential(_Recorder(calls), mode=mode, drift="off")
    with torch.set_grad_enabled(grad):
        y, logdet = seq(_input())
    if grad:
        loss_of(y, logdet).backward()
    # checkpoint mode's recomputation in backward is described as its forward was (NOTE [rebuilding in backward])
    assert [c[0] for c in calls] == [expected] * (2 if mode == "checkpoint" else 1)
    assert all(_agrees(call) for call in calls)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_a_traced_call_says_so():
    calls = []
    seq = InvertibleSequential(_Recorder(calls), drift="off")
    with torch.no_grad():
        torch.jit.trace(seq, _input(), check_trace=False)
        seq(_input())
    assert [c[0].tracing for c in calls] == [True, False]


def test_the_library_reads_the_context_not_the_functions():
    """The library's own blocks take ``context=``; ``is_rebuilding()`` and ``may_overwrite(x)`` stay for
    users' blocks that do not (NOTE [call context])."""
    calls = re.compile(r"(?<![.\w])(?<!def )(is_rebuilding|may_overwrite)\(")
    root = Path(pyramidflow.__file__).parent
    users = [str(path.relative_to(root)) for path in sorted(root.rglob("*.py"))
             if path.name != "_state.py" and calls.search(path.read_text(encoding="utf-8"))]
    assert users == []
