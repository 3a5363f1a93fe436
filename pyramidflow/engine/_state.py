"""Capture-and-replay of the state a recomputation must share with the forward.

RNG and autocast are captured per block in forward (``fwd_*``) and replayed in
backward, as ``torch.utils.checkpoint`` does. Buffers (running statistics) are
snapshotted before a recomputation and restored after it, so they change once
per step however often a block is recomputed. The context of the block call
under way is held for the blocks that ask for it (NOTE [call context]).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


__all__ = [
    "RngState", "AutocastState", "recomputation", "calling", "is_rebuilding", "may_overwrite", "replaying",
    "replay_forward_rng",
]


@dataclass
class RngState:
    """CPU and CUDA generator states at one point of the forward."""

    cpu: Tensor
    cuda_devices: Tuple[int, ...]
    cuda: Tuple[Tensor, ...]

    @classmethod
    def capture(cls, tensors: Sequence[Tensor]) -> "RngState":
        devices = tuple(sorted({t.device.index or 0 for t in tensors if t.is_cuda}))
        cuda = tuple(torch.cuda.get_rng_state(d) for d in devices)
        return cls(torch.get_rng_state(), devices, cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with these RNG states, leaving the global streams untouched."""
        with torch.random.fork_rng(devices=list(self.cuda_devices), enabled=True):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


@contextlib.contextmanager
def _set(local: threading.local, name: str, value: object) -> Iterator[None]:
    """Set a thread-local ``name`` for the body, then restore what it was (nothing, if it was unset)."""
    unset = object()
    previous = getattr(local, name, unset)
    setattr(local, name, value)
    try:
        yield
    finally:
        if previous is unset:
            delattr(local, name)
        else:
            setattr(local, name, previous)


# NOTE [one RNG replay per evaluation]
# Backward may evaluate a block more than once: the generic reconstruct runs
# its inverse and then its forward, and each must draw what forward's call
# drew (an additive coupling with dropout in its network needs forward's mask
# in the inverse to rebuild the input, and again in the forward to get the
# local gradient). Replaying the state once around the whole rebuild gives the
# second evaluation the draws after the first's. So the engine replays the
# block's state around the rebuild (enough for a fused reconstruct, which
# evaluates the block once) and names it for the rebuild's duration
# (`replaying`); every evaluation inside starts again from it through
# `replay_forward_rng()`. Outside a rebuild that is a no-op.
_REPLAYING = threading.local()


@contextlib.contextmanager
def replaying(state: Optional[RngState]) -> Iterator[None]:
    """Replay ``state`` around the body and let each evaluation inside restart from it
    (NOTE [one RNG replay per evaluation]); ``None``: no replay (``preserve_rng_state=False``)."""
    with _set(_REPLAYING, "state", state), state.replay() if state is not None else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def replay_forward_rng() -> Iterator[None]:
    """Run one evaluation of a block, inside its rebuild in backward, with the RNG state forward's call saw.

    A block's ``reconstruct`` that evaluates random parts (dropout) more than once wraps each
    evaluation in this (NOTE [one RNG replay per evaluation]); outside a rebuild it does nothing.
    """
    state = getattr(_REPLAYING, "state", None)
    with state.replay() if state is not None else contextlib.nullcontext():
        yield


# NOTE [the block's RNG state, named]
# An adapted coupling with several subnets keeps, in forward, the RNG state each
# subnet call started from, and must find it again in the block's rebuild
# (NOTE [recorded subnets] in .subnets). The engine names the state it captured
# before the block for the duration of invertible forward's call of that block
# (`capturing`), and the one it replays for the duration of the block's
# rebuild (`replaying`): the very same object, so the block keys what it keeps
# by that object instead of capturing and comparing generator states itself.
# Outside those two calls (autograd and checkpoint modes, a redo from an
# anchor) no state is named, and nothing is kept.
_CAPTURED = threading.local()


@contextlib.contextmanager
def capturing(state: Optional[RngState]) -> Iterator[None]:
    """Name ``state``, captured before the block called inside, for that call (NOTE [the block's RNG state,
    named]); ``None``: none captured (``preserve_rng_state=False``)."""
    with _set(_CAPTURED, "state", state):
        yield


def captured_rng_state() -> Optional[RngState]:
    """The state the engine captured before the block being run in invertible forward, else ``None``."""
    return getattr(_CAPTURED, "state", None)


