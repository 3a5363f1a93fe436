"""A coupling's rebuild and local backward a few samples at a time, where that is exact.

One block's backward peaks at its subnets' graph: their hidden activations and those activations'
gradients, for the whole batch. A block whose maths and subnets treat each sample alone (NOTE
[samples alone]) has the same gradients when it is rebuilt and backpropagated a chunk of samples
at a time, its parameters' gradients summed over the chunks; its peak is then one chunk's. The
rebuild of a chunk is the block's own (:mod:`.subnets`); only the schedule changes, as our own
coupling runs its network one sample at a time (NOTE [regions] in :mod:`pyramidflow.model.coupling_regions`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._meta import samples_to_run
from ._state import AutocastState, recomputation
from .block import LogDet, Tensors, Writable, _leaf, add_optional, gradients_used
from .function import local_backward

__all__ = ["treats_samples_alone", "rebuild_chunks", "reconstruct_in_chunks", "CHUNK_ELEMENTS"]

#: The elements (over all levels) a chunk holds at least: below that, the per-call cost of a block's many
#: small ops outweighs the memory a smaller chunk saves. A chunk of issue 26's setting (C = 16, 128 px) is
#: one sample.
CHUNK_ELEMENTS = 1 << 16


# NOTE [samples alone]
# Chunking the batch is exact only where no sample's result depends on another
# sample and no evaluation draws random numbers (a chunk would draw other
# numbers than the forward's whole batch did). The block's own maths is vouched
# for by its registry entry (`Coupling.per_sample`: FrEIA's, normflows' and
# memcnn's couplings; normflows' ActNorm once its data-dependent
# initialisation is done). Its subnets are looked at, every step (their
# training mode may change): every module in each subnet's tree must be of a
# type known to act on each sample alone in its current mode, matched
# exactly (a subclass may override forward); a wrapper whose forward only
# calls its children (normflows' ConvNet2d, memcnn's affine adapters) counts
# when its children do. Anything else keeps the whole batch: a module of
# one's own, BatchNorm in training mode or without running statistics,
# dropout in training mode.
_ALONE = tuple(
    getattr(nn, name)
    for name in (
        "Sequential", "Identity", "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d",
        "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "GroupNorm", "LayerNorm",
        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU",
        "CELU", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid", "Softplus", "Softsign", "Hardtanh", "Hardswish",
        "Hardsigmoid", "Tanhshrink", "LogSigmoid", "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d",
        "ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d", "MaxPool2d", "AvgPool2d",
        "AdaptiveAvgPool2d", "PixelShuffle", "PixelUnshuffle",
    )
)
_ALONE_IN_EVAL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_WRAPPERS = (
    ("normflows.nets.cnn", "ConvNet2d"),
    ("memcnn.models.affine", "AffineAdapterNaive"),
    ("memcnn.models.affine", "AffineAdapterSigmoid"),
)


def _module_alone(m: nn.Module) -> bool:
    cls = type(m)
    if cls in _ALONE:
        return True
    if cls in _ALONE_IN_EVAL:
        return not m.training and getattr(m, "running_mean", True) is not None
    module, name = cls.__module__, cls.__qualname__
    return (module, name) in _WRAPPERS and getattr(sys.modules.get(module), name, None) is cls


def treats_samples_alone(subnet: nn.Module) -> bool:
    """Whether every module of ``subnet`` is known to act on each sample alone, drawing no random
    numbers, in its current mode (NOTE [samples alone])."""
    return all(_module_alone(m) for m in subnet.modules())


def rebuild_chunks(ys: Tensors, samples: Optional[int] = None) -> Optional[List[slice]]:
    """The chunks of samples to rebuild at a time, or ``None`` for the whole batch at once.

    Args:
        ys: the block's outputs, batch first (every level with the same batch).
        samples: samples per chunk; ``None``: the fewest that hold :data:`CHUNK_ELEMENTS` elements.
    """
    batch = ys[0].shape[0]
    if any(y.dim() == 0 or y.shape[0] != batch for y in ys):
        return None
    if samples is None:
        per_sample = sum(y.numel() for y in ys) // batch if batch else 1
        samples = -(-CHUNK_ELEMENTS // max(per_sample, 1))
    if samples >= batch:
        return None
    return [slice(start, min(start + samples, batch)) for start in range(0, batch, samples)]


@dataclass
class _Plan:
    """What the deferred rebuild needs: the block, its outputs, where to write, and the forward's autocast."""

    module: nn.Module
    rebuild: Callable[[Tensors], Tuple[Tensors, Tensors, LogDet]]
    ys: Tensors
    xs: Tensors
    transformed: Tuple[int, ...]
    chunks: List[slice]
    gradients_writable: Tuple[bool, ...]
    params: Tuple[Tensor, ...]
    autocast: AutocastState


