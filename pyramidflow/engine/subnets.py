"""One evaluation of each subnet in a coupling's backward: recorded by the inverse, reused by the forward.

A coupling's subnets see the same input values in both directions (the conditioning half passes
through unchanged). Invertible backward therefore runs the block's own inverse without a graph,
each subnet evaluated with grad on a leaf that holds its input, and then the block's own forward
on the rebuilt input, each subnet call answered by its recorded evaluation, reattached to the
forward's (equal-valued) input. The block's maths runs exactly as its library wrote it; only the
subnets, named by attribute path, are intercepted. Backward then evaluates each subnet once
instead of twice (NOTE [recorded subnets]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ._state import RngState
from .block import LogDet, Tensors, _leaf, gradients_used
from .lean_subnets import lean_evaluation
from .subnet_layout import as_channels_last, rebuilds_channels_last

__all__ = ["Refused", "SubnetRng", "forward_keeping_subnet_rng", "reconstruct_with_recorded_subnets"]


class Refused(Exception):
    """The recorded-subnet path does not apply to this call; the caller takes the generic one.

    ``xs``: the inputs the block's inverse rebuilt, when the refusal came after it (they may then
    stand in the outputs' storage, which no longer holds the outputs).
    """

    xs: Optional[Tensors] = None


# NOTE [recorded subnets]
# Inverse pass (no graph): each subnet call gets a leaf holding its input that
# requires grad (a copy where the input is a view into a larger tensor, so that
# the recorded graph does not keep the base alive; one leaf per input tensor,
# shared by the subnets that take it), runs the real subnet with grad on it,
# and keeps (leaf, output). The block's inverse maths gets the output's values (a clone
# where the block changes it in place: FrEIA's AllInOneBlock scales its subnet
# output by 0.1 in place). Forward pass (graph on, from the rebuilt input as
# leaves): the k-th call of a subnet takes its k-th recorded evaluation and
# returns `_Reattach(evaluation, input)`: the recorded output, whose backward
# runs the recorded graph and hands the leaf's gradient to the forward's input
# (equal in value: the coupling property) and the parameters' gradients to the
# parameters. Counts and shapes must match, else the path is refused.
#
# Randomness: the engine replays the block's forward RNG state before the
# rebuild. With one subnet the inverse evaluates it first, as the forward did,
# so dropout draws the same mask. Several subnets run in the other order in
# the inverse (GLOW: subnet2 first in forward, subnet1 first in the inverse),
# so the forward of such a block keeps, per subnet call that drew random
# numbers, the RNG state the call started from (`forward_keeping_subnet_rng`),
# under the state the engine captured before the block; the rebuild finds them
# under the same state, which the engine replays (NOTE [the block's RNG state,
# named] in ._state), and runs each recorded evaluation from its own. A block
# that drew but whose states are not found (a forward outside the engine's
# invertible forward) is refused, and the caller takes the generic recipe.
@dataclass
class _Evaluation:
    leaves: Tuple[Tensor, ...]
    outputs: Optional[Tuple[Tensor, ...]]  # until the forward takes them; then only their graph edges are kept
    single: bool  # the subnet returned one tensor, not a tuple
    params: Tuple[nn.Parameter, ...]
    edges: Tuple[Optional[GradientEdge], ...] = ()


class _Reattach(torch.autograd.Function):
    """The recorded outputs, differentiable with respect to the forward's inputs and the subnet's parameters."""

    @staticmethod
    def forward(ctx, evaluation: _Evaluation, *sources_and_params: Tensor):  # type: ignore[override]
        ctx.evaluation = evaluation
        outputs, evaluation.outputs = evaluation.outputs, None
        # Only the graph is kept, not the tensors: an output that nothing else saves is freed with the forward's use.
        evaluation.edges = tuple(get_gradient_edge(o) if o.requires_grad else None for o in outputs)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        evaluation: _Evaluation = ctx.evaluation
        needs = gradients_used(ctx, 1)  # not the input's where the caller's local backward skips it (the first block)
        wrt = [t for t, need in zip(evaluation.leaves + evaluation.params, needs) if need]
        pairs = [(e, g) for e, g in zip(evaluation.edges, grads) if g is not None and e is not None]
        computed: Sequence[Optional[Tensor]] = ()
        if wrt and pairs:
            computed = torch.autograd.grad([e for e, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        ctx.evaluation = None  # the recorded graph is spent
        it = iter(computed)
        return (None, *[(next(it, None) if need else None) for need in needs])


class _Recorder(nn.Module):
    """Stands in for a subnet during one rebuild: records in the inverse, answers in the forward."""

    def __init__(
        self, subnet: nn.Module, clone_outputs: bool, watch_rng: bool, fwd_rng: Optional[List[RngState]], leaves: dict
    ) -> None:
        super().__init__()
        self.subnet = subnet
        self.leaves = leaves  # (input id, channels-last) -> (input, leaf), shared by the recorders of one rebuild
        self.clone_outputs = clone_outputs
        self.watch_rng = watch_rng and fwd_rng is None
        self.fwd_rng = list(fwd_rng) if fwd_rng is not None else None
        self.evaluations: List[_Evaluation] = []
        self.replaying = False
        self.drew_random = False

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if kwargs or not inputs or not all(isinstance(x, Tensor) for x in inputs):
            raise Refused("a subnet called with keyword or non-tensor arguments")
        return self._replay(inputs) if self.replaying else self._record(inputs)

    def _record(self, inputs: Tuple[Tensor, ...]) -> Any:
        channels_last = rebuilds_channels_last(self.subnet, inputs)  # NOTE [channels-last rebuild] in .subnet_layout
        leaves = tuple(self._leaf_of(x, channels_last) for x in inputs)
        before = RngState.capture(inputs) if self.watch_rng else None
        if self.fwd_rng is not None and not self.fwd_rng:
            raise Refused("the inverse called a subnet more often than the forward")
        replay = self.fwd_rng.pop(0).replay() if self.fwd_rng is not None else contextlib.nullcontext()
        with torch.enable_grad(), replay, lean_evaluation(self.subnet, leaves):  # NOTE [lean recorded evaluation]
            out = self.subnet(*leaves)
            single = isinstance(out, Tensor)
            outputs = (out,) if single else tuple(out)
            if not all(isinstance(o, Tensor) for o in outputs):
                raise Refused("a subnet returned something other than tensors")
            if channels_last:
                outputs = tuple(o.contiguous() for o in outputs)
        if before is not None and not _same_rng(before, RngState.capture(inputs)):
            self.drew_random = True
        params = tuple(p for p in self.subnet.parameters() if p.requires_grad)
        self.evaluations.append(_Evaluation(leaves, outputs, single, params))
        given = tuple(o.detach().clone() if self.clone_outputs else o.detach() for o in outputs)
        return given[0] if single else given

    def _leaf_of(self, x: Tensor, channels_last: bool) -> Tensor:
        key = (id(x), channels_last)
        if key not in self.leaves:  # the input is kept with its leaf, so that its id stays its own
            self.leaves[key] = (x, _leaf(as_channels_last(x) if channels_last else _own_storage(x)))
        return self.leaves[key][1]

    def _replay(self, inputs: Tuple[Tensor, ...]) -> Any:
        if not self.evaluations:
            raise Refused("the forward called a subnet more often than the inverse")
        evaluation = self.evaluations.pop(0)
        if [x.shape for x in inputs] != [x.shape for x in evaluation.leaves]:
            raise Refused("a subnet's input in the forward has another shape than in the inverse")
        saved = [self.clone_outputs and _saves_result(o) for o in evaluation.outputs]
        outputs = _Reattach.apply(evaluation, *inputs, *evaluation.params)
        # The block changes them in place: copy those the recorded graph needs for its backward.
        outputs = tuple(o.clone() if copy else o for o, copy in zip(outputs, saved))
        return outputs[0] if evaluation.single else tuple(outputs)


def _own_storage(x: Tensor) -> Tensor:
    """``x``, copied when it is a view into a larger tensor: the recorded graph keeps its input until backward,
    and a view would keep the whole base alive (a channel half of the block's rebuilt output)."""
    return x.clone() if x.untyped_storage().nbytes() > x.numel() * x.element_size() else x


def _saves_result(output: Tensor) -> bool:
    """Whether the op that made ``output`` keeps it for its backward (then it must not be changed in place)."""
    return output.grad_fn is not None and hasattr(output.grad_fn, "_saved_result")


def _same_rng(a: RngState, b: RngState) -> bool:
    return torch.equal(a.cpu, b.cpu) and all(torch.equal(x, y) for x, y in zip(a.cuda, b.cuda))


def _parent_and_name(root: nn.Module, path: str) -> Tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if not isinstance(parent._modules.get(name), nn.Module):
        raise Refused(f"no subnet module at {path!r}")
    return parent, name


@contextlib.contextmanager
def _standing_in(root: nn.Module, paths: Sequence[str], make: Callable[[int, nn.Module], nn.Module]) -> Iterator[List[Any]]:
    """Put ``make(i, subnet)`` in place of the ``i``-th subnet for the duration of one call of the block."""
    places = [_parent_and_name(root, path) for path in paths]
    originals = [parent._modules[name] for parent, name in places]
    if len({id(m) for m in originals}) != len(originals):
        raise Refused("two subnet paths name the same module")
    stand_ins = [make(i, m) for i, m in enumerate(originals)]
    try:
        for (parent, name), stand_in in zip(places, stand_ins):
            parent._modules[name] = stand_in
        yield stand_ins
    finally:
        for (parent, name), original in zip(places, originals):
            parent._modules[name] = original


#: Per subnet (in the order of the paths), the RNG state each of its calls started from.
SubnetRng = List[List[RngState]]


class _Probe(nn.Module):
    """Stands in for a subnet during a forward: keeps the RNG state each call starts from."""

    def __init__(self, subnet: nn.Module) -> None:
        super().__init__()
        self.subnet = subnet
        self.states: List[RngState] = []
        self.drew_random = False

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        before = RngState.capture(tensors)
        out = self.subnet(*inputs, **kwargs)
        self.drew_random |= not _same_rng(before, RngState.capture(tensors))
        self.states.append(before)
        return out


def forward_keeping_subnet_rng(
    root: nn.Module, subnets: Sequence[str], forward: Callable[[Tensors], Tuple[Tensors, LogDet]], xs: Tensors
) -> Tuple[Tuple[Tensors, LogDet], Optional[SubnetRng]]:
    """Run ``forward(xs)`` and return, when some subnet drew random numbers, the state each subnet call
    started from (NOTE [recorded subnets]); ``None`` when none drew (nothing to keep)."""
    with _standing_in(root, subnets, lambda i, m: _Probe(m)) as probes:
        result = forward(xs)
    if not any(p.drew_random for p in probes):
        return result, None
    return result, [p.states for p in probes]


def reconstruct_with_recorded_subnets(
    root: nn.Module,
    subnets: Sequence[str],
    inverse: Callable[[Tensors], Tuple[Tensors, LogDet]],
    forward: Callable[[Tensors], Tuple[Tensors, LogDet]],
    ys: Tensors,
    *,
    clone_outputs: bool,
    fwd_rng: Optional[SubnetRng] = None,
    writable_outputs: Sequence[bool] = (),
) -> Tuple[Tensors, Tensors, LogDet]:
    """Rebuild a coupling's inputs from ``ys`` and its local graph, each subnet evaluated once.

    Args:
        root: the module that owns the subnets.
        subnets: the subnets' attribute paths under ``root`` (``"subnet"``, ``"flows.1.param_map"``).
        inverse, forward: the block's own two directions over tuples of tensors.
        ys: the block's outputs, detached.
        clone_outputs: the block changes its subnets' outputs in place.
        fwd_rng: what :func:`forward_keeping_subnet_rng` kept in this block's forward, if anything.
        writable_outputs: per level, whether the storage of ``ys[j]`` may hold the rebuilt input
            (:class:`~.block.Writable`): one level less during the local backward.

    Returns:
        ``(xs, ys_local, logdet_local)`` as :meth:`InvertibleModule.reconstruct` does.

    Raises:
        Refused: the block did not behave as a coupling here (NOTE [recorded subnets]); nothing
            was changed, and the caller takes the generic path.
    """
    watch_rng = len(subnets) > 1
    shared_leaves: dict = {}

    def recorder(i: int, subnet: nn.Module) -> _Recorder:
        return _Recorder(subnet, clone_outputs, watch_rng, fwd_rng[i] if fwd_rng is not None else None, shared_leaves)

    with _standing_in(root, subnets, recorder) as recorders:
        with torch.no_grad():
            xs, _ = inverse(ys)
        if any(r.drew_random for r in recorders):
            raise Refused("subnets that draw random numbers run in another order in the inverse")
        shared_leaves.clear()  # the inputs of the inverse: no longer needed once the recorded graphs hold their leaves
        xs = _into_outputs(xs, ys, writable_outputs, recorders)
        leaves = tuple(_leaf(x) for x in xs)
        for recorder in recorders:
            recorder.replaying = True
        try:
            ys_local, logdet_local = forward(leaves)
            if any(r.evaluations for r in recorders):
                raise Refused("the forward called a subnet less often than the inverse")
        except Refused as refused:
            refused.xs = xs
            raise
    passed = {id(x) for x in leaves}
    return leaves, tuple(y if id(y) in passed else _Placeholder.apply(y) for y in ys_local), logdet_local


def _into_outputs(xs: Tensors, ys: Tensors, writable: Sequence[bool], recorders: Sequence[_Recorder]) -> Tensors:
    """The rebuilt inputs, each written over its output's storage where the engine allows it and no recorded
    graph holds that storage."""
    held = {_storage_id(leaf) for r in recorders for e in r.evaluations for leaf in e.leaves}
    out = list(xs)
    for j, (x, y, ok) in enumerate(zip(xs, ys, writable)):
        if ok and x is not y and x.shape == y.shape and x.dtype == y.dtype and _storage_id(y) not in held:
            with torch.no_grad():
                out[j] = y.copy_(x)
    return tuple(out)


def _storage_id(x: Tensor) -> int:
    return x.untyped_storage().data_ptr()


class _Placeholder(torch.autograd.Function):
    """An output's graph without its values: the engine only backpropagates through the rebuilt outputs
    (NOTE [placeholder outputs] in pyramidflow/model/coupling_regions.py), so their memory is freed during the local backward."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:  # type: ignore[override]
        return y.new_empty(()).expand(y.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad
