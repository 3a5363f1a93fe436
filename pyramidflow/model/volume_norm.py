"""Volume normalisation (VN): the running-mean state of a coupling's log-scale.

VN subtracts a mean of the clamped log-scale ``s`` so that ``Σ s = 0`` over
the normalised dimensions, which makes a coupling preserve volume over the
batch (Sec. 3.3 of the PyramidFlow paper). The maths of the subtraction lives
in :func:`pyramidflow.kernels.log_scale`; this module only keeps the running
mean used in eval mode and updates it in training, like batch norm.

* ``"CVN"`` (channel VN): mean over batch and channel, per pixel; the running
  mean has shape ``(1, 1, H, W)`` and is therefore tied to the resolution it
  was trained at.
* ``"SVN"`` (spatial VN): mean over batch and space, per channel; the running
  mean has shape ``(1, C, 1, 1)`` and works at any resolution.
* ``None`` (the paper's "without VN" ablation): nothing is subtracted and no
  running mean is kept; the coupling then has a log-determinant.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import kernels
from ..kernels.reference import volume_norm_dims

__all__ = ["VOLUME_NORM_MODES", "VOLUME_NORM_CHOICES", "VolumeNorm"]

VOLUME_NORM_MODES = ("CVN", "SVN")
# The modes a model may be built with: the two VN modes, or None for no volume normalisation (ablation).
VOLUME_NORM_CHOICES = (*VOLUME_NORM_MODES, None)


# NOTE [running mean updated once per step]
# The update happens in the coupling's forward only (never in inverse or
# in the fused reconstruct). The engine snapshots and restores buffers
# around every recomputation in backward, so a forward re-run there (the
# generic reconstruct path, or checkpoint mode) leaves no trace.

# NOTE [CVN resolution]
# A per-pixel running mean only makes sense at the resolution it was
# estimated at. The buffer is allocated at the first training forward, and
# that resolution is kept in the ``resolution`` buffer (so it travels with
# the state dict). Eval at another size raises instead of broadcasting or
# silently resizing. Before any training step the running mean is zero at
# any size, as batch norm's is.
class VolumeNorm(nn.Module):
    """Running mean of the volume-normalised log-scale, for one coupling.

    In training the coupling normalises with the batch mean and calls
    :meth:`update` with it; in eval it normalises with the running mean from :meth:`mean_for`.

    Args:
        mode: ``"CVN"`` or ``"SVN"``.
        channels: channels C of the level this VN normalises.
        momentum: weight of the new batch mean in the running mean, in ``(0, 1]``.
    """

    def __init__(self, mode: str, channels: int, momentum: float = 0.1) -> None:
        super().__init__()
        if mode not in VOLUME_NORM_CHOICES:
            raise ValueError(f"VolumeNorm: mode must be one of {VOLUME_NORM_CHOICES}, got {mode!r}.")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"VolumeNorm: momentum must lie in (0, 1], got {momentum}.")
        self.mode = mode
        self.channels = channels
        self.momentum = momentum
        shape = (1, channels, 1, 1) if mode == "SVN" else (0,)
        self.register_buffer("running_mean", torch.zeros(shape))
        # CVN only: (height, width) of the level the running mean was estimated at; (0, 0) until the
        # first training step (SVN leaves it at zero: its statistics do not depend on the size).
        self.register_buffer("resolution", torch.zeros(2, dtype=torch.long))
        self.process_group = None  # set by synchronize(): NOTE [volume normalisation across ranks]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, channels={self.channels}, momentum={self.momentum}"

    def reset_running_stats(self) -> None:
        """Forget the running mean (and, for CVN, its resolution), e.g. to train at a new size."""
        if self.mode == "CVN":
            self.running_mean.data = self.running_mean.new_zeros((0,))
        else:
            self.running_mean.zero_()
        self.resolution.zero_()

    def synchronize(self, process_group) -> None:
        """Normalise with the batch mean of all ranks of ``process_group`` in training (``None``: this rank's)."""
        self.process_group = process_group

    def mean_for(self, r: Tensor, clamp: float) -> Optional[Tensor]:
        """The mean to subtract from the clamped log-scale of ``r`` ``(N, C, H, W)``.

        Returns ``None`` in training (the op normalises with the batch mean),
        the global batch mean when synchronized across ranks (with its graph),
        and the running mean, in ``r``'s dtype, in eval.

        Raises:
            ValueError: in eval with CVN at a resolution other than the trained one.
        """
        if self.mode is None:
            return None
        if self.training:
            return None if self.process_group is None else self._global_batch_mean(r, clamp)
        if self.mode == "SVN":
            return self.running_mean.to(r.dtype)
        size = tuple(r.shape[-2:])
        if self.running_mean.numel() == 0:  # never trained: zero, as batch norm's initial running mean
            return r.new_zeros((1, 1) + size)
        if tuple(self.running_mean.shape[-2:]) != size:
            trained = tuple(self.running_mean.shape[-2:])
            raise ValueError(
                f"VolumeNorm (CVN): eval at level size {size[0]}×{size[1]}, but the per-pixel running mean was "
                f"trained at {trained[0]}×{trained[1]}; run at the training resolution, or use volume_norm='SVN' "
                "for resolution-free statistics."
            )
        return self.running_mean.to(r.dtype)

    @torch.no_grad()
    def update(self, batch_mean: Optional[Tensor], region: Optional[Tuple[slice, slice]] = None,
               size: Optional[Tuple[int, int]] = None) -> None:
        """Fold a batch mean (from :func:`pyramidflow.kernels.log_scale` or :meth:`mean_for`) into the running mean.

        ``region``: the rows and columns of a level of ``size`` that a CVN mean covers (a tiled forward
        folds each tile's mean as it comes, so no level-sized mean is assembled); ``None``: all of it.
        """
        if batch_mean is None or not self.training or self.mode is None:
            return
        batch_mean = batch_mean.detach()
        running = self.running_mean
        if self.mode == "CVN":
            size = tuple(batch_mean.shape[-2:]) if size is None else tuple(size)
            if self.running_mean.numel() == 0:
                # Resize in place (`.data`), keeping the buffer object that DDP and the engine hold.
                self.running_mean.data = torch.zeros(
                    (1, 1) + size, dtype=self.running_mean.dtype, device=batch_mean.device
                )
                self.resolution.copy_(torch.tensor(size, dtype=torch.long))
            elif tuple(self.running_mean.shape[-2:]) != size:
                trained = tuple(self.running_mean.shape[-2:])
                raise ValueError(
                    f"VolumeNorm (CVN): training at level size {size[0]}×{size[1]}, but the per-pixel running "
                    f"mean was started at {trained[0]}×{trained[1]}; train at one resolution, call "
                    "model.reset_running_stats() before changing it, or use volume_norm='SVN'."
                )
            running = self.running_mean if region is None else self.running_mean[(..., *region)]
        running.mul_(1.0 - self.momentum).add_(batch_mean.to(running.dtype), alpha=self.momentum)

    # NOTE [volume normalisation across ranks]
    # VN subtracts the *batch* mean of the log-scale. Under DDP each rank holds
    # only its share of the batch, so a per-rank mean would make data-parallel
    # training a different algorithm from one process (as BatchNorm differs from
    # SyncBatchNorm). Synchronized, the mean is the all-reduced sum of every
    # rank's clamped log-scale over the global count; the all-reduce is
    # differentiable, so the gradient through the mean reaches every rank's
    # share as in one process (the kernels' dispatch runs the reference op for a
    # mean with a graph: the Triton op treats its mean as a constant). Ranks must
    # hold equal shares.
    def _global_batch_mean(self, r: Tensor, clamp: float) -> Tensor:
        from torch.distributed import get_world_size
        from torch.distributed.nn.functional import all_reduce

        dims = volume_norm_dims(self.mode)
        count = get_world_size(self.process_group)
        for d in dims:
            count *= r.shape[d]
        local_sum = kernels.soft_clamp(r, clamp).sum(dim=dims, keepdim=True)
        with warnings.catch_warnings():  # torch >= 2.10 flags this public differentiable collective as deprecated
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
            return all_reduce(local_sum, group=self.process_group) / count

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A CVN running mean is allocated lazily: take the saved shape before loading.
        key = prefix + "running_mean"
        saved = state_dict.get(key)
        if self.mode == "CVN" and saved is not None and saved.shape != self.running_mean.shape:
            self.running_mean.data = torch.zeros(saved.shape, dtype=self.running_mean.dtype, device=self.running_mean.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

