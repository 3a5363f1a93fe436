"""The autograd Function behind invertible mode: keep the outputs, rebuild the rest.

Forward runs the blocks without a graph and keeps only the final outputs (and
per-block RNG states, a few bytes each). Backward walks the blocks in reverse:
each block rebuilds its input from its output (:meth:`InvertibleModule.reconstruct`)
with a local graph, the upstream gradient is pushed through that graph, and the
graph is dropped before the next block. Peak activation memory is one block's
working set, whatever the depth.

Drift (NOTE [drift monitoring]): forward also keeps a small fingerprint of each
block's input, and, when asked, the exact inputs of some blocks (anchors);
backward compares every rebuilt input with its fingerprint and, under
``drift="recompute"``, rebuilds a drifting block's input exactly from the
nearest anchor by running forward again, as checkpoint mode would.

Parameters are inputs of the Function, so their gradients come out of its
backward and reach ``param.grad`` through autograd's own accumulation: the
hooks of ``DistributedDataParallel`` fire as for any other module.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._state import AutocastState, RngState, overwritable, rebuilding, recomputation, replaying
from .block import InvertibleModule, LogDet, Tensors, Writable, _leaf, add_optional
from .drift import CallSite, Fingerprinter, compute_dtype, default_tolerance, fingerprint_drift
from .errors import InvertibleError, _internal_assert

__all__ = ["DriftReport", "InvertibleRun", "caller_storages", "free_levels", "run_invertible"]


@dataclass
class InvertibleRun:
    """Everything one invertible forward hands to its backward, apart from tensors."""

    blocks: Sequence[InvertibleModule]
    params: Sequence[nn.Parameter]
    block_params: Sequence[Tuple[int, ...]]  # indices into `params`, per block
    preserve_rng_state: bool = True
    fwd_rng: List[Optional[RngState]] = field(default_factory=list)
    fwd_autocast: Optional[AutocastState] = None
    has_logdet: bool = False
    # Drift monitoring (NOTE [drift monitoring]); the sequence fills these in.
    drift: str = "off"
    drift_tolerance: Optional[float] = None  # None: default_tolerance() of the forward's compute dtype
    anchor_every: Optional[int] = None
    input_source: Optional[Callable[[], Tensors]] = None  # NOTE [input source]
    fingerprinter: Optional[Fingerprinter] = None
    where: str = "InvertibleSequential"
    report: Optional[Callable[["DriftReport"], None]] = None
    fwd_fingerprints: List[Tuple[Optional[Tensor], ...]] = field(default_factory=list)
    fwd_anchors: Dict[int, Tensors] = field(default_factory=dict)
    fwd_anchor_versions: Dict[int, Tuple[int, ...]] = field(default_factory=dict)
    fwd_call_site: Optional[CallSite] = None
    # NOTE [outputs kept as aliases]: the outputs, detached (same storage and version counter), until backward starts.
    release_outputs: bool = False
    consume_input: bool = False  # NOTE [forward in place]: the caller gave its inputs up
    fwd_outputs: Optional[Tensors] = None
    fwd_output_refs: Tuple["weakref.ref[Tensor]", ...] = ()
    fwd_output_versions: Tuple[int, ...] = ()
    fwd_input_storages: Tuple[int, ...] = ()
    fwd_parameter_versions: List[Tuple[int, ...]] = field(default_factory=list)  # per block, of block.parameters()

    def keeps_anchor(self, index: int) -> bool:
        """Whether forward keeps block ``index``'s exact input (block 0's under ``"recompute"``, unless the
        caller can compute it again: NOTE [input source])."""
        if self.anchor_every is not None and index % self.anchor_every == 0:
            return True
        return index == 0 and self.drift == "recompute" and self.input_source is None


@dataclass(frozen=True)
class DriftReport:
    """What one invertible backward found, handed to the sequence (``last_drift`` and the policy).

    Attributes:
        drifts: per block, the relative error of its rebuilt input against forward's fingerprint
            (0.0 where an anchor supplied the exact input).
        tolerance: the tolerance applied.
        recomputed: indices of the blocks whose input was rebuilt exactly by running forward again.
        call_site: the user's line that called the sequence in forward.
        policy: the ``drift`` setting forward ran with.
    """

    drifts: Tuple[float, ...]
    tolerance: float
    recomputed: Tuple[int, ...]
    call_site: Optional[CallSite]
    policy: str


# NOTE [drift monitoring]
# Forward: before each block, `fingerprinter.fingerprint(xs)` projects every
# element of each level on a few fixed random sign patterns (one read of the
# level, no copy, no host sync: NOTE [whole-level fingerprint]); blocks
# that `keeps_anchor` also keep their exact input by reference (block 0's is the
# caller's input, which the caller holds anyway). Backward, per block: the
# input is rebuilt as before (or taken from an anchor: exact, drift 0), the
# local backward runs, and the rebuilt input is compared with the fingerprint
# as a device tensor. "warn" and "raise" sync once, after the last block.
# "recompute" must branch on the value, so it syncs once per block (and, under
# torch.distributed, takes the largest drift over ranks first, so that every
# rank recomputes the same blocks: blocks may hold collectives). A drifting
# block's local result is dropped and redone from its exact input, computed by
# running forward (no grad, RNG and autocast replayed, buffers restored) from
# the nearest anchor at or below it; the block below then starts from an exact
# state. Anchors cost one state each and bound a recomputation to
# `anchor_every - 1` forward blocks; without them it may run up to `index`.


class _InvertibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: InvertibleRun, num_inputs: int, *tensors: Tensor):  # type: ignore[override]
        # notation: xs the current state (a tuple of level tensors), total the summed logdet.
        xs: Tensors = tuple(tensors[:num_inputs])
        run.fwd_input_storages = tuple(caller_storages(xs, run.consume_input))
        protected = set(run.fwd_input_storages)
        run.fwd_autocast = AutocastState.capture()
        run.fwd_rng = []
        monitor = run.drift != "off"
        if monitor and run.drift_tolerance is None:
            dtype = compute_dtype(xs, [dtype for _, dtype in run.fwd_autocast.regions])
            run.drift_tolerance = default_tolerance(dtype)
        total: LogDet = None
        for index, block in enumerate(run.blocks):
            run.fwd_rng.append(RngState.capture(xs) if run.preserve_rng_state else None)
            if monitor:
                run.fwd_fingerprints.append(run.fingerprinter.fingerprint(xs))
            if run.keeps_anchor(index):
                run.fwd_anchors[index] = tuple(x.detach() for x in xs)
                run.fwd_anchor_versions[index] = tuple(x._version for x in xs)
                protected |= {_storage(x) for x in xs}
            with overwritable(free_levels(xs, protected)):  # NOTE [forward in place]
                xs, logdet = block(xs)
            total = add_optional(total, logdet)
        ys = tuple(xs)
        run.has_logdet = total is not None
        if total is None:
            total = ys[0].new_zeros(ys[0].shape[0])
            ctx.mark_non_differentiable(total)
        ctx.run = run
        run.fwd_outputs = tuple(y.detach() for y in ys)
        run.fwd_output_refs = tuple(weakref.ref(y) for y in ys)
        run.fwd_output_versions = tuple(y._version for y in ys)
        run.fwd_parameter_versions = [tuple(p._version for p in block.parameters()) for block in run.blocks]
        return (*ys, total)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        run: InvertibleRun = ctx.run
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "InvertibleSequential does not support double backward or torch.autograd.grad(..., "
                "create_graph=True); call .backward() once, or use mode='autograd' for higher derivatives."
            )
        ys = _take_outputs(run)
        _check_parameters_unchanged(run)
        _check_anchors_unchanged(run)
        grad_ys: List[Optional[Tensor]] = list(grads[:-1])
        owned = _owned_outputs(run, ys)
        grad_buffers = _writable_gradients(run, ys, grad_ys)
        # Incoming gradients not given up are the caller's: never written (NOTE [writing in place in backward]).
        foreign_grads = {_storage(g) for g, b in zip(grad_ys, grad_buffers) if g is not None and b is None}
        grad_logdet = grads[-1] if run.has_logdet else None
        param_grads: List[Optional[Tensor]] = [None] * len(run.params)
        inputs_need_grad = any(ctx.needs_input_grad[2 : 2 + len(ys)])
        monitor = run.drift != "off"
        # Meta tensors (pyramidflow.memory.plan counts memory on them) have shapes but no values: keep the
        # fingerprints and anchors (their memory counts) but make no value-dependent decision.
        measurable = not ys[0].is_meta
        drifts: List[Tensor] = []
        recomputed: List[int] = []
        # A block whose local result may be redone ("recompute") must leave its incoming gradients intact
        # (on meta too, where nothing is redone, so that the planner counts what a real step keeps).
        may_redo = run.drift == "recompute"
        for index in range(len(run.blocks) - 1, -1, -1):
            # The first block's input gradient is only worth computing if the caller's inputs need it.
            need_input_grad = index > 0 or inputs_need_grad
            args = (run, index, ys, grad_ys, grad_logdet, need_input_grad)
            if index in run.fwd_anchors:  # the exact input is at hand: no reconstruction, no drift
                new_ys, new_grad_ys, block_grads = _block_backward(*args, rebuild=_from_exact(run.fwd_anchors[index]))
                drift = torch.zeros((), device=new_ys[0].device)
            elif may_redo and _rebuilds_first(run, index):  # NOTE [drift checked before the local backward]
                writable = Writable(tuple(owned), _gradient_flags(grad_ys, foreign_grads), rebuild_first=True)
                checked: List[Tensor] = []
                result = _block_backward(*args, writable=writable, check=_drift_check(run, index, checked) if measurable else None)
                drift = checked[0] if checked else torch.zeros((), device=ys[0].device)
                if result is None:
                    result = _block_backward(*args, rebuild=_from_exact(_exact_input(run, index)))
                    recomputed.append(index)
                new_ys, new_grad_ys, block_grads = result
            else:
                gradients = (False,) * len(grad_ys) if may_redo else _gradient_flags(grad_ys, foreign_grads)
                writable = Writable(tuple(owned), gradients)
                new_ys, new_grad_ys, block_grads = _block_backward(*args, writable=writable)
                drift = fingerprint_drift(run.fingerprinter, new_ys, run.fwd_fingerprints[index]) if monitor else None
                if run.drift == "recompute" and measurable and _exceeds(drift, run.drift_tolerance):
                    exact = _exact_input(run, index)
                    new_ys, new_grad_ys, block_grads = _block_backward(*args, rebuild=_from_exact(exact))
                    recomputed.append(index)
            for i, grad in zip(run.block_params[index], block_grads):
                param_grads[i] = add_optional(param_grads[i], grad)
            owned = _owned_after(run, ys, owned, new_ys)
            new_grad_ys = _into_buffers(new_grad_ys, grad_buffers)
            ys, grad_ys = new_ys, new_grad_ys
            del args, new_ys, new_grad_ys
            if monitor:
                drifts.append(drift)
        if monitor and measurable and run.report is not None:
            values = tuple(torch.stack(drifts[::-1]).tolist()) if drifts else ()  # the one host sync of "warn" and "raise"
            run.report(DriftReport(values, run.drift_tolerance, tuple(sorted(recomputed)), run.fwd_call_site, run.drift))
        input_grads = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(grad_ys)]
        return (None, None, *input_grads, *param_grads)


# NOTE [outputs kept as aliases]
# Forward keeps the outputs as detached aliases (same storage, same version
# counter) instead of `save_for_backward`, and backward drops them from the run
# as it starts: a level the caller no longer holds then dies at its first
# rebuild instead of living until the whole backward returns. The version
# counter is shared, so an in-place change by the caller is still caught.
#
# NOTE [writing in place in backward]
# Two kinds of tensor may be overwritten in backward, and only when no one
# else can read them:
# * a level's storage ("owned"): one the engine rebuilt itself, or, when the
#   caller gave its outputs up (`release_outputs`), an output; never one that
#   shares storage with an input the caller kept (`consume_input`), an anchor
#   or another level.
# * a level's gradient ("writable"): one the engine computed, or, when the
#   caller gave its outputs up, an incoming gradient; it must be dense (not an
#   expanded scalar), not shared with another level's gradient, and not an
#   incoming gradient the caller did not give up (autograd may route the same
#   tensor to another branch of the graph). Under drift="recompute" a block
#   may be redone with the same gradients, so none is writable.
# The incoming gradients the caller gave up are held by autograd until this
# backward returns, whatever we do; each level's new gradient is written into
# its incoming buffer, so that the buffer carries it instead of sitting stale.
def _storage(x: Tensor) -> int:
    """An id of ``x``'s storage; a tensor without one (a vmap-batched gradient) gets its own, never writable."""
    try:
        return x.untyped_storage()._cdata
    except (NotImplementedError, RuntimeError):
        return -id(x)


