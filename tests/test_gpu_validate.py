"""benchmarks/gpu_validate.py: the parts that run without a GPU (the kernel checks run interpreted)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_validate", ROOT / "benchmarks" / "gpu_validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_format_table_aligns_one_row_per_check():
    table = _module().format_table([dict(check="plan", case="256 px", result="pass", detail="+1.0%"),
                                    dict(check="kernels", case="bf16 dense CVN", result="FAIL", detail="x")])  # fmt: skip
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("check") and len({len(line) for line in lines}) == 1


def test_kernel_checks_pass_and_can_fail(monkeypatch):
    """Under the interpreter on CPU tensors; a perturbed kernel must be reported as FAIL."""
    pytest.importorskip("triton")
    module = _module()
    rows = module.kernel_checks("cpu", shape=(1, 3, 5, 7), dtypes=[module.DTYPES[0], module.DTYPES[1]])
    assert len(rows) == 2 * 2 * 3 and all(r["result"] == "pass" for r in rows), rows
    from pyramidflow import kernels

    real = kernels.affine_coupling_inverse
    monkeypatch.setattr(kernels, "affine_coupling_inverse", lambda *a, **k: (real(*a, **k)[0] * 1.01, None))
    rows = module.kernel_checks("cpu", shape=(1, 3, 5, 7), dtypes=[module.DTYPES[0]])
    assert all(r["result"] == "FAIL" for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_command_exits_cleanly_without_cuda():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_validate.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no CUDA device here; nothing was checked" in done.stdout
