"""Helpers for data-parallel training: the process group from ``torchrun``'s environment, a resumable
rank-aware batch sampler, the differentiable gather of latents for the pairwise loss, and the DDP wrapper.

# NOTE [global batch under DDP]
The pairwise loss couples every pair of images in a batch, so a data-parallel run must see the pairs
of the *global* batch, not only those within each rank's share. Each rank runs the flow on its share,
gathers all shares' latents with :func:`torch.distributed.nn.functional.all_gather` (differentiable)
and computes the same loss over the whole global batch. The gather's backward sums, over ranks, the
gradients every rank's copy of the loss sends to a rank's latents, i.e. ``world_size`` times the
gradient of one loss; DistributedDataParallel then averages parameter gradients over ranks, dividing
by ``world_size`` again. The result equals the single-process gradient of the global batch
(``tests/train/test_train.py::test_two_gloo_processes_match_one_process`` checks it).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["DistributedContext", "EpochBatchSampler", "gather_levels", "init_distributed", "wrap_data_parallel"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) run.

    Attributes:
        rank: global rank, 0 for a single process.
        world_size: number of processes, 1 for a single process.
        local_rank: rank on this machine (selects the CUDA device).
        created_group: whether :func:`init_distributed` created the process group (and so must
            destroy it at the end).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and shows the progress bar."""
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"distributed: environment variable {name}={value!r} is not an integer; unset it or use torchrun.") from None


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group described by ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (as set by torchrun).

    Without those variables (or with ``WORLD_SIZE=1``) this is a single-process run and nothing is
    initialised. An already initialised default group is used as it is.

    Args:
        device_type: ``"cpu"`` (gloo backend) or ``"cuda"`` (nccl backend).

    Returns:
        The :class:`DistributedContext`.

    Raises:
        ValueError: malformed environment variables, or a rank outside ``[0, WORLD_SIZE)``.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=_env_int("LOCAL_RANK", 0),
            created_group=False,
        )
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedContext()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"distributed: RANK={rank} is outside [0, WORLD_SIZE={world_size}); launch with torchrun.")
    if not dist.is_available():
        raise RuntimeError("distributed: WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process.")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, created_group=True)


class EpochBatchSampler(Sampler[list]):
    """Batches of a seeded per-epoch shuffle, this rank's share of each global batch, resumable mid-epoch.

    Epoch ``e`` shuffles the indices with a fresh ``torch.Generator`` seeded with ``seed + e`` (as
    ``DistributedSampler`` does), cuts the permutation into global batches of ``global_batch_size``
    (an incomplete last batch is dropped: the loss needs pairs, and every rank must see the same
    number of steps), and yields rank ``r``'s contiguous slice of each. The union of the ranks' slices
    is exactly the single-process batch, so a run on any number of processes sees the same pairs.

    The whole state is ``(seed, epoch, batch)``: no generator state needs saving, and a resumed run
    skips the batches already used in the current epoch.

    Args:
        dataset_size: number of items.
        global_batch_size: images per optimizer step over all ranks.
        seed: base seed of the shuffles.
        rank: this process's rank.
        world_size: number of processes; must divide ``global_batch_size``.
    """

    def __init__(self, dataset_size: int, global_batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch_size % world_size:
            raise ValueError(
                f"EpochBatchSampler: batch_size={global_batch_size} is not divisible by the {world_size} processes; "
                f"use a multiple of {world_size}."
            )
        if dataset_size < global_batch_size:
            raise ValueError(
                f"EpochBatchSampler: the data set has {dataset_size} images, fewer than batch_size={global_batch_size}; "
                f"add images or lower the batch size."
            )
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch_size

    def set_position(self, epoch: int, batch: int) -> None:
        """Start the next iteration at global batch ``batch`` of epoch ``epoch``."""
        self.epoch = epoch
        self.start_batch = batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batch": self.start_batch}

    def permutation(self, epoch: int) -> Tensor:
        """The shuffle of epoch ``epoch`` (same on every rank)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list]:
        order = self.permutation(self.epoch).tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            begin = batch * self.global_batch_size + self.rank * self.local_batch_size
            yield order[begin : begin + self.local_batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def gather_levels(levels: Sequence[Tensor], group=None) -> tuple[Tensor, ...]:
    """Concatenate every rank's levels along the batch, differentiably (see ``NOTE [global batch under DDP]``).

    Args:
        levels: this rank's tensors, each ``(b, ...)``; the same shapes on every rank.
        group: the process group (default: the default group).

    Returns:
        One tensor per level, ``(world_size * b, ...)``, in rank order.
    """
    from torch.distributed.nn.functional import all_gather

    with _quiet_deprecation():
        return tuple(torch.cat(all_gather(level.contiguous(), group=group), dim=0) for level in levels)


def wrap_data_parallel(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """``model`` in DistributedDataParallel, and the process group of its own collectives.

    A separate group carries the latent gather and the volume-normalisation means, so that these
    collectives never interleave with DDP's gradient buckets on the default group.

    Args:
        model: a PyramidFlow (its running means are synchronised over the new group).
        device: this rank's device.

    Returns:
        The wrapped model (for the training forward) and the group (for :func:`gather_levels`).
    """
    from torch.nn.parallel import DistributedDataParallel

    group = dist.new_group()
    model.synchronize_volume_norm(group)  # NOTE [volume normalisation across ranks]
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  **_no_buffer_broadcast())
    return net, group


def _no_buffer_broadcast() -> dict:
    """DDP option to skip the per-forward buffer broadcast: the synced running means agree on every rank.

    Newer torch names it ``forward_sync_buffers`` (``broadcast_buffers`` is deprecated there).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """torch >= 2.10 marks torch.distributed.nn.functional deprecated in favour of a private module;
    it is still the public differentiable collective, so its FutureWarning is silenced per call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.nn\.functional.*deprecated", category=FutureWarning)
        yield