def replayed_rng_state() -> Optional[RngState]:
    """The state the engine replays for the block being rebuilt in invertible backward, else ``None``."""
    return getattr(_REPLAYING, "state", None)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _autocast_dtype(device_type: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


@dataclass
class AutocastState:
    """Which autocast regions were active in forward, with their dtypes."""

    regions: Tuple[Tuple[str, torch.dtype], ...]

    @classmethod
    def capture(cls) -> "AutocastState":
        regions = tuple((d, _autocast_dtype(d)) for d in ("cpu", "cuda") if _autocast_enabled(d))
        return cls(regions)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                dtype = dict(self.regions).get(device_type)
                if dtype is not None:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
                elif _autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield


# NOTE [running stats under recomputation]
# A block recomputed in backward (invertible mode, or checkpoint mode's
# replay) runs its forward a second time, in training mode, and would update
# running means, batch-norm statistics or act-norm initialisation flags again.
# We snapshot its buffers before and restore them after, through `.data`, which
# does not bump the version counter: a buffer that the local graph saved
# (batch norm in eval mode saves its running statistics) is restored to the
# very values it held, so backward does not see a spurious modification. A
# buffer resized during the recomputation (a lazily sized running mean, empty
# until the first training step) gets its old storage back, shape included.
@contextlib.contextmanager
def recomputation(block: nn.Module) -> Iterator[None]:
    """Recompute ``block`` without letting it change its buffers."""
    buffers: List[Tensor] = [b for b in block.buffers() if b is not None]
    with torch.no_grad():  # a copy of the values, outside any graph
        saved: List[Tensor] = [b.clone() for b in buffers]
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved):
            if buffer.shape == value.shape:
                buffer.data.copy_(value)
            else:  # a lazily sized buffer (CVN's running mean) was resized: undo the resize too
                buffer.data = value


# NOTE [rebuilding in backward]
# Invertible backward runs a block's forward with grad only to get its local
# graph for one local backward (the exact-input path of drift="recompute" and
# of anchors); the outputs' values are never read. A block may then build a
# leaner graph whose backward is exact (a tiled one: pyramidflow.model.coupling_regions).
# Checkpoint mode's recomputation is not flagged: torch.utils.checkpoint checks
# that it saves the same tensors as the first forward.
#
# NOTE [forward in place]
# A forward without grad (invertible mode's, or any mode's under no_grad)
# keeps nothing of a block's input once the block has run, so a block may
# write its output over an input level and save that level's memory. Only the
# engine knows which levels no one else reads: those made by an earlier block
# (or the caller's, when it gave them up with consume_input), not kept as an
# anchor, not requiring grad, dense, each in a storage of its own. It names
# them for one block call (CallContext.overwritable). Every other call (a
# rebuild, a redo from an anchor, checkpoint or autograd mode, debug mode,
# which compares the output with the input) names none.
#
# NOTE [call context]
# The engine says how it calls a block in a CallContext (.block): whether a
# graph is recorded, whether the call is backward's rebuild, which input levels
# forward may write over, whether a tracer records it. A block whose forward or
# reconstruct takes `context=` gets it as an argument and chooses its path once,
# at the top of the call; the library's blocks read nothing else of the engine's.
# For blocks that take none (written before the context existed, or that prefer
# to ask), the context of the forward call under way is also held here for that
# call's duration, and is_rebuilding() and may_overwrite(x) read it: one state,
# two ways to read it. A call the engine did not make (by hand, or by a block
# that runs other blocks without passing its context on) is told nothing: no
# rebuild, nothing overwritable (CallContext.now()).
_CALL = threading.local()


@contextlib.contextmanager
def calling(rebuild: bool, overwritable: Sequence[Tensor]) -> Iterator[None]:
    """Hold what the context of the block forward call under way says (NOTE [call context]): whether it is a
    rebuild, and the input levels it may write over."""
    previous: Optional[Tuple[bool, FrozenSet[int]]] = getattr(_CALL, "current", None)
    _CALL.current = (rebuild, frozenset(id(x) for x in overwritable))
    try:
        yield
    finally:
        _CALL.current = previous


def is_rebuilding() -> bool:
    """Whether the block forward under way is invertible backward's rebuild (NOTE [rebuilding in backward]):
    ``context.rebuild`` for a block that takes no ``context=`` (NOTE [call context])."""
    current = getattr(_CALL, "current", None)
    return current is not None and current[0]


def may_overwrite(x: Tensor) -> bool:
    """Whether a block's forward may write its output over its input level ``x`` (NOTE [forward in place]):
    the engine named it for the call under way, and no graph is being recorded. What
    ``context.may_overwrite(level)`` says, for a block that takes no ``context=`` (NOTE [call context])."""
    current = getattr(_CALL, "current", None)
    return current is not None and id(x) in current[1] and not torch.is_grad_enabled()
