"""How torch's CPU threads wait: the default that keeps a training step fast on a CPU shared with other jobs.

Standard library only: :func:`apply_cpu_defaults` must run before ``import torch``
(NOTE [light package import] in :mod:`pyramidflow`).
"""

# NOTE [OpenMP wait policy]
# Every ATen op on a CPU is an OpenMP parallel region, and a training step of PyramidFlow is thousands
# of them. The CPU wheel of torch uses GNU OpenMP, whose threads spin at the barrier that ends a region
# (about 300,000 spins, milliseconds, before they sleep) waiting for the slowest thread. On cores that
# another process also uses, the thread being waited for is often descheduled while its partners spin
# on the cores it needs, and each of thousands of barriers costs a scheduler time slice: the demo's step
# went from under a second to tens of seconds (docs/usage.md, "On a busy machine").
# OMP_WAIT_POLICY=PASSIVE makes a waiting thread sleep at once, so the cores go to whoever has work;
# on an idle machine a sleeping thread pays a wake-up per region instead (the figures of both are in
# docs/usage.md). pyramidflow's command sets it unless the user chose how threads wait. libgomp reads
# its environment once, when torch's library loads, hence the order.

from __future__ import annotations

import os
import sys
import warnings
from typing import MutableMapping, Optional

__all__ = ["WAIT_POLICY", "apply_cpu_defaults", "thread_settings"]

# The policy chosen when the user sets none (NOTE [OpenMP wait policy]).
WAIT_POLICY = "PASSIVE"
# Either variable decides how GNU OpenMP threads wait (GOMP_SPINCOUNT wins over OMP_WAIT_POLICY): a user
# who set one has chosen, and is left alone.
_USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def apply_cpu_defaults(environ: Optional[MutableMapping[str, str]] = None, *, warn_if_late: bool = True) -> dict:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose how OpenMP threads wait; call before ``import torch``.

    The number of threads stays torch's own (one per core, or ``OMP_NUM_THREADS``). Once torch is loaded,
    OpenMP has read its settings: then nothing is set, and a warning says so.

    Args:
        environ: the environment to change (``os.environ``); a test passes its own.
        warn_if_late: warn when torch is loaded already (the command line, called in-process from a
            program that imported torch, leaves the policy to that program without a warning).

    Returns:
        What this call set, e.g. ``{"OMP_WAIT_POLICY": "PASSIVE"}``; empty when the user had chosen.

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
                      "changes nothing; call it before `import torch`, or start Python with OMP_WAIT_POLICY=PASSIVE "
                      "in the environment.", stacklevel=2)
        return {}
    environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return {"OMP_WAIT_POLICY": WAIT_POLICY}


def thread_settings() -> dict:
    """The CPU threads this process runs with, for the run log: torch's intra-op thread count and the
    OpenMP variables that decide how they wait (``None``: not set, the library's default)."""
    import torch  # noqa: PLC0415  (this module loads before torch: see apply_cpu_defaults)

    return {"threads": torch.get_num_threads(), **{name: os.environ.get(name) for name in _USER_CHOICES}}
