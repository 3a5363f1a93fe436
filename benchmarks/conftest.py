"""Benchmark harness: peak memory beside pytest-benchmark's timings, and a summary table.

Each benchmark measures one training step twice: once under the memory probe
(CUDA allocator stats, or the CPU profiler's allocation events), untimed, and
then timed by pytest-benchmark. Peak bytes go to ``benchmark.extra_info`` (so
they are in ``--benchmark-json``), and the terminal summary prints, per group,
each row's memory and median step time as ratios to the autograd row.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import pytest
import torch

from pyramidflow.kernels._traffic import GPUS, ROOFLINE_SHAPE, roofline_rows
from pyramidflow.memory import peak_memory

_ROWS: List[dict] = []
# (kernel, launch, dtype) -> measured GB/s, filled by benchmarks/test_kernels.py on CUDA
MEASURED_GBPS: Dict[tuple, float] = {}


def pytest_addoption(parser):
    group = parser.getgroup("pyramidflow benchmarks")
    group.addoption(
        "--bench-resolution",
        type=int,
        default=None,
        help="image side of the training-step benchmarks (default 1024); the smoke test uses 128",
    )
    group.addoption(
        "--bench-encoder-resolution",
        type=int,
        default=None,
        help="input side of the ResNet18-variant rows (default: --bench-resolution on CUDA, half of it on CPU)",
    )
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark (default 3 on CPU, 10 on CUDA)")
    group.addoption(
        "--bench-channels",
        type=int,
        default=None,
        help="PyramidFlow channels C (default: the paper's 16 on CUDA, 4 on CPU to fit 2 cores in minutes)",
    )


@pytest.fixture(scope="session")
def measured_gbps() -> Dict[tuple, float]:
    """Where GPU kernel benchmarks put their GB/s for the roofline section: (kernel, launch, dtype) -> GB/s."""
    return MEASURED_GBPS


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def resolution(request) -> int:
    return request.config.getoption("--bench-resolution") or 1024


@pytest.fixture(scope="session")
def encoder_resolution(request, device, resolution) -> int:
    """Input side of the encoder rows: a 1024 px step of the ResNet18 variant costs minutes on 2 CPU cores."""
    return request.config.getoption("--bench-encoder-resolution") or (resolution if device.type == "cuda" else resolution // 2)


@pytest.fixture(scope="session")
def channels(request, device) -> int:
    return request.config.getoption("--bench-channels") or (16 if device.type == "cuda" else 4)


@pytest.fixture(scope="session")
def rounds(request, device) -> int:
    return request.config.getoption("--bench-rounds") or (10 if device.type == "cuda" else 3)


@pytest.fixture
def measure_step(benchmark, device, rounds):
    """Measure ``step``: peak memory once (untimed), then its time over ``rounds`` rounds."""

    def run(
        step: Callable[[], None],
        *,
        row: Dict[str, object],
        baseline: Optional[str] = "autograd",
        timed_rounds: Optional[int] = None,
    ) -> None:
        step()  # warm-up: lazy initialisation, gradient buffers and optimizer state exist before the probe
        peak, _ = peak_memory(step, device)

        def timed():
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=timed_rounds or rounds, iterations=1, warmup_rounds=0)
        info = dict(row, peak_bytes=int(peak), device=str(device), baseline=baseline)
        benchmark.extra_info.update(info)
        _ROWS.append(dict(info, group=benchmark.group or "", fixture=benchmark))

    return run


def record_row(benchmark, **row) -> None:
    """Add a row measured without ``measure_step`` (``peak_bytes`` and ``median_s`` given)."""
    _ROWS.append(dict(row, group=benchmark.group or "", fixture=None))


def _median(row: Optional[dict]) -> Optional[float]:
    if row is None:
        return None
    if row.get("median_s") is not None:
        return row["median_s"]
    stats = getattr(row["fixture"], "stats", None)
    return None if stats is None else stats.stats.median


def _write_roofline(write) -> None:
    """The predicted section: bytes per element of each kernel and the time it implies per GPU."""
    shape = "x".join(str(s) for s in ROOFLINE_SHAPE)
    write("")
    write(f"pyramidflow: kernel roofline, PREDICTED from bytes moved (kernels/_traffic.py), float32 level {shape}")
    header = f"{'kernel':<30} {'launch':<22} {'B/elem':>6} " + " ".join(f"{gpu + ' ms':>12}" for gpu in GPUS) + f" {'measured GB/s':>14}"
    write(header)
    write("-" * len(header))
    for row in roofline_rows():
        measured = MEASURED_GBPS.get((row["kernel"], row["launch"], row["dtype"]))
        times = " ".join(f"{row['seconds'][gpu] * 1e3:>12.3f}" for gpu in GPUS)
        measured_text = f"{measured:>14.0f}" if measured is not None else f"{'- (no GPU)':>14}"
        write(f"{row['kernel']:<30} {row['launch']:<22} {row['bytes_per_element']:>6} {times} {measured_text}")


def pytest_terminal_summary(terminalreporter, config):
    if config.getoption("benchmark_only", False) or _ROWS:
        _write_roofline(terminalreporter.write_line)
    if not _ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write("pyramidflow: peak memory and step time (ratios to the autograd row of the same group and size)")
    header = f"{'group':<22} {'mode':<20} {'size':>5} {'depth':>5} {'peak MiB':>10} {'mem ratio':>9} {'step s':>8} {'time ratio':>10}  note"
    write(header)
    write("-" * len(header))
    for row in _ROWS:
        key = (row["group"], row.get("resolution"), row.get("depth"))
        base = next((r for r in _ROWS if (r["group"], r.get("resolution"), r.get("depth")) == key and r["mode"] == row.get("baseline")), None)
        time = _median(row)
        mem_ratio = f"{row['peak_bytes'] / base['peak_bytes']:.3f}" if base and base["peak_bytes"] else "-"
        base_time = _median(base)
        time_ratio = f"{time / base_time:.2f}" if time and base_time else "-"
        time_text = f"{time:.3f}" if time else "-"
        write(
            f"{row['group']:<22} {row['mode']:<20} {row.get('resolution', '-'):>5} {row.get('depth', '-'):>5} "
            f"{row['peak_bytes'] / 2**20:>10.1f} {mem_ratio:>9} {time_text:>8} {time_ratio:>10}  {row.get('note', '')}"
        )