def _is_dense(x: Tensor) -> bool:
    """Whether ``x`` covers its whole storage, each element once (an expanded scalar does not)."""
    if _storage(x) < 0 or x.untyped_storage().nbytes() != x.numel() * x.element_size():
        return False
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _take_outputs(run: InvertibleRun) -> Tensors:
    """The outputs kept by forward (NOTE [outputs kept as aliases]), dropped from the run, checked unchanged."""
    ys, run.fwd_outputs = run.fwd_outputs, None
    if ys is None:  # a second backward (retain_graph=True): the outputs, if the caller still holds them
        held = tuple(ref() for ref in run.fwd_output_refs)
        if run.release_outputs or any(y is None for y in held):
            raise InvertibleError(
                "InvertibleSequential: backward ran a second time, but the outputs it rebuilds from were "
                + ("given up (release_outputs=True)" if run.release_outputs else "freed")
                + "; keep them (and do not pass release_outputs) to backpropagate twice, or run forward again."
            )
        ys = tuple(y.detach() for y in held)
    if tuple(y._version for y in ys) != run.fwd_output_versions:
        raise InvertibleError(
            "InvertibleSequential: the output was modified in place after forward; backward "
            "rebuilds every block's input from it. Clone the output before changing it."
        )
    return ys


def _foreign_storages(run: InvertibleRun) -> set:
    """Storages backward must never overwrite: the sequence's inputs and the anchors."""
    anchored = {_storage(x) for xs in run.fwd_anchors.values() for x in xs}
    return anchored | set(run.fwd_input_storages)


