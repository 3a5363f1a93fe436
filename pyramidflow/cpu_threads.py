"""How torch's CPU threads wait: the default that keeps a training step fast on a CPU shared with other jobs.

Standard library only: :func:`apply_cpu_defaults` must run before ``import torch``
(NOTE [light package import] in :mod:`pyramidflow`).
"""

# NOTE [OpenMP wait policy]
# Every ATen op on a CPU is an OpenMP parallel region, and a training step of PyramidFlow is thousands
# of them. The CPU wheel of torch uses GNU OpenMP, whose threads spin at the barrier that ends a region
# (300,000 spins, about a millisecond, before they sleep) waiting for the slowest thread. On cores that
# another process also uses, the thread being waited for is often descheduled while its partners spin
# on the cores it needs, and each of thousands of barriers costs a scheduler time slice: the demo's step
# went from a quarter of a second to over a second beside a second training, and to tens of seconds on a
# machine other jobs loaded (docs/usage.md, "On a busy machine"). Not spinning at all
# (OMP_WAIT_POLICY=PASSIVE) cures that but makes every region pay a wake-up on an idle machine: the
# demo took 44% longer (4 min 25 s against 3 min 4 s). A short spin keeps both: 1,000 spins (GNU OpenMP's own count
# for oversubscribed threads) bridge the gap between one op and the next of a busy thread, and give the
# core up long before a time slice ends; measured, the demo's idle step stays near torch's default
# (0.23-0.32 s against 0.23-0.28 s over four runs) and the step beside a second training within 2.5x
# of it (docs/usage.md). pyramidflow's command
# sets it unless the user chose how threads wait. libgomp reads its environment once, when torch's
# library loads, hence the order.

from __future__ import annotations

import os
import sys
import warnings
from typing import MutableMapping, Optional

__all__ = ["SPIN_COUNT", "apply_cpu_defaults", "thread_settings"]

# How long a waiting thread spins when the user chose nothing (NOTE [OpenMP wait policy]).
SPIN_COUNT = "1000"
# Either variable decides how GNU OpenMP threads wait (GOMP_SPINCOUNT wins over OMP_WAIT_POLICY): a user
# who set one has chosen, and is left alone.
_USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def apply_cpu_defaults(environ: Optional[MutableMapping[str, str]] = None, *, warn_if_late: bool = True) -> dict:
    """Set ``GOMP_SPINCOUNT=1000`` (a short spin) unless the user chose how OpenMP threads wait; call before ``import torch``.

    The number of threads stays torch's own (one per core, or ``OMP_NUM_THREADS``). Once torch is loaded,
    OpenMP has read its settings: then nothing is set, and a warning says so.

    Args:
        environ: the environment to change (``os.environ``); a test passes its own.
        warn_if_late: warn when torch is loaded already (the command line, called in-process from a
            program that imported torch, leaves the policy to that program without a warning).

    Returns:
        What this call set, e.g. ``{"GOMP_SPINCOUNT": "1000"}``; empty when the user had chosen.

    Example:
        >>> from pyramidflow.cpu_threads import apply_cpu_defaults  # doctest: +SKIP
        >>> apply_cpu_defaults()  # first, in a script that trains with its own loop  # doctest: +SKIP
        >>> import torch  # doctest: +SKIP
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in _USER_CHOICES):
        return {}
    if "torch" in sys.modules and environ is os.environ:
        if not warn_if_late:
            return {}
        warnings.warn("apply_cpu_defaults: torch is already imported, so OpenMP has read its settings and this call "
                      "changes nothing; call it before `import torch`, or start Python with GOMP_SPINCOUNT=1000 "
                      "in the environment.", stacklevel=2)
        return {}
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return {"GOMP_SPINCOUNT": SPIN_COUNT}


def thread_settings() -> dict:
    """The CPU threads this process runs with, for the run log: torch's intra-op thread count and the
    OpenMP variables that decide how they wait (``None``: not set, the library's default)."""
    import torch  # noqa: PLC0415  (this module loads before torch: see apply_cpu_defaults)

    return {"threads": torch.get_num_threads(), **{name: os.environ.get(name) for name in _USER_CHOICES}}
