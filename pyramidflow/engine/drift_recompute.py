"""``drift="recompute"``: a drifting block's input rebuilt exactly, by running forward again from an anchor.

The Function's backward (:mod:`.function`) measures each rebuilt input against forward's fingerprint
(:mod:`.drift`); here is what it does when one drifts too far: find the block's exact input (forward
again from the nearest anchor, or from the caller's input source), and a rebuild that starts from it.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ._state import recomputation, replaying
from .block import CallContext, InvertibleModule, LogDet, Tensors, Writable, _leaf, call_forward
from .drift import fingerprint_drift
from .run import InvertibleRun

__all__ = ["drift_check", "exact_input", "exceeds", "from_exact", "rebuilds_first"]


def exceeds(drift: Tensor, tolerance: float) -> bool:
    """Whether ``drift`` is over ``tolerance`` on any rank (NaN counts as over); syncs the host."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        drift = drift.clone()
        torch.distributed.all_reduce(drift, op=torch.distributed.ReduceOp.MAX)
    return not float(drift) <= tolerance


# NOTE [input source]
# Under drift="recompute" a drifting block is redone from an exact input, so
# block 0's input is normally kept for the whole backward: one state more. A
# caller that can compute the input again (PyramidFlow: the pyramid of the
# images it holds anyway) passes `input_source`; then nothing is kept, block 0
# is rebuilt like any other, and only a drift calls the source (its state
# then exists while that block is redone). The source's values must be the
# forward's: the caller checks its own inputs were not changed in between.
def exact_input(run: InvertibleRun, index: int) -> Tensors:
    """Block ``index``'s exact input: forward again from the nearest anchor at or below it (or from the source)."""
    anchored = [i for i in run.fwd_anchors if i <= index]
    if anchored:
        start = max(anchored)
        xs = run.fwd_anchors[start]
    else:
        start = 0
        with torch.no_grad():
            xs = tuple(run.input_source())
    with torch.no_grad(), run.fwd_autocast.replay():
        for j in range(start, index):
            block = run.blocks[j]
            with recomputation(block), replaying(run.fwd_rng[j]):  # NOTE [one RNG replay per evaluation]
                xs = tuple(call_forward(block, xs, CallContext.now())[0])  # nothing overwritable: anchors, the source's levels
    return xs


def from_exact(xs: Tensors) -> Callable[[InvertibleModule, Tensors], Tuple[Tensors, Tensors, LogDet]]:
    """A ``rebuild`` for the Function's block backward that ignores the outputs and runs forward from ``xs``."""

    def rebuild(block: InvertibleModule, ys: Tensors, writable: Optional[Writable] = None) -> Tuple[Tensors, Tensors, LogDet]:
        leaves = tuple(_leaf(x) for x in xs)
        ys_local, logdet_local = call_forward(block, leaves, CallContext.now(rebuild=True))  # NOTE [rebuilding in backward]
        return leaves, tuple(ys_local), logdet_local

    return rebuild


# NOTE [drift checked before the local backward]
# Under drift="recompute" a drifting block is redone with the same incoming
# gradients, so a block that rebuilds its input during its local backward
# (a fused one) may not overwrite them: one more copy of its levels'
# gradients. A block that can rebuild its input first (rebuilds_before_backward)
# is asked to (Writable.rebuild_first); the engine checks the drift between
# reconstruct and the local backward, and redoes a drifting block before any
# gradient is touched, so the gradients stay writable. On meta nothing is
# checked (no values), and the flags are those of a step that did not drift.
def rebuilds_first(run: InvertibleRun, index: int) -> bool:
    """Whether block ``index`` is asked to rebuild its input before its local backward (see the NOTE above)."""
    block = run.blocks[index]
    return block.rebuilds_before_backward and block.reconstruct_takes_writable and not run.fwd_autocast.regions


def drift_check(run: InvertibleRun, index: int, checked: List[Tensor]) -> Callable[[Tensors], bool]:
    """A check for the Function's block backward: stores the rebuilt input's drift, says whether it is too large."""

    def check(xs: Tensors) -> bool:
        checked.append(fingerprint_drift(run.fingerprinter, xs, run.fwd_fingerprints[index]))
        return exceeds(checked[-1], run.drift_tolerance)

    return check
