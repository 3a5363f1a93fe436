"""The output folder of a training run: one run at a time, no stale temporary files, no empty folder left.

Two runs writing one folder would both report "checkpoint written" while one overwrites the other,
so :class:`RunFolder` holds an exclusive ``fcntl.flock`` on ``<out>/.train.lock`` (which also
records the holder's pid for the error message) for the whole run. The kernel drops the lock when
its process dies, even on SIGKILL, so a lock file left by a dead run never blocks the next one. Once
the lock is held, temporary files of this module's writers that a killed run left behind (a
checkpoint write cut by SIGKILL: ``NOTE [atomic write]`` in :mod:`pyramidflow._utils`) are removed; files of any other name
are never touched. A run that fails leaves no empty folder it created itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyramidflow._utils import stale_temp_files
from pyramidflow.checkpoint import CHECKPOINT_NAME
from pyramidflow.train.log import LOG_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; the folder is then not locked
    fcntl = None

__all__ = ["LOCK_NAME", "RunFolder", "RunFolderLockedError"]

LOCK_NAME = ".train.lock"


class RunFolderLockedError(RuntimeError):
    """Another live training run holds the output folder."""


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


class RunFolder:
    """Create, lock and tidy the output folder of one run: ``with RunFolder(out_dir) as folder:``.

    Args:
        path: the run's output folder (``--out``); created with its parents if missing.
        lock: take the lock and clean stale temporary files (rank 0 of a run only).

    Raises:
        RunFolderLockedError: another live process holds the folder.
    """

    def __init__(self, path: str | os.PathLike, *, lock: bool = True) -> None:
        self.path = Path(path)
        self.lock = lock
        self._created: list[Path] = []
        self._handle = None

    def __enter__(self) -> "RunFolder":
        if self.lock:
            self._created = _missing_folders(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire()
            self._remove_stale_temp_files()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._release()
        if error is not None:
            for folder in self._created:  # innermost first; stops at the first folder that holds anything
                try:
                    folder.rmdir()
                except OSError:
                    break

    def _acquire(self) -> None:
        if fcntl is None:
            return
        lock_path = self.path / LOCK_NAME
        while True:
            handle = open(lock_path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunFolderLockedError(
                    f"train: another training run (pid {holder}) is writing to {self.path} (--out); wait for it to "
                    f"finish, or choose another --out."
                ) from None
            # The holder before us may have removed the file between our open and our flock: then we
            # hold a lock on a file nobody else can see, so take the lock of the current file instead.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def _release(self) -> None:
        if self._handle is None:
            return
        try:
            os.unlink(self.path / LOCK_NAME)  # while still locked: nobody else can be holding it
        except FileNotFoundError:
            pass
        self._handle.close()
        self._handle = None

    def _remove_stale_temp_files(self) -> None:
        """Temporary files of our own writers, left by a killed run (we hold the lock: none is live)."""
        stale = stale_temp_files(self.path / CHECKPOINT_NAME) + stale_temp_files(self.path / LOG_NAME)
        size = 0
        for path in stale:
            try:
                size += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        if stale:
            print(f"train: removed {len(stale)} temporary file(s) ({size / 1e6:.1f} MB) left in {self.path} by an "
                  "interrupted write.", file=sys.stderr)
