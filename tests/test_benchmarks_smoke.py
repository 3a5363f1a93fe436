"""The benchmark harness keeps working: one step benchmark at 128 px, run as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_benchmark_runs_and_prints_the_table(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "--benchmark-only",
            "benchmarks/test_step_time.py::test_step[autograd-reference]",
            "benchmarks/test_step_time.py::test_step[invertible-reference]",
            "--bench-resolution", "128", "--bench-rounds", "1",
            "-p", "no:cacheprovider", f"--benchmark-json={tmp_path / 'bench.json'}", "-q",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout
    assert "pyramidflow: peak memory and step time" in result.stdout
    assert "kernel roofline, PREDICTED" in result.stdout and "_affine_coupling_bwd_kernel" in result.stdout
    import json

    rows = {b["extra_info"]["mode"]: b["extra_info"] for b in json.loads((tmp_path / "bench.json").read_text())["benchmarks"]}
    assert set(rows) == {"autograd", "invertible"}
    assert all(row["peak_bytes"] > 0 and row["resolution"] == 128 for row in rows.values())
