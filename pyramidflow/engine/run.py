"""What one invertible forward hands to its backward: the blocks, the captured state, the drift settings.

:class:`InvertibleRun` is filled by :class:`~.sequential.InvertibleSequential` (settings) and by the
Function's forward (``fwd_*`` state); the Function's backward reads it and reports what it found as a
:class:`DriftReport`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ._state import AutocastState, RngState
from .block import InvertibleModule, Tensors
from .drift import CallSite, Fingerprinter

__all__ = ["DriftReport", "InvertibleRun"]


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
    # Drift monitoring (NOTE [drift monitoring]); the sequence fills these in.
    drift: str = "off"
    drift_tolerance: Optional[float] = None  # None: default_tolerance() of the forward's compute dtype
    anchor_every: Optional[int] = None
    input_source: Optional[Callable[[], Tensors]] = None  # NOTE [input source]
    fingerprinter: Optional[Fingerprinter] = None
    where: str = "InvertibleSequential"
    report: Optional[Callable[["DriftReport"], None]] = None
    fwd_fingerprints: List[Tuple[Optional[Tensor], ...]] = field(default_factory=list)
    fwd_anchors: Dict[int, Tensors] = field(default_factory=dict)
    fwd_anchor_versions: Dict[int, Tuple[int, ...]] = field(default_factory=dict)
    fwd_call_site: Optional[CallSite] = None
    # NOTE [outputs kept as aliases]: the outputs, detached (same storage and version counter), until backward starts.
    release_outputs: bool = False
    consume_input: bool = False  # NOTE [forward in place]: the caller gave its inputs up
    fwd_outputs: Optional[Tensors] = None
    fwd_output_refs: Tuple["weakref.ref[Tensor]", ...] = ()
    fwd_output_versions: Tuple[int, ...] = ()
    fwd_input_storages: Tuple[int, ...] = ()
    fwd_parameter_versions: List[Tuple[int, ...]] = field(default_factory=list)  # per block, of block.parameters()

    def keeps_anchor(self, index: int) -> bool:
        """Whether forward keeps block ``index``'s exact input (block 0's under ``"recompute"``, unless the
        caller can compute it again: NOTE [input source])."""
        if self.anchor_every is not None and index % self.anchor_every == 0:
            return True
        return index == 0 and self.drift == "recompute" and self.input_source is None


@dataclass(frozen=True)
class DriftReport:
    """What one invertible backward found, handed to the sequence (``last_drift`` and the policy).

    Attributes:
        drifts: per block, the relative error of its rebuilt input against forward's fingerprint
            (0.0 where an anchor supplied the exact input).
        tolerance: the tolerance applied.
        recomputed: indices of the blocks whose input was rebuilt exactly by running forward again.
        call_site: the user's line that called the sequence in forward.
        policy: the ``drift`` setting forward ran with.
    """

    drifts: Tuple[float, ...]
    tolerance: float
    recomputed: Tuple[int, ...]
    call_site: Optional[CallSite]
    policy: str
