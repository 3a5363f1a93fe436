"""Exceptions of the engine and the check for our own invariants."""

from __future__ import annotations

__all__ = ["InvertibleError", "DriftError", "DriftWarning", "_internal_assert"]


class InvertibleError(RuntimeError):
    """A problem found while running an :class:`InvertibleSequential` backward or check."""


class DriftError(InvertibleError):
    """Backward rebuilt a block's input further from the true one than the tolerance (``drift="raise"``)."""


class DriftWarning(UserWarning):
    """Backward rebuilt a block's input further from the true one than the tolerance (``drift="warn"``)."""


def _internal_assert(cond: bool, what: str) -> None:
    """Check an invariant of pyramidflow itself (never user input; survives ``python -O``)."""
    if not cond:
        raise InvertibleError(f"{what}: this is a bug in pyramidflow, please report it.")
