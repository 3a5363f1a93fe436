"""Reconstruction drift: how far backward's rebuilt block inputs are from the true ones, and what to do.

Invertible backward rebuilds each block's input from its output. In floating
point the rebuilt input differs from the one forward saw, and the difference
compounds through the blocks: harmless in a well-conditioned flow, silently
wrong gradients in an ill-conditioned one. Forward keeps a *fingerprint* of each
block's input (a fixed random projection of every element of each level, in
float32 or wider); backward compares the rebuilt input with it. This module holds the
fingerprints, the default tolerances, the policy names and the messages; the
Function (:mod:`.function`) applies the policy.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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

#: Random projections per row of a level (NOTE [whole-level fingerprint]).
FINGERPRINT_SIZE = 8

_TINY = 1e-30

# NOTE [default drift tolerances]
# The tolerance is a relative error of a block's rebuilt input (L2 over the
# whole level, estimated from its fingerprint; largest over levels). A healthy float32 flow rebuilds each
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


# NOTE [whole-level fingerprint]
# A fingerprint must see every element: a block whose inverse is wrong in a
# few pixels moves a sample of a few hundred elements only by chance. It is a
# fixed random projection of the whole level: k = FINGERPRINT_SIZE columns of
# random signs, separable over the last two dimensions (a level (N, C, H, W)
# gives (N, C, k) values: F[n, c, j] = sum_hw a[j, h] b[j, w] x[n, c, h, w]),
# computed as one batched matmul over H ((k, H) signs times each (H, W)
# plane) and one small reduction over W: one read of the level, no copy of a
# contiguous one, no host sync, and weights of only (H + W) k signs. The
# matmul sums over H, a long side, because a product with only k = 8 output
# columns runs at a fraction of the machine's speed: at 256 px the level-0
# projection took 6.9 ms as (N C H, W) @ (W, k) and 1.2 ms as (k, H) @ (H, W)
# per plane (one thread, a loaded machine). Each fingerprint value is a sum
# of +-x, so for an error e E|F(e)|^2 = k |e|^2 per (n, c) and
# |F(x') - F(x)| / |F(x)| estimates the
# relative L2 error of the whole level; an error in a single element moves k
# values by exactly its size. What it cannot see: an error orthogonal to all
# k sign patterns of its (n, c) plane (probability about 2^-k for an error of
# two opposite elements, zero for one element), an error below float noise
# (the tolerance), nor a non-floating level. It runs with autocast off, in
# float32 (float64 for float64 levels; a 16-bit level's matmul rounds to its
# dtype, as its values are). TF32 matmuls on CUDA (allow_tf32,
# set_float32_matmul_precision("high")) read each element to 10 bits:
# emulated on CPU, a healthy PyramidFlow's largest drift then rises from
# 6e-7 to 2e-5, still under float32's tolerance of 1e-4.
#
# NOTE [levels a block passes through]
# A block changes one or two levels and passes the others through: forward
# hands the next block the very same tensors, and backward's rebuilt input of
# such a level is the level the block above was checked on (an alias of it).
# Their fingerprint and their drift are the ones just computed, so each is
# computed once: the Fingerprinter remembers the levels of its last call, and
# a level whose elements are the same (the same storage, alive, the same view
# of it) and unchanged since (the same version: every in-place write, a
# kernel's included, bumps it) takes the remembered result. A drift is reused
# only against the very same forward fingerprint. Only what is remembered is
# kept alive: the storages are held weakly. Under torch.compile's tracing
# (fake tensors) nothing is remembered.
def _traceable() -> bool:
    """Whether levels are real tensors whose storage can be remembered (not torch.compile's fake ones)."""
    return not torch.compiler.is_compiling()


@dataclass(frozen=True)
class _Elements:
    """Which elements a tensor views and their version: equal for a tensor, its aliases, and nothing else alive."""

    storage: "weakref.ref[torch.UntypedStorage]"
    view: Tuple[int, Tuple[int, ...], Tuple[int, ...], torch.dtype]
    version: int

    @classmethod
    def of(cls, x: Tensor) -> "_Elements":
        return cls(weakref.ref(x.untyped_storage()), (x.storage_offset(), tuple(x.shape), x.stride(), x.dtype), x._version)

    def are(self, x: Tensor) -> bool:
        """Whether ``x`` views these very elements, unchanged since (NOTE [levels a block passes through])."""
        return (
            self.storage() is x.untyped_storage()
            and self.view == (x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
            and self.version == x._version
        )


class Fingerprinter:
    """A fixed random projection per tensor shape (NOTE [whole-level fingerprint]), drawn once and cached.

    The signs come from a private, seeded generator (the global RNG streams are
    untouched). Memory: ``FINGERPRINT_SIZE`` values per row of the level (per
    ``(n, c)`` of an ``(N, C, H, W)`` level) and block. The last call's levels and
    drifts are remembered (NOTE [levels a block passes through]).
    """

    def __init__(self, size: int = FINGERPRINT_SIZE, seed: int = 0x5EED) -> None:
        self.size = size
        self.seed = seed
        self._signs: Dict[Tuple[Tuple[int, ...], torch.dtype, torch.device], Tuple[Tensor, Optional[Tensor]]] = {}
        self._projected: List[Tuple[_Elements, Tensor]] = []
        self._checked: List[Tuple[Tensor, _Elements, Tensor]] = []

    def _projection(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The signs for ``x``'s shape: from 3-D on ``(a, b)``, those over H as ``(planes, k, H)`` (one ``(k, H)``
        matrix expanded over the level's ``(H, W)`` planes) in ``x``'s dtype and those over W as ``(k, W)`` in the
        comparison dtype; below 3-D ``(b, None)``, those over the last dimension as ``(n, k)`` in ``x``'s dtype."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._signs:
            sizes = tuple(x.shape[-2:]) if x.dim() >= 3 else tuple(x.shape[-1:])
            generator = torch.Generator().manual_seed(self.seed)
            signs = [torch.randint(2, (self.size, n), generator=generator) * 2.0 - 1.0 for n in sizes]
            if len(sizes) == 2:
                planes = x.numel() // max(1, sizes[0] * sizes[1])
                over_h = signs[0].to(x.device, x.dtype).expand(planes, *signs[0].shape)
                self._signs[key] = (over_h, signs[1].to(x.device, _comparison_dtype(x.dtype)))
            else:
                self._signs[key] = (signs[0].t().contiguous().to(x.device, x.dtype), None)
        return self._signs[key]

    def project(self, x: Tensor) -> Tensor:
        """The fingerprint of one level: ``(*x.shape[:-2], k)`` (``(*x.shape[:-1], k)`` below 3-D), in the
        comparison dtype; a 0-d level is its own fingerprint."""
        dtype = _comparison_dtype(x.dtype)
        # Forward runs under the caller's autocast: the projection must not (the engine replays cpu and cuda's).
        off = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else contextlib.nullcontext()
        with torch.no_grad(), off:
            if x.dim() == 0:
                return x.reshape(1).to(dtype)
            first, last = self._projection(x)
            if last is None:
                projected = torch.matmul(x, first)
                return projected if projected.dtype == dtype else projected.to(dtype)
            projected = _matmul_planes(first, x)  # (..., k, W): the one pass over the level
            if projected.dtype != dtype:
                projected = projected.to(dtype)
            return (projected * last).sum(dim=-1)

    def fingerprint(self, xs: Tensors) -> Tuple[Optional[Tensor], ...]:
        """One projection per level; ``None`` for levels that are not floating point."""
        projections = tuple(self._project_once(x) if x.is_floating_point() else None for x in xs)
        self._projected = [(_Elements.of(x), p) for x, p in zip(xs, projections) if p is not None and _traceable()]
        return projections

    def _project_once(self, x: Tensor) -> Tensor:
        """:meth:`project`, or the last call's projection of these very elements (NOTE [levels a block passes through])."""
        remembered = next((p for elements, p in self._projected if elements.are(x)), None)
        return remembered if remembered is not None else self.project(x)

    def drift(self, xs: Tensors, fingerprint: Sequence[Optional[Tensor]]) -> Tensor:
        """:func:`fingerprint_drift`: the largest relative error of the levels ``xs`` against ``fingerprint``."""
        checked = [(reference, x, self._level_drift(x, reference)) for x, reference in zip(xs, fingerprint) if reference is not None]
        self._checked = [(reference, _Elements.of(x), error) for reference, x, error in checked if _traceable()]
        errors = [error if error.dtype == torch.float32 else error.float() for _, _, error in checked]
        if not errors:
            return torch.zeros((), device=xs[0].device)
        return torch.stack(errors).max() if len(errors) > 1 else errors[0]

    def _level_drift(self, x: Tensor, reference: Tensor) -> Tensor:
        """One level's relative error (0-d), or the last call's for these very elements and this very reference."""
        remembered = next((e for ref, elements, e in self._checked if ref is reference and elements.are(x)), None)
        if remembered is not None:
            return remembered
        return (self.project(x) - reference).norm() / reference.norm().clamp_min(_TINY)


def _matmul_planes(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix[i] @ plane[i]`` for every ``(H, W)`` plane of ``x`` (``matrix`` ``(planes, k, H)``): one ``bmm``, on
    a view of a contiguous ``x``."""
    return torch.bmm(matrix, x.reshape(-1, *x.shape[-2:])).view(*x.shape[:-2], matrix.shape[1], x.shape[-1])


def fingerprint_drift(fingerprinter: Fingerprinter, xs: Tensors, fingerprint: Sequence[Optional[Tensor]]) -> Tensor:
    """Relative error of ``xs`` against the fingerprint taken in forward: a 0-d tensor, largest over levels.

    Computed on the device, without a host sync; NaN when the rebuilt input holds NaN.
    """
    return fingerprinter.drift(xs, fingerprint)


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
