"""THE training step: forward, the objective's loss, backward, gradient clipping, Adam.

The training loop runs it; ``ablate`` measures its peak memory and ``plan`` predicts that peak, so
all three count the same step: the loss the model config's ``objective`` names, the clipping and the
Adam settings of the :class:`~pyramidflow.train.config.TrainConfig`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor

from ..model.loss import objective_loss
from .config import TrainConfig

__all__ = ["make_optimizer", "step_on_random_images", "training_step"]


def make_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Adam:
    """Adam with the run's settings (the method's by default: lr 2e-4, betas (0.5, 0.9), eps 1e-4)."""
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def _loss(net: torch.nn.Module, images: Tensor, objective: str,
          gather: Optional[Callable[[tuple], tuple]]) -> Tensor:
    # The latents feed the loss alone and are not read once backward starts: they are given up
    # (``release_outputs``), so invertible backward reuses their storage and their gradients'.
    if objective == "gaussian_nll":  # volume_norm=None ablation: per sample, so no gather under DDP
        levels, logdet = net(images, return_logdet=True, release_outputs=True)
        return objective_loss(objective, levels, logdet)
    levels = tuple(net(images, release_outputs=True))
    if gather is not None:
        levels = gather(levels)  # NOTE [global batch under DDP]
    return objective_loss(objective, levels)


def training_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    *,
    objective: str,
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
        objective: ``PyramidFlowConfig.objective`` (``"fourier"``, ``"spatial"`` or ``"gaussian_nll"``).
        config: the run's settings: ``grad_clip`` (``None``: no clipping); the optimizer comes from
            :func:`make_optimizer`.
        gather: gathers the latents of all processes before a pairwise loss (DDP), or ``None``.
        on_forward, on_backward: called after the loss and after the backward pass (what ``plan``
            and the drift tracker observe).
        critical: a context manager around the update that a stop signal must not cut in half;
            ``after_update(loss)`` runs inside it (the loop's bookkeeping).
    """
    loss = _loss(net, images, objective, gather)
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
    """A fresh ``PyramidFlow(config)`` with its Adam, and a call that takes one :func:`training_step` of it on
    fixed random images as ``pyramidflow train`` does (its drift policy too): what the benchmarks time
    and :func:`pyramidflow.memory.plan.measure_training_peak` measures."""
    from ..model import PyramidFlow  # noqa: PLC0415

    settings = train_config or TrainConfig(steps=1)
    torch.manual_seed(0)
    model = PyramidFlow(config).to(device).train()
    model.flow.drift = settings.drift
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    images = torch.randn(batch_size, 3, size, size, device=device)
    return lambda: training_step(model, optimizer, images, objective=model.config.objective, config=settings)
