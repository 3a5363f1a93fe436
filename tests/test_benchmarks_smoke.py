"""The benchmark harness keeps working: the step group at small sides, run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL, SHORT = 128, 264  # 264 > 256: on CPU the short plan (autograd and invertible, first steps, counted at 128 px)


@pytest.mark.slow
def test_step_benchmark_runs_and_prints_the_table(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "--benchmark-only", "benchmarks/test_step_time.py::test_step",
            "--bench-sizes", f"{FULL},{SHORT}", "--bench-rounds", "1",
            "-p", "no:cacheprovider", f"--benchmark-json={tmp_path / 'bench.json'}", "-q",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout
    assert "pyramidflow: peak memory, step time and work" in result.stdout
    assert "kernel roofline, PREDICTED" in result.stdout and "_affine_coupling_bwd_kernel" in result.stdout
    assert "work counted at 128 px" in result.stdout  # the short plan's rows say where their work was counted

    benchmarks = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    rows = {b["extra_info"]["resolution"]: b["extra_info"]["rows"] for b in benchmarks}
    assert set(rows) == {FULL, SHORT}
    assert {"autograd", "checkpoint", "invertible", "invertible, tiles of 128"} <= set(rows[FULL])
    assert set(rows[SHORT]) == {"autograd", "invertible"}
    for side, counted_at in ((FULL, FULL), (SHORT, 128)):
        for row in rows[side].values():
            assert row["peak_bytes"] > 0 and row["median_s"] > 0 and row["counted_at"] == counted_at
            assert row["aten_calls"] > 0 and row["flops"] > 0
        # the library's training step, the same model: invertible does more work and holds less memory
        autograd, invertible = rows[side]["autograd"], rows[side]["invertible"]
        assert invertible["flops"] > autograd["flops"] and invertible["peak_bytes"] < autograd["peak_bytes"]
