"""The run log of training: one JSON line per logging interval, and the reconstruction drift it reports.

``<out>/train_log.jsonl`` holds, per logging interval, the step, the loss of that step, images per
second over the interval and the largest reconstruction drift the engine measured in it (``null``
when the engine measured none: ``drift="off"`` or a mode that rebuilds nothing). Lines are only
appended; a resumed run first drops the lines of steps past its checkpoint, so the log always
describes the trajectory the weights followed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from torch import nn

from .._utils import write_text_atomic

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


def trim_log(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def append_log(path: Path, **record) -> None:
    """Append one JSON line (one logging interval) and flush it to disk."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
