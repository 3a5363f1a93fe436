"""Stop signals of a training run: Ctrl-C (SIGINT) and SIGTERM handled alike.

Schedulers (Slurm, Kubernetes), ``docker stop`` and ``kill`` stop a process with SIGTERM, whose
default action ends it on the spot. Training turns SIGTERM into :class:`TrainingTerminated`, a
``KeyboardInterrupt``, so every path written for Ctrl-C (finish the parameter update, write the
checkpoint atomically, say how to resume) serves both; the command line then exits with the
conventional status ``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM). :class:`InterruptGuard`
is installed for the whole run, from decoding the images to the final checkpoint (``NOTE [stop
signals in every phase]`` in :mod:`pyramidflow.train.loop`), and defers both while the optimizer updates
the weights or a checkpoint is restored or finished, so a stopped run always holds a completed step.
The command line installs one around every command before its heavy imports, so that SIGTERM is
handled like Ctrl-C by every command and a stop during the imports is one line, not a traceback.
This module imports only the standard library (NOTE [light package import] in :mod:`pyramidflow`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = [
    "STOP_SIGNALS", "InterruptGuard", "TrainingTerminated", "add_note", "describe", "exit_status", "interrupt_for",
    "signal_name",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingTerminated(KeyboardInterrupt):
    """SIGTERM (or another stop signal but Ctrl-C) arrived; handled exactly like ``KeyboardInterrupt``.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """The exception a stop signal raises: ``KeyboardInterrupt`` for SIGINT, :class:`TrainingTerminated` otherwise."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return TrainingTerminated(signum)


def describe(interrupt: KeyboardInterrupt) -> str:
    """How messages name the stop: ``"interrupted"`` (Ctrl-C) or ``"terminated (SIGTERM)"``."""
    return f"terminated ({interrupt})" if isinstance(interrupt, TrainingTerminated) else "interrupted"


def add_note(interrupt: KeyboardInterrupt, note: str) -> None:
    """Attach what was kept and how to go on; the command line prints the last note as its one line."""
    interrupt.__notes__ = [*getattr(interrupt, "__notes__", []), note]  # add_note, also on Python 3.10


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """``128 + signal number``, as shells report a process ended by that signal (130 for Ctrl-C)."""
    return 128 + getattr(interrupt, "signum", int(signal.SIGINT))


# Ctrl-C between a parameter update and its bookkeeping would leave weights one step ahead of `step`.
class InterruptGuard:
    """Defers SIGINT and SIGTERM while the optimizer updates the weights and the step counter.

    Outside the guarded section Ctrl-C raises KeyboardInterrupt at once (SIGTERM raises
    :class:`TrainingTerminated`, a KeyboardInterrupt, so both are handled alike); inside, it is raised
    as soon as the section ends, so the in-memory state is always that of a completed step. Only the
    main thread can install signal handlers; elsewhere the guard does nothing. Use as
    ``with InterruptGuard() as guard:`` around the whole run, and ``with guard.critical():`` around the update.
    """

    def __init__(self) -> None:
        self._active = threading.current_thread() is threading.main_thread()
        self._critical = False
        self._pending: int | None = None  # the signal that arrived inside the critical section
        self._raised: int | None = None  # the last signal raised as an exception
        self._previous: dict = {}

    def __enter__(self) -> "InterruptGuard":
        if self._active:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self._critical:
            self._pending = signum
        else:
            self._raised = signum
            raise interrupt_for(signum)

    def raise_swallowed(self) -> None:
        """Raise again a stop signal whose exception was caught and dropped on its way out.

        Code that catches every exception (some import machinery, a finaliser) can swallow the
        ``KeyboardInterrupt`` a signal raised; call this where that exception would have arrived by now,
        so that the stop the user asked for still happens. Call it only on the path where no
        ``KeyboardInterrupt`` came out.
        """
        if self._raised is not None:
            signum, self._raised = self._raised, None
            raise interrupt_for(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """The section a stop signal must not cut: a signal arriving inside is raised when it ends."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise interrupt_for(signum)