# NOTE [rebuilt during the local backward]
# The engine backpropagates through a block's local outputs once and reads the
# rebuilt inputs only after that (InvertibleModule.reconstruct's contract). So
# reconstruct returns the inputs as empty leaves (or the outputs' storage,
# where the engine allows it) and placeholder outputs whose backward does the
# work: per chunk, the block's rebuild, its local backward, the chunk of the
# inputs and of their gradients written, the parameters' gradients summed. That
# backward runs after the engine's rebuild context has closed, so it replays
# the forward's autocast and restores the block's buffers itself; it needs no
# RNG replay (NOTE [samples alone]). A chunk's outputs and gradients are not
# read again once it is done, so where the engine allows it the chunk's input
# is written over its output's rows and its input's gradient over its
# incoming gradient's rows.
class _ChunkedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *xs_and_params: Tensor):  # type: ignore[override]
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        batch = plan.ys[0].shape[0]
        outputs = [plan.ys[j].new_empty(()).expand(plan.ys[j].shape) for j in plan.transformed]
        return (*outputs, plan.ys[0].new_empty(()).expand(batch))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):  # type: ignore[override]
        plan: _Plan = ctx.plan
        ctx.plan = None
        levels = len(plan.xs)
        need_xs = gradients_used(ctx, 1)[:levels]  # none where the engine's local backward skips them (the first block)
        grad_ys: List[Optional[Tensor]] = [None] * levels
        for j, grad in zip(plan.transformed, grads):
            grad_ys[j] = grad
        grad_logdet = grads[-1]
        grad_xs = [_gradient_buffer(plan, j, grad_ys[j]) if need_xs[j] else None for j in range(levels)]
        reached = [False] * levels
        grad_params: List[Optional[Tensor]] = [None] * len(plan.params)
        chunks = [plan.chunks[i] for i in samples_to_run(len(plan.chunks), plan.ys[0])]
        with torch.enable_grad(), plan.autocast.replay(), recomputation(plan.module):
            for rows in chunks:
                xs_b, ys_local, logdet_local = plan.rebuild(tuple(y[rows] for y in plan.ys))
                grads_b = [g[rows] if g is not None else None for g in grad_ys]
                logdet_b = grad_logdet[rows] if grad_logdet is not None else None
                grad_xs_b, grads_p = local_backward(xs_b, ys_local, logdet_local, grads_b, logdet_b, plan.params, any(need_xs))
                del ys_local, logdet_local, grads_b
                with torch.no_grad():
                    for j in plan.transformed:
                        plan.xs[j].detach()[rows].copy_(xs_b[j])
                    for j, (buffer, g) in enumerate(zip(grad_xs, grad_xs_b)):
                        if buffer is not None and g is not None:
                            buffer[rows].copy_(g)
                            reached[j] = True
                        elif buffer is not None:
                            buffer[rows].zero_()
                for i, g in enumerate(grads_p):
                    grad_params[i] = add_optional(grad_params[i], g)
                del xs_b, grad_xs_b, grads_p
        return (None, *[g if r else None for g, r in zip(grad_xs, reached)], *grad_params)


def _gradient_buffer(plan: _Plan, j: int, incoming: Optional[Tensor]) -> Tensor:
    """Where input level ``j``'s gradient goes: its incoming gradient, where the engine lets it be overwritten
    (NOTE [rebuilt during the local backward]), else a new tensor."""
    x = plan.xs[j]
    writable = j < len(plan.gradients_writable) and plan.gradients_writable[j]
    if writable and incoming is not None and incoming.shape == x.shape and incoming.dtype == x.dtype and incoming.is_contiguous():
        return incoming
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def reconstruct_in_chunks(
    module: nn.Module,
    rebuild: Callable[[Tensors], Tuple[Tensors, Tensors, LogDet]],
    ys: Tensors,
    passed_through: Sequence[int],
    chunks: List[slice],
    writable: Optional[Writable],
) -> Tuple[Tensors, Tensors, LogDet]:
    """A block's ``reconstruct`` whose work runs, chunk by chunk, in the local backward (NOTE [rebuilt during
    the local backward]).

    Args:
        module: the block whose parameters and buffers the rebuild uses.
        rebuild: the block's rebuild of one chunk: ``ys_chunk -> (xs_chunk, ys_local, logdet_local)``.
        ys: the block's outputs, detached.
        passed_through: the levels the block returns as they came (a FrEIA block's conditions).
        chunks: the samples of each chunk (:func:`rebuild_chunks`).
        writable: what the engine lets the rebuild overwrite.

    Returns:
        ``(xs, ys_local, logdet_local)`` as :meth:`InvertibleModule.reconstruct` does; ``xs`` hold their
        values once the engine's local backward has run.
    """
    outputs_writable = writable.outputs if writable is not None else ()
    transformed = tuple(j for j in range(len(ys)) if j not in passed_through)
    xs = []
    for j, y in enumerate(ys):
        own = j in passed_through or (j < len(outputs_writable) and outputs_writable[j])
        xs.append(_leaf(y if own else torch.empty_like(y, memory_format=torch.contiguous_format)))
    params = tuple(p for p in module.parameters() if p.requires_grad)
    plan = _Plan(
        module, rebuild, tuple(ys), tuple(xs), transformed, chunks,
        writable.gradients if writable is not None else (), params, AutocastState.capture(),
    )
    *outputs, logdet = _ChunkedBackward.apply(plan, *xs, *params)
    ys_local = list(xs)  # the levels passed through are the inputs themselves: the engine routes their gradient
    for j, y_local in zip(transformed, outputs):
        ys_local[j] = y_local
    return tuple(xs), tuple(ys_local), logdet
