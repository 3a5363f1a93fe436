"""The OpenMP wait policy the command line chooses (NOTE [OpenMP wait policy]), and that the user's choice wins."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyramidflow.cpu_threads import SPIN_COUNT, apply_cpu_defaults, thread_settings

REPO = Path(__file__).resolve().parents[1]
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def test_sets_a_short_spin_only_when_the_user_chose_nothing():
    environ = {"OMP_NUM_THREADS": "3"}
    assert apply_cpu_defaults(environ) == {"GOMP_SPINCOUNT": SPIN_COUNT} == {"GOMP_SPINCOUNT": "1000"}
    assert environ == {"OMP_NUM_THREADS": "3", "GOMP_SPINCOUNT": "1000"}  # the thread count is left alone
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": ""}):
        environ = dict(chosen)
        assert apply_cpu_defaults(environ) == {}
        assert environ == chosen


def test_after_torch_loaded_it_changes_nothing_and_says_so(monkeypatch):
    for name in _WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.warns(UserWarning, match=r"apply_cpu_defaults: torch is already imported.*call it before `import torch`"):
        assert apply_cpu_defaults() == {}
    assert apply_cpu_defaults(warn_if_late=False) == {}
    assert not any(name in os.environ for name in _WAIT_VARIABLES)


def test_thread_settings_reads_what_the_process_runs_with(monkeypatch, one_thread):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert thread_settings() == {"threads": torch.get_num_threads(), "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None}
    assert thread_settings()["threads"] == 1  # the fixture's


def _spin_count_gomp_read(**env) -> str:
    """GNU OpenMP's spin count as it initialised in a fresh `pyramidflow --version` (it prints its settings)."""
    environ = {k: v for k, v in os.environ.items() if k not in _WAIT_VARIABLES}
    environ.update(env, PYTHONPATH=str(REPO), OMP_DISPLAY_ENV="VERBOSE", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "pyramidflow.cli", "--version"], env=environ, capture_output=True,
                          text=True, check=True, timeout=240)
    counts = set(re.findall(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr))
    if not counts:
        pytest.skip("torch's OpenMP runtime is not GNU OpenMP (it printed no GOMP_SPINCOUNT)")
    assert len(counts) == 1, done.stderr  # every OpenMP runtime in the process read the same environment
    return counts.pop()


def test_the_command_makes_openmp_threads_spin_briefly_unless_the_user_chose():
    assert _spin_count_gomp_read() == "1000"  # a short spin at a barrier, not libgomp's 300000
    assert _spin_count_gomp_read(OMP_WAIT_POLICY="PASSIVE") == "0"
    assert _spin_count_gomp_read(GOMP_SPINCOUNT="300000") == "300000"  # libgomp's own default, chosen explicitly
