"""Which tensors invertible mode may overwrite: the ledger of storages it owns, in forward and backward.

Forward may write a block's output over an input level no one else holds (NOTE [forward in place] in
:mod:`._state`); backward may rebuild a level over its output's storage and write a level's new gradient
over the incoming one (NOTE [writing in place in backward]). Both rest on the same test: a tensor in a
storage of its own, not the caller's, not an anchor, covering its storage once.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .block import Tensors
from .run import InvertibleRun

__all__ = [
    "caller_storages",
    "free_levels",
    "gradient_flags",
    "into_buffers",
    "owned_after",
    "owned_outputs",
    "storage_id",
    "writable_gradients",
]


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
def storage_id(x: Tensor) -> int:
    """An id of ``x``'s storage; a tensor without one (a vmap-batched gradient) gets its own, never writable."""
    try:
        return x.untyped_storage()._cdata
    except (NotImplementedError, RuntimeError):
        return -id(x)


def _is_dense(x: Tensor) -> bool:
    """Whether ``x`` covers its whole storage, each element once (an expanded scalar does not)."""
    if storage_id(x) < 0 or x.untyped_storage().nbytes() != x.numel() * x.element_size():
        return False
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _foreign_storages(run: InvertibleRun) -> set:
    """Storages backward must never overwrite: the sequence's inputs and the anchors."""
    anchored = {storage_id(x) for xs in run.fwd_anchors.values() for x in xs}
    return anchored | set(run.fwd_input_storages)


def _unique_and_free(tensors: Sequence[Tensor], foreign: set) -> List[bool]:
    ids = [storage_id(x) for x in tensors]
    return [ids.count(i) == 1 and i not in foreign for i in ids]


def caller_storages(xs: Tensors, consume_input: bool) -> set:
    """The storages of the caller's inputs that neither forward nor backward may overwrite: all of them, or,
    when the caller gave them up (``consume_input``), those requiring grad."""
    return {storage_id(x) for x in xs if not consume_input or x.requires_grad}


def free_levels(xs: Tensors, protected: set) -> Tuple[bool, ...]:
    """Per level of ``xs``, whether a block's forward may write over it (NOTE [forward in place] in ._state):
    in a storage of its own and not in ``protected``, dense, not requiring grad."""
    return tuple(free and not x.requires_grad and _is_dense(x) for x, free in zip(xs, _unique_and_free(xs, protected)))


def owned_outputs(run: InvertibleRun, ys: Tensors) -> List[bool]:
    """Which outputs backward may overwrite (NOTE [writing in place in backward])."""
    if not run.release_outputs:
        return [False] * len(ys)
    return [free and _is_dense(y) for free, y in zip(_unique_and_free(ys, _foreign_storages(run)), ys)]


def owned_after(run: InvertibleRun, ys: Tensors, owned: Sequence[bool], new_ys: Tensors) -> List[bool]:
    """Ownership of the rebuilt levels: a level sharing an old level's storage inherits it, a fresh one is owned."""
    old = {}
    for y, own in zip(ys, owned):
        old[storage_id(y)] = own and storage_id(y) not in old
    free = _unique_and_free(new_ys, _foreign_storages(run))
    return [ok and old.get(storage_id(y), True) for ok, y in zip(free, new_ys)]


def writable_gradients(run: InvertibleRun, ys: Tensors, grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """The incoming gradients backward may overwrite, per level (``None``: not this one)."""
    if not run.release_outputs:
        return [None] * len(grads)
    present = [g for g in grads if g is not None]
    free = iter(_unique_and_free(present, set()))
    return [
        g if g is not None and next(free) and _is_dense(g) and g.shape == y.shape and g.dtype == y.dtype else None
        for g, y in zip(grads, ys)
    ]


def gradient_flags(grads: Sequence[Optional[Tensor]], foreign: set) -> Tuple[bool, ...]:
    """Per level, whether its current gradient may be overwritten (NOTE [writing in place in backward])."""
    present = [g for g in grads if g is not None]
    free = iter(_unique_and_free(present, foreign))
    return tuple(g is not None and next(free) and _is_dense(g) for g in grads)


def into_buffers(grads: List[Optional[Tensor]], buffers: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Write each level's new gradient into its incoming buffer where it may, and carry the buffer instead."""
    in_use = {storage_id(g) for g in grads if g is not None}
    out = list(grads)
    for j, (grad, buffer) in enumerate(zip(grads, buffers)):
        if grad is None or buffer is None or storage_id(buffer) in in_use:
            continue
        if grad.shape == buffer.shape and grad.dtype == buffer.dtype:
            buffer.copy_(grad)
            out[j] = buffer
    return out