def _unique_and_free(tensors: Sequence[Tensor], foreign: set) -> List[bool]:
    ids = [_storage(x) for x in tensors]
    return [ids.count(i) == 1 and i not in foreign for i in ids]


def caller_storages(xs: Tensors, consume_input: bool) -> set:
    """The storages of the caller's inputs that neither forward nor backward may overwrite: all of them, or,
    when the caller gave them up (``consume_input``), those requiring grad."""
    return {_storage(x) for x in xs if not consume_input or x.requires_grad}


def free_levels(xs: Tensors, protected: set) -> List[Tensor]:
    """The levels of ``xs`` a block's forward may write over (NOTE [forward in place] in ._state): each in a
    storage of its own and not in ``protected``, dense, not requiring grad."""
    return [x for x, free in zip(xs, _unique_and_free(xs, protected)) if free and not x.requires_grad and _is_dense(x)]


def _owned_outputs(run: InvertibleRun, ys: Tensors) -> List[bool]:
    """Which outputs backward may overwrite (NOTE [writing in place in backward])."""
    if not run.release_outputs:
        return [False] * len(ys)
    return [free and _is_dense(y) for free, y in zip(_unique_and_free(ys, _foreign_storages(run)), ys)]


def _owned_after(run: InvertibleRun, ys: Tensors, owned: Sequence[bool], new_ys: Tensors) -> List[bool]:
    """Ownership of the rebuilt levels: a level sharing an old level's storage inherits it, a fresh one is owned."""
    old = {}
    for y, own in zip(ys, owned):
        old[_storage(y)] = own and _storage(y) not in old
    free = _unique_and_free(new_ys, _foreign_storages(run))
    return [ok and old.get(_storage(y), True) for ok, y in zip(free, new_ys)]


