"""Stop signals of a training run: Ctrl-C (SIGINT) and SIGTERM handled alike.

Schedulers (Slurm, Kubernetes), ``docker stop`` and ``kill`` stop a process with SIGTERM, whose
default action ends it on the spot. Training turns SIGTERM into :class:`TrainingTerminated`, a
``KeyboardInterrupt``, so every path written for Ctrl-C (finish the parameter update, write the
checkpoint atomically, say how to resume) serves both; the command line then exits with the
conventional status ``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS", "TrainingTerminated", "exit_status", "interrupt_for", "signal_name"]

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


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """``128 + signal number``, as shells report a process ended by that signal (130 for Ctrl-C)."""
    return 128 + getattr(interrupt, "signum", int(signal.SIGINT))
