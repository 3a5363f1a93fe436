"""The autograd Function behind invertible mode: keep the outputs, rebuild the rest.

Forward runs the blocks without a graph and keeps only the final outputs (and
per-block RNG states, a few bytes each). Backward walks the blocks in reverse:
each block rebuilds its input from its output (:meth:`InvertibleModule.reconstruct`)
with a local graph, the upstream gradient is pushed through that graph, and the
graph is dropped before the next block. Peak activation memory is one block's
working set, whatever the depth.

Parameters are inputs of the Function, so their gradients come out of its
backward and reach ``param.grad`` through autograd's own accumulation: the
hooks of ``DistributedDataParallel`` fire as for any other module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._state import AutocastState, RngState, recomputation
from .block import InvertibleModule, LogDet, Tensors, add_optional
from .errors import InvertibleError, _internal_assert

__all__ = ["InvertibleRun", "run_invertible"]


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


class _InvertibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: InvertibleRun, num_inputs: int, *tensors: Tensor):  # type: ignore[override]
        # notation: xs the current state (a tuple of level tensors), total the summed logdet.
        xs: Tensors = tuple(tensors[:num_inputs])
        run.fwd_autocast = AutocastState.capture()
        run.fwd_rng = []
        total: LogDet = None
        for block in run.blocks:
            run.fwd_rng.append(RngState.capture(xs) if run.preserve_rng_state else None)
            xs, logdet = block(xs)
            total = add_optional(total, logdet)
        ys = tuple(xs)
        run.has_logdet = total is not None
        if total is None:
            total = ys[0].new_zeros(ys[0].shape[0])
            ctx.mark_non_differentiable(total)
        ctx.run = run
        ctx.save_for_backward(*ys)
        return (*ys, total)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        run: InvertibleRun = ctx.run
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "InvertibleSequential does not support double backward or torch.autograd.grad(..., "
                "create_graph=True); call .backward() once, or use mode='autograd' for higher derivatives."
            )
        try:
            ys: Tensors = ctx.saved_tensors
        except RuntimeError as error:
            if "inplace" not in str(error):
                raise
            raise InvertibleError(
                "InvertibleSequential: the output was modified in place after forward; backward "
                "rebuilds every block's input from it. Clone the output before changing it."
            ) from error
        grad_ys: List[Optional[Tensor]] = list(grads[:-1])
        grad_logdet = grads[-1] if run.has_logdet else None
        param_grads: List[Optional[Tensor]] = [None] * len(run.params)
        inputs_need_grad = any(ctx.needs_input_grad[2 : 2 + len(ys)])
        for index in range(len(run.blocks) - 1, -1, -1):
            # The first block's input gradient is only worth computing if the caller's inputs need it.
            need_input_grad = index > 0 or inputs_need_grad
            ys, grad_ys = _block_backward(run, index, ys, grad_ys, grad_logdet, param_grads, need_input_grad)
        input_grads = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(grad_ys)]
        return (None, None, *input_grads, *param_grads)


def _block_backward(
    run: InvertibleRun,
    index: int,
    ys: Tensors,
    grad_ys: List[Optional[Tensor]],
    grad_logdet: Optional[Tensor],
    param_grads: List[Optional[Tensor]],
    need_input_grad: bool = True,
) -> Tuple[Tensors, List[Optional[Tensor]]]:
    """Rebuild block ``index``'s inputs and push the gradient through it, once."""
    block = run.blocks[index]
    params = [run.params[i] for i in run.block_params[index]]
    rng = run.fwd_rng[index]
    with torch.enable_grad(), recomputation(block), run.fwd_autocast.replay():
        if rng is None:
            xs, ys_local, logdet_local = block.reconstruct(tuple(y.detach() for y in ys))
        else:
            with rng.replay():
                xs, ys_local, logdet_local = block.reconstruct(tuple(y.detach() for y in ys))
    _internal_assert(len(ys_local) == len(ys), f"block {index} reconstructed {len(ys_local)} outputs for {len(ys)}")
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
    if outputs and wrt:
        computed = torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True)
        computed_iter = iter(computed)
        for j in inputs:
            grad_xs[j] = add_optional(grad_xs[j], next(computed_iter))
        for i, grad in zip(run.block_params[index], computed_iter):
            param_grads[i] = add_optional(param_grads[i], grad)
    # Read xs only now: a fused reconstruct may fill them during the local backward.
    new_ys = tuple(x.detach() for x in xs)
    grad_xs = [g if g is not None else torch.zeros_like(x) for g, x in zip(grad_xs, new_ys)]
    return new_ys, grad_xs


def run_invertible(run: InvertibleRun, xs: Tensors) -> Tuple[Tensors, Tensor]:
    """Apply the blocks of ``run`` to ``xs`` under the invertible Function."""
    out = _InvertibleFunction.apply(run, len(xs), *xs, *run.params)
    return tuple(out[:-1]), out[-1]
