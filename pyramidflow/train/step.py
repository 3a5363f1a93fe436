"""THE training step: forward, the objective's loss, backward, gradient clipping, Adam.

The training loop runs it; ``ablate`` measures its peak memory and ``plan`` predicts that peak, so
all three count the same step: the loss the model config names (``objective``, ``loss_p``), the clipping and the
Adam settings of the :class:`~pyramidflow.train.config.TrainConfig`.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Dict, Optional, Sequence

import torch
from torch import Tensor

from ..model.loss import objective_loss
from .config import TrainConfig

if TYPE_CHECKING:
    from ..model.pyramidflow import PyramidFlowConfig

__all__ = ["StepWork", "count_step_work", "count_work", "make_optimizer", "step_on_random_images", "training_step",
           "training_step_on"]


def make_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Adam:
    """Adam with the run's settings (the method's by default: lr 2e-4, betas (0.5, 0.9), eps 1e-4)."""
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def _loss(net: torch.nn.Module, images: Tensor, model_config: PyramidFlowConfig,
          gather: Optional[Callable[[tuple], tuple]]) -> Tensor:
    # The latents feed the loss alone and are not read once backward starts: they are given up
    # (``release_outputs``), so invertible backward reuses their storage and their gradients'.
    objective = model_config.objective
    if objective == "gaussian_nll":  # volume_norm=None ablation: per sample, so no gather under DDP
        levels, logdet = net(images, return_logdet=True, release_outputs=True)
        return objective_loss(objective, levels, logdet)
    levels = tuple(net(images, release_outputs=True))
    if gather is not None:
        levels = gather(levels)  # NOTE [global batch under DDP]
    return objective_loss(objective, levels, p=model_config.loss_p)


def training_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    *,
    model_config: PyramidFlowConfig,
    config: TrainConfig,
    gather: Optional[Callable[[tuple], tuple]] = None,
    on_forward: Optional[Callable[[], None]] = None,
    on_backward: Optional[Callable[[], None]] = None,
    critical: Callable[[], ContextManager] = contextlib.nullcontext,
    after_update: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """One optimizer step on ``images``; returns the loss (not synchronised to the host).

    Args:
        net: the model, or its DDP wrapper.
        model_config: the model's settings, read for its loss: ``objective`` (``"fourier"``, ``"spatial"`` or
            ``"gaussian_nll"``) and ``loss_p`` (the pairwise losses' exponent), so that no caller passes one
            without the other.
        config: the run's settings: ``grad_clip`` (``None``: no clipping); the optimizer comes from
            :func:`make_optimizer`.
        gather: gathers the latents of all processes before a pairwise loss (DDP), or ``None``.
        on_forward, on_backward: called after the loss and after the backward pass (what ``plan``
            and the drift tracker observe).
        critical: a context manager around the update that a stop signal must not cut in half;
            ``after_update(loss)`` runs inside it (the loop's bookkeeping).
    """
    loss = _loss(net, images, model_config, gather)
    if on_forward is not None:
        on_forward()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if on_backward is not None:
        on_backward()
    if config.grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)  # no host sync
    with critical():
        optimizer.step()
        if after_update is not None:
            after_update(loss)
    return loss


def step_on_random_images(config, size: int, batch_size: int = 2, device: str | torch.device = "cpu",
                          train_config: Optional[TrainConfig] = None) -> Callable[[], Tensor]:
    """A fresh ``PyramidFlow(config)`` and a call that takes one training step of it on fixed random images
    (:func:`training_step_on`): what the benchmarks time and :func:`pyramidflow.memory.plan.measure_training_peak`
    measures."""
    from ..model import PyramidFlow  # noqa: PLC0415

    torch.manual_seed(0)
    model = PyramidFlow(config).to(device).train()
    images = torch.randn(batch_size, 3, size, size, device=device)
    return training_step_on(model, images, train_config)


def training_step_on(model: torch.nn.Module, images: Tensor,
                     train_config: Optional[TrainConfig] = None) -> Callable[[], Tensor]:
    """A call that takes one :func:`training_step` of ``model`` (a ``PyramidFlow``, possibly with its blocks
    wrapped) on ``images`` as ``pyramidflow train`` does: its Adam, clipping and drift policy."""
    settings = train_config or TrainConfig(steps=1)
    model.flow.drift = settings.drift
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    return lambda: training_step(model, optimizer, images, model_config=model.config, config=settings)


@dataclass(frozen=True)
class StepWork:
    """What one call of a step does, counted (deterministic, unlike its time).

    Attributes:
        aten_calls: every ``aten::`` op ``torch.profiler`` records, nested ones included (an op called
            by another op counts too): each is a dispatch, a parallel region on a CPU, a launch on a GPU.
        flops: the floating-point operations ``torch.utils.flop_counter.FlopCounterMode`` counts
            (convolutions, matrix products, FFTs; elementwise ops count zero).
        by_op: ``aten_calls`` per op name.
    """

    aten_calls: int
    flops: int
    by_op: Dict[str, int]


def count_step_work(config, size: int, batch_size: int = 2, train_config: Optional[TrainConfig] = None) -> StepWork:
    """The work of one :func:`step_on_random_images` step of ``PyramidFlow(config)``, after a warm-up step
    (Adam's state and the CVN running means exist)."""
    step = step_on_random_images(config, size, batch_size, train_config=train_config)
    step()
    return count_work(step)


def count_work(step: Callable[[], object]) -> StepWork:
    """The work of one call of ``step``, warmed up by the caller: it runs once under the profiler and once
    under the FLOP counter, doing the same work both times."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    calls = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    flops = FlopCounterMode(display=False)
    # Counted globally, not per module: the module tracker's hooks on module inputs fail under the
    # torch.autograd.grad that invertible backward runs inside backward.
    flops.mod_tracker = _NoModules()
    with flops:
        step()
    return StepWork(sum(calls.values()), int(flops.get_total_flops()), dict(calls))


class _NoModules(contextlib.AbstractContextManager):
    """A stand-in for FlopCounterMode's module tracker: every count goes to ``"Global"`` only."""

    parents = frozenset({"Global"})

    def __exit__(self, *exc) -> None:
        return None
