"""The run log of training: one JSON line per logging interval, and the reconstruction drift it reports.

``<out>/train_log.jsonl`` holds, per logging interval, the step, the loss of that step, images per
second over the interval and the largest reconstruction drift the engine measured in it (``null``
when the engine measured none: ``drift="off"`` or a mode that rebuilds nothing). The first line a run
(or a resumed run) writes also holds ``cpu``: torch's thread count and the OpenMP wait variables it ran
with (:func:`pyramidflow.cpu_threads.thread_settings`), since they decide its speed. Lines are only
appended; a resumed run first drops the lines of steps past its checkpoint, so the log always
describes the trajectory the weights followed. A torn last line (a crash in the middle of a write)
is dropped with a warning; a damaged line elsewhere stops the resume with an error naming the file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional

from torch import nn

from .._utils import naming_write_errors, write_text_atomic

__all__ = ["LOG_NAME", "DriftTracker", "append_log", "trim_log"]

LOG_NAME = "train_log.jsonl"


class DriftTracker:
    """The largest ``last_drift`` of an :class:`~pyramidflow.InvertibleSequential` over a logging interval.

    Reads the floats the engine already brought to the host at the end of each backward: no sync of
    its own. ``history`` keeps ``(step, max_drift)`` per interval for the checkpoint.
    """

    def __init__(self, model: nn.Module) -> None:
        self.flow = getattr(model, "flow", None)
        self.window: Optional[float] = None
        self.history: list[list] = []

    def observe(self) -> None:
        """Fold the last backward's drift into the current interval (call after each backward)."""
        drifts = getattr(self.flow, "last_drift", None)
        if drifts:
            worst = max(float("inf") if math.isnan(d) else d for d in drifts)
            self.window = worst if self.window is None else max(self.window, worst)

    def close_interval(self, step: int) -> Optional[float]:
        """The interval's largest drift (``None``: nothing measured); starts the next interval."""
        worst, self.window = self.window, None
        self.history.append([step, worst])
        return worst


def _steps(path: Path, lines: list[str]) -> list[int]:
    """The step of every line; a torn last line (a crash mid-write) is dropped with a warning.

    Raises:
        ValueError: a line other than the last is not a JSON record.
    """
    steps = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            steps.append(int(record.get("step", 0)))
        except (ValueError, TypeError, AttributeError):
            if number == len(lines):
                warnings.warn(f"train: the last line of {path} is torn (a crash while it was written); it is dropped.",
                              stacklevel=3)
                break
            raise ValueError(
                f"train: line {number} of {path} is not a JSON record ({line.strip()[:40]!r}); repair or delete the "
                "file (it is only the run log) and resume again."
            ) from None
    return steps


def trim_log(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    text = path.read_text()
    lines = [line.rstrip("\n") + "\n" for line in text.splitlines(keepends=True) if line.strip()]
    kept = "".join(line for line, line_step in zip(lines, _steps(path, lines)) if line_step <= step)
    if kept != text:  # also when only a newline was missing: the next append must start a line
        write_text_atomic(path, kept)


def append_log(path: Path, **record) -> None:
    """Append one JSON line (one logging interval) and flush it to disk."""
    with naming_write_errors(path), open(path, "a") as handle:  # a full disk names the log, not just errno 28
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
