"""Stopping a diverged run: a NaN or infinite loss or weight ends training before a checkpoint holds it.

The loss of each step stays on the device (reading it every step would make the host wait for the
device every step). :func:`stop_if_not_finite` moves the pending losses to the host in one sync, at
each logging interval and before every checkpoint, and raises
:class:`~pyramidflow.train.config.TrainingDivergedError` with the step, the last good checkpoint
and the way out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from pyramidflow.train.config import TrainingDivergedError

__all__ = ["stop_if_not_finite"]


def stop_if_not_finite(
    pending: Sequence[Tensor],
    losses: list[float],
    step: int,
    *,
    params: Sequence[Tensor] | None = None,
    path: Path,
    saved_step: int | None,
    lr: float,
) -> None:
    """Append the ``pending`` losses to ``losses`` (one host sync); stop on a non-finite loss or weight.

    Args:
        pending: the 0-d loss tensors of the steps up to ``step``, still on the device.
        losses: the run's loss history on the host, extended in place.
        step: the step of the last pending loss.
        params: also check these weights (before writing a checkpoint); ``None`` skips them.
        path: the run's checkpoint; ``saved_step``: the step it holds (``None``: none written yet).
        lr: the learning rate, named in the advice.

    Raises:
        TrainingDivergedError: a loss or a weight is NaN or infinite.
    """
    if pending:
        values = torch.stack(list(pending)).double().cpu()
        first = step - len(pending) + 1
        bad = (~torch.isfinite(values)).nonzero()
        losses.extend(values.tolist())
        if bad.numel():
            at = first + int(bad[0, 0])
            raise _diverged(f"the loss became {values[int(bad[0, 0])].item()} at step {at}", path, saved_step, lr)
    if params is not None:
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
        if not bool(finite):
            raise _diverged(f"a weight became NaN/inf by step {step}", path, saved_step, lr)


def _diverged(what: str, path: Path, saved_step: int | None, lr: float) -> TrainingDivergedError:
    kept = (
        f"the last good checkpoint {path} (step {saved_step}) is kept"
        if saved_step is not None
        else f"no checkpoint was written ({path} untouched)"
    )
    return TrainingDivergedError(
        f"train: {what}; stopped without saving, {kept}; lower lr (now {lr}) or check the data."
    )
