"""Reconstruction drift: how far backward's rebuilt block inputs are from the true ones, and what to do.

Invertible backward rebuilds each block's input from its output. In floating
point the rebuilt input differs from the one forward saw, and the difference
compounds through the blocks: harmless in a well-conditioned flow, silently
wrong gradients in an ill-conditioned one. Forward keeps a *fingerprint* of each
block's input (a fixed sample of a few hundred elements per level, in float32 or
wider); backward compares the rebuilt input with it. This module holds the
fingerprints, the default tolerances, the policy names and the messages; the
Function (:mod:`.function`) applies the policy.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .block import Tensors

__all__ = [
    "DRIFT_POLICIES",
    "FINGERPRINT_SIZE",
    "CallSite",
    "Fingerprinter",
    "compute_dtype",
    "default_tolerance",
    "drift_message",
    "fingerprint_drift",
]

#: What backward does when a rebuilt input drifts past the tolerance.
DRIFT_POLICIES = ("warn", "raise", "recompute", "off")

#: Elements sampled per level (a level smaller than this is compared whole).
FINGERPRINT_SIZE = 256

_TINY = 1e-30

# NOTE [default drift tolerances]
# The tolerance is a relative error of a block's rebuilt input (L2 over the
# sampled elements, largest over levels). A healthy float32 flow rebuilds each
# input to about 1e-7..1e-6 (a few ulps, times the block's scale growth): the
# fresh PyramidFlow of the paper's configuration and 32 perturbed couplings
# measure at most ~1e-6 at their deepest block (benchmarks/drift_report.py).
# 1e-4 leaves two decades above that, so a healthy flow never warns, and
# flags drift long before it reaches the gradients' leading digits (the
# ill-conditioned flows of issue 9 drift to 1e-2..1e+4). float64 keeps the same
# margin over its own ulp (2e-16 -> ~1e-13 healthy): 1e-9. In 16-bit compute
# (the state in bfloat16/float16, or forward under a 16-bit autocast) the
# network's (s, t) are rounded to 8 or 11 bits, and a rebuilt conditioning
# input that crosses a rounding boundary moves them by one ulp (4e-3 for
# bfloat16): 5e-2 tolerates that and still catches a diverging chain.
_TOLERANCES: Dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 5e-2,
}


def default_tolerance(dtype: torch.dtype) -> float:
    """The drift tolerance used when ``drift_tolerance=None``, for a compute dtype.

    ``dtype`` is the autocast dtype when forward ran under autocast, else the
    dtype of the sequence's input (NOTE [default drift tolerances]).
    """
    return _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])


def compute_dtype(xs: Sequence[Tensor], autocast_dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The narrowest floating dtype forward computed in: a 16-bit autocast dtype, else the input's."""
    for dtype in autocast_dtypes:
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    floating = [x.dtype for x in xs if x.is_floating_point()]
    return floating[0] if floating else torch.float32


def _comparison_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fingerprints are compared in float32, or float64 for float64 states."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Fingerprinter:
    """A fixed sample of elements per tensor shape, drawn once and cached.

    The indices come from a private, seeded generator (the global RNG streams
    are untouched) and are stored as per-dimension coordinates, so sampling a
    non-contiguous tensor never copies it. Memory: ``FINGERPRINT_SIZE``
    elements per level and block (a few KiB per block).
    """

    def __init__(self, size: int = FINGERPRINT_SIZE, seed: int = 0x5EED) -> None:
        self.size = size
        self.seed = seed
        self._coords: Dict[Tuple[Tuple[int, ...], torch.device], Optional[Tuple[Tensor, ...]]] = {}

    def _coordinates(self, x: Tensor) -> Optional[Tuple[Tensor, ...]]:
        key = (tuple(x.shape), x.device)
        if key not in self._coords:
            numel = x.numel()
            if numel <= self.size or x.dim() == 0:
                self._coords[key] = None  # compare the whole (small) tensor
            else:
                generator = torch.Generator().manual_seed(self.seed)
                flat = torch.randint(numel, (self.size,), generator=generator)
                self._coords[key] = tuple(c.to(x.device) for c in torch.unravel_index(flat, x.shape))
        return self._coords[key]

    def sample(self, x: Tensor) -> Tensor:
        """The sampled elements of ``x`` as a 1-D tensor in the comparison dtype."""
        coords = self._coordinates(x)
        values = x.detach().reshape(-1) if coords is None else x.detach()[coords]
        return values.to(_comparison_dtype(x.dtype))

    def fingerprint(self, xs: Tensors) -> Tuple[Optional[Tensor], ...]:
        """One sample per level; ``None`` for levels that are not floating point."""
        return tuple(self.sample(x) if x.is_floating_point() else None for x in xs)


def fingerprint_drift(fingerprinter: Fingerprinter, xs: Tensors, fingerprint: Sequence[Optional[Tensor]]) -> Tensor:
    """Relative error of ``xs`` against the fingerprint taken in forward: a 0-d tensor, largest over levels.

    Computed on the device, without a host sync; NaN when the rebuilt input holds NaN.
    """
    errors = []
    for x, reference in zip(xs, fingerprint):
        if reference is None:
            continue
        rebuilt = fingerprinter.sample(x)
        errors.append((rebuilt - reference).norm() / reference.norm().clamp_min(_TINY))
    if not errors:
        return torch.zeros((), device=xs[0].device)
    return torch.stack([e.float() for e in errors]).max() if len(errors) > 1 else errors[0].float()


@dataclass(frozen=True)
class CallSite:
    """The user's line that called the sequence: where a :class:`DriftWarning` points."""

    filename: str
    lineno: int
    module: str

    @classmethod
    def find(cls) -> "CallSite":
        """The innermost frame outside torch and this engine (a model file counts as the user's)."""
        skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(skip):
            frame = frame.f_back
        if frame is None:  # pragma: no cover - called from inside torch only
            return cls("<unknown>", 0, "<unknown>")
        return cls(frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "<unknown>"))


def drift_message(where: str, drifts: Sequence[float], tolerance: float, names: Sequence[str]) -> str:
    """The one message of :class:`DriftWarning` and :class:`DriftError`: where drift starts, how large, the way out.

    Backward runs from the last block down, so the highest block over the
    tolerance is where the drift starts; the blocks below usually carry it on.
    """
    over = [i for i, d in enumerate(drifts) if not d <= tolerance]
    first = over[-1]
    worst = max(over, key=lambda i: float("inf") if drifts[i] != drifts[i] else drifts[i])
    return (
        f"{where}: block {first} ({names[first]}) is where backward's rebuilt input first drifts past the "
        f"tolerance: relative error {drifts[first]:.3g} (tolerance {tolerance:.3g}); the worst is "
        f"{drifts[worst]:.3g} at block {worst} ({len(over)} of {len(drifts)} blocks over), so this step's gradients "
        "are inexact. Set drift='recompute' to rebuild drifting blocks exactly from the forward's input "
        "(anchor_every=k bounds the compounding to k blocks), or clamp the scales, or run in float64."
    )
