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
nearest anchor by running forward again (:mod:`.drift_recompute`), as checkpoint
mode would. What backward may overwrite is decided in :mod:`.ownership`.

Parameters are inputs of the Function, so their gradients come out of its
backward and reach ``param.grad`` through autograd's own accumulation: the
hooks of ``DistributedDataParallel`` fire as for any other module.
"""

from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._state import AutocastState, RngState, capturing, recomputation, replaying
from .block import CallContext, LogDet, Tensors, Writable, add_optional, call_forward, call_reconstruct
from .drift import compute_dtype, default_tolerance, fingerprint_drift
from .drift_recompute import drift_check, exact_input, exceeds, from_exact, rebuilds_first
from .errors import InvertibleError, _internal_assert
from .ownership import (
    caller_storages,
    free_levels,
    gradient_flags,
    into_buffers,
    owned_after,
    owned_outputs,
    storage_id,
    writable_gradients,
)
from .run import DriftReport, InvertibleRun

__all__ = ["run_invertible", "local_backward"]

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
                protected |= {storage_id(x) for x in xs}
            context = CallContext.now(overwritable=free_levels(xs, protected))  # NOTE [forward in place]
            with capturing(run.fwd_rng[-1]):  # NOTE [the block's RNG state, named]
                xs, logdet = call_forward(block, xs, context)
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
        owned = owned_outputs(run, ys)
        grad_buffers = writable_gradients(run, ys, grad_ys)
        # Incoming gradients not given up are the caller's: never written (NOTE [writing in place in backward]).
        foreign_grads = {storage_id(g) for g, b in zip(grad_ys, grad_buffers) if g is not None and b is None}
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
                new_ys, new_grad_ys, block_grads = _block_backward(*args, rebuild=from_exact(run.fwd_anchors[index]))
                drift = torch.zeros((), device=new_ys[0].device)
            elif may_redo and rebuilds_first(run, index):  # NOTE [drift checked before the local backward]
                writable = Writable(tuple(owned), gradient_flags(grad_ys, foreign_grads), rebuild_first=True)
                checked: List[Tensor] = []
                result = _block_backward(*args, writable=writable, check=drift_check(run, index, checked) if measurable else None)
                drift = checked[0] if checked else torch.zeros((), device=ys[0].device)
                if result is None:
                    result = _block_backward(*args, rebuild=from_exact(exact_input(run, index)))
                    recomputed.append(index)
                new_ys, new_grad_ys, block_grads = result
            else:
                gradients = (False,) * len(grad_ys) if may_redo else gradient_flags(grad_ys, foreign_grads)
                writable = Writable(tuple(owned), gradients)
                new_ys, new_grad_ys, block_grads = _block_backward(*args, writable=writable)
                drift = fingerprint_drift(run.fingerprinter, new_ys, run.fwd_fingerprints[index]) if monitor else None
                if run.drift == "recompute" and measurable and exceeds(drift, run.drift_tolerance):
                    exact = exact_input(run, index)
                    new_ys, new_grad_ys, block_grads = _block_backward(*args, rebuild=from_exact(exact))
                    recomputed.append(index)
            for i, grad in zip(run.block_params[index], block_grads):
                param_grads[i] = add_optional(param_grads[i], grad)
            owned = owned_after(run, ys, owned, new_ys)
            new_grad_ys = into_buffers(new_grad_ys, grad_buffers)
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


def _block_backward(
    run: InvertibleRun,
    index: int,
    ys: Tensors,
    grad_ys: List[Optional[Tensor]],
    grad_logdet: Optional[Tensor],
    need_input_grad: bool = True,
    rebuild: Callable[..., Tuple[Tensors, Tensors, LogDet]] = call_reconstruct,
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
    with torch.enable_grad(), recomputation(block), run.fwd_autocast.replay(), replaying(run.fwd_rng[index]):  # NOTE [one RNG replay per evaluation]
        detached = tuple(y.detach() for y in ys)
        xs, ys_local, logdet_local = rebuild(block, detached) if writable is None else rebuild(block, detached, writable)
        del detached
    _internal_assert(len(ys_local) == len(ys), f"block {index} reconstructed {len(ys_local)} outputs for {len(ys)}")
    if check is not None and check(tuple(x.detach() for x in xs)):
        return None
    grad_xs, block_grads = local_backward(xs, ys_local, logdet_local, grad_ys, grad_logdet, params, need_input_grad)
    # Read xs only now: a fused reconstruct may fill them during the local backward.
    new_ys = tuple(x.detach() for x in xs)
    if need_input_grad:  # else the caller drops them: no zero-filled levels at the last step
        grad_xs = [g if g is not None else torch.zeros_like(x) for g, x in zip(grad_xs, new_ys)]
    return new_ys, grad_xs, block_grads


def local_backward(
    xs: Tensors,
    ys_local: Tensors,
    logdet_local: LogDet,
    grad_ys: Sequence[Optional[Tensor]],
    grad_logdet: Optional[Tensor],
    params: Sequence[Tensor],
    need_input_grad: bool = True,
) -> Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]:
    """Push ``grad_ys`` (and ``grad_logdet``) through one rebuilt block's local graph.

    Returns:
        ``(grad_xs, grads)``: per input, its gradient (``None``: none reached it, or not asked), and
        per parameter in ``params``, its gradient or ``None``.
    """
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
    return grad_xs, block_grads


def run_invertible(run: InvertibleRun, xs: Tensors) -> Tuple[Tensors, Tensor]:
    """Apply the blocks of ``run`` to ``xs`` under the invertible Function."""
    out = _InvertibleFunction.apply(run, len(xs), *xs, *run.params)
    return tuple(out[:-1]), out[-1]