def _writable_gradients(run: InvertibleRun, ys: Tensors, grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """The incoming gradients backward may overwrite, per level (``None``: not this one)."""
    if not run.release_outputs:
        return [None] * len(grads)
    present = [g for g in grads if g is not None]
    free = iter(_unique_and_free(present, set()))
    return [
        g if g is not None and next(free) and _is_dense(g) and g.shape == y.shape and g.dtype == y.dtype else None
        for g, y in zip(grads, ys)
    ]


def _gradient_flags(grads: Sequence[Optional[Tensor]], foreign: set) -> Tuple[bool, ...]:
    """Per level, whether its current gradient may be overwritten (NOTE [writing in place in backward])."""
    present = [g for g in grads if g is not None]
    free = iter(_unique_and_free(present, foreign))
    return tuple(g is not None and next(free) and _is_dense(g) for g in grads)


def _into_buffers(grads: List[Optional[Tensor]], buffers: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Write each level's new gradient into its incoming buffer where it may, and carry the buffer instead."""
    in_use = {_storage(g) for g in grads if g is not None}
    out = list(grads)
    for j, (grad, buffer) in enumerate(zip(grads, buffers)):
        if grad is None or buffer is None or _storage(buffer) in in_use:
            continue
        if grad.shape == buffer.shape and grad.dtype == buffer.dtype:
            buffer.copy_(grad)
            out[j] = buffer
    return out


def _check_parameters_unchanged(run: InvertibleRun) -> None:
    """Backward rebuilds every block with its parameters: they must hold forward's values, as autograd requires."""
    for index, (block, versions) in enumerate(zip(run.blocks, run.fwd_parameter_versions)):
        for (name, p), version in zip(block.named_parameters(), versions):
            if p._version != version:
                raise InvertibleError(
                    f"{run.where}: parameter {name!r} of block {index} ({type(block).__name__}) was modified in "
                    f"place after forward (version {version} -> {p._version}), e.g. by optimizer.step() before "
                    "backward(); backward rebuilds every block with the parameters forward used. Call backward() "
                    "before changing the parameters, or run forward again after changing them."
                )


def _check_anchors_unchanged(run: InvertibleRun) -> None:
    for index, xs in run.fwd_anchors.items():
        if tuple(x._version for x in xs) != run.fwd_anchor_versions[index]:
            raise InvertibleError(
                f"{run.where}: the input of block {index}, kept for drift={run.drift!r} / anchor_every="
                f"{run.anchor_every}, was modified in place after forward; clone it before changing it."
            )


def _exceeds(drift: Tensor, tolerance: float) -> bool:
    """Whether ``drift`` is over ``tolerance`` on any rank (NaN counts as over); syncs the host."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        drift = drift.clone()
        torch.distributed.all_reduce(drift, op=torch.distributed.ReduceOp.MAX)
    return not float(drift) <= tolerance


def _replay(run: InvertibleRun, index: int):
    """Block ``index``'s forward RNG state, for each of its evaluations inside (NOTE [one RNG replay per evaluation])."""
    return replaying(run.fwd_rng[index])


# NOTE [input source]
# Under drift="recompute" a drifting block is redone from an exact input, so
# block 0's input is normally kept for the whole backward: one state more. A
# caller that can compute the input again (PyramidFlow: the pyramid of the
# images it holds anyway) passes `input_source`; then nothing is kept, block 0
# is rebuilt like any other, and only a drift calls the source (its state
# then exists while that block is redone). The source's values must be the
# forward's: the caller checks its own inputs were not changed in between.
def _exact_input(run: InvertibleRun, index: int) -> Tensors:
    """Block ``index``'s exact input: forward again from the nearest anchor at or below it (or from the source)."""
    anchored = [i for i in run.fwd_anchors if i <= index]
    if anchored:
        start = max(anchored)
        xs = run.fwd_anchors[start]
    else:
        start = 0
        with torch.no_grad():
            xs = tuple(run.input_source())
    with torch.no_grad(), run.fwd_autocast.replay(), overwritable(()):  # anchors and the source's levels stay
        for j in range(start, index):
            block = run.blocks[j]
            with recomputation(block), _replay(run, j):
                xs = tuple(block(xs)[0])
    return xs


def _from_exact(xs: Tensors) -> Callable[[InvertibleModule, Tensors], Tuple[Tensors, Tensors, LogDet]]:
    """A ``rebuild`` for :func:`_block_backward` that ignores the outputs and runs forward from ``xs``."""

    def rebuild(block: InvertibleModule, ys: Tensors, writable: Optional[Writable] = None) -> Tuple[Tensors, Tensors, LogDet]:
        leaves = tuple(_leaf(x) for x in xs)
        with rebuilding():  # NOTE [rebuilding in backward]
            ys_local, logdet_local = block(leaves)
        return leaves, tuple(ys_local), logdet_local

    return rebuild


# NOTE [drift checked before the local backward]
# Under drift="recompute" a drifting block is redone with the same incoming
# gradients, so a block that rebuilds its input during its local backward
# (a fused one) may not overwrite them: one more copy of its levels'
# gradients. A block that can rebuild its input first (rebuilds_before_backward)
# is asked to (Writable.rebuild_first); the engine checks the drift between
# reconstruct and the local backward, and redoes a drifting block before any
# gradient is touched, so the gradients stay writable. On meta nothing is
# checked (no values), and the flags are those of a step that did not drift.
def _rebuilds_first(run: InvertibleRun, index: int) -> bool:
    block = run.blocks[index]
    return bool(getattr(block, "rebuilds_before_backward", False)) and _takes_writable(block) and not run.fwd_autocast.regions


def _drift_check(run: InvertibleRun, index: int, checked: List[Tensor]) -> Callable[[Tensors], bool]:
    """A check for :func:`_block_backward`: stores the rebuilt input's drift, says whether it is too large."""

    def check(xs: Tensors) -> bool:
        checked.append(fingerprint_drift(run.fingerprinter, xs, run.fwd_fingerprints[index]))
        return _exceeds(checked[-1], run.drift_tolerance)

    return check


def _takes_writable(block: InvertibleModule) -> bool:
    """Whether the block's ``reconstruct`` accepts ``writable=`` (so it may rebuild in place)."""
    try:
        return "writable" in inspect.signature(block.reconstruct).parameters
    except (TypeError, ValueError):
        return False


def _reconstruct(block: InvertibleModule, ys: Tensors, writable: Optional[Writable] = None) -> Tuple[Tensors, Tensors, LogDet]:
    if writable is not None and _takes_writable(block):
        return block.reconstruct(ys, writable=writable)
    return block.reconstruct(ys)


def _block_backward(
    run: InvertibleRun,
    index: int,
    ys: Tensors,
    grad_ys: List[Optional[Tensor]],
    grad_logdet: Optional[Tensor],
    need_input_grad: bool = True,
    rebuild: Callable[..., Tuple[Tensors, Tensors, LogDet]] = _reconstruct,
    writable: Optional[Writable] = None,
    check: Optional[Callable[[Tensors], bool]] = None,
) -> Optional[Tuple[Tensors, List[Optional[Tensor]], List[Optional[Tensor]]]]:
    """Rebuild block ``index``'s inputs and push the gradient through it, once.

    ``check``, if given, sees the rebuilt inputs before the local backward; when it returns ``True``
    nothing is backpropagated and the result is ``None`` (NOTE [drift checked before the local backward]).

    Returns:
        ``(xs, grad_xs, grads)``: the block's inputs (detached), their
        gradients, and the gradients of the block's parameters in the order of
        ``run.block_params[index]`` (the caller accumulates them).
    """
    block = run.blocks[index]
    params = [run.params[i] for i in run.block_params[index]]
    with torch.enable_grad(), recomputation(block), run.fwd_autocast.replay(), _replay(run, index):
        detached = tuple(y.detach() for y in ys)
        xs, ys_local, logdet_local = rebuild(block, detached) if writable is None else rebuild(block, detached, writable)
        del detached
    _internal_assert(len(ys_local) == len(ys), f"block {index} reconstructed {len(ys_local)} outputs for {len(ys)}")
    if check is not None and check(tuple(x.detach() for x in xs)):
        return None
    # Outputs that are one of the inputs (levels a block passes through) take
    # their gradient directly, without a trip through autograd.
    grad_xs: List[Optional[Tensor]] = [None] * len(xs)
    outputs, grad_outputs = [], []
    for y_local, grad_y in zip(ys_local, grad_ys):
        passthrough = next((j for j, x in enumerate(xs) if x is y_local), None)
        if passthrough is not None:
            grad_xs[passthrough] = add_optional(grad_xs[passthrough], grad_y)
        elif y_local.requires_grad and grad_y is not None:
            outputs.append(y_local)
            grad_outputs.append(grad_y)
    if logdet_local is not None and logdet_local.requires_grad and grad_logdet is not None:
        outputs.append(logdet_local)
        grad_outputs.append(grad_logdet)
    inputs = [j for j, x in enumerate(xs) if x.requires_grad] if need_input_grad else []
    wrt = [xs[j] for j in inputs] + list(params)
    block_grads: List[Optional[Tensor]] = [None] * len(params)
    if outputs and wrt:
        computed = torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True)
        computed_iter = iter(computed)
        for j in inputs:
            grad_xs[j] = add_optional(grad_xs[j], next(computed_iter))
        block_grads = list(computed_iter)
    # Read xs only now: a fused reconstruct may fill them during the local backward.
    new_ys = tuple(x.detach() for x in xs)
    if need_input_grad:  # else the caller drops them: no zero-filled levels at the last step
        grad_xs = [g if g is not None else torch.zeros_like(x) for g, x in zip(grad_xs, new_ys)]
    return new_ys, grad_xs, block_grads


def run_invertible(run: InvertibleRun, xs: Tensors) -> Tuple[Tensors, Tensor]:
    """Apply the blocks of ``run`` to ``xs`` under the invertible Function."""
    out = _InvertibleFunction.apply(run, len(xs), *xs, *run.params)
    return tuple(out[:-1]), out[-1]
