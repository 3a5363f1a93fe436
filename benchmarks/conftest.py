"""Benchmark harness: peak memory and work counts beside pytest-benchmark's timings, and a summary table.

A row measures one training step: its peak memory under the memory probe (CUDA allocator stats, or
the CPU profiler's allocation events), untimed, and its time by pytest-benchmark; the ``step`` group
adds its ATen calls and FLOPs (``pyramidflow.train.step.count_work``). Peak bytes and counts go to
``benchmark.extra_info`` (so they are in ``--benchmark-json``), and the terminal summary prints, per
group, each row's memory, time and work as ratios to the autograd row of the same group and size.

Options: ``--bench-sizes`` (the step group's image sides, default 256,1024), ``--bench-channels``
(C, default the paper's 16), ``--bench-rounds``, ``--bench-encoder-resolution`` and ``--bench-long``
(the full rows and sweeps that do not fit the default run's 10 minutes on 2 CPU cores).
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
        "--bench-sizes",
        type=_sides,
        default=None,
        help="image sides of the step group, comma-separated (default 256,1024); the smoke test uses 128",
    )
    group.addoption(
        "--bench-encoder-resolution",
        type=int,
        default=None,
        help="input side of the ResNet18-variant rows (default 1024 on CUDA, 512 on CPU)",
    )
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark (default 3 on CPU, 10 on CUDA)")
    group.addoption("--bench-channels", type=int, default=None, help="PyramidFlow channels C (default the paper's 16)")
    group.addoption(
        "--bench-long",
        action="store_true",
        default=False,
        help="on CPU also the long rows: every step-group mode, rounds and count at sides above 256, 16 stacks in the depth sweep, the resolution sweep",
    )


def _sides(text: str) -> List[int]:
    try:
        return [int(side) for side in text.split(",")]
    except ValueError:
        raise pytest.UsageError(f"--bench-sizes {text!r}: give image sides in pixels, comma-separated, e.g. 256,1024") from None


def pytest_generate_tests(metafunc):
    """``step_size``: one test per side of ``--bench-sizes``, so each side is its own benchmark and table rows."""
    if "step_size" in metafunc.fixturenames:
        metafunc.parametrize("step_size", step_sizes(metafunc.config))


def step_sizes(config) -> List[int]:
    """The step group's image sides (``--bench-sizes``)."""
    return config.getoption("--bench-sizes") or [256, 1024]


@pytest.fixture(scope="session")
def measured_gbps() -> Dict[tuple, float]:
    """Where GPU kernel benchmarks put their GB/s for the roofline section: (kernel, launch, dtype) -> GB/s."""
    return MEASURED_GBPS


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def encoder_resolution(request, device) -> int:
    """Input side of the encoder rows: a 1024 px step of the ResNet18 variant costs minutes on 2 CPU cores."""
    return request.config.getoption("--bench-encoder-resolution") or (1024 if device.type == "cuda" else 512)


@pytest.fixture(scope="session")
def channels(request) -> int:
    return request.config.getoption("--bench-channels") or 16


@pytest.fixture(scope="session")
def rounds(request, device) -> int:
    return request.config.getoption("--bench-rounds") or (10 if device.type == "cuda" else 3)


@pytest.fixture(scope="session")
def long_run(request, device) -> bool:
    """Whether the long rows run: ``--bench-long``, or always on CUDA (a GPU runs them in seconds)."""
    return request.config.getoption("--bench-long") or device.type == "cuda"


@pytest.fixture
def measure_step(benchmark, device, rounds):
    """Measure ``step``: a warm-up under the memory probe, the probe, then its time over ``rounds`` rounds.

    With ``memory_only`` (the sweeps, whose point is memory) pytest-benchmark times the probed step and
    the summary table leaves the time out: one step less per row.
    """

    def run(
        step: Callable[[], None],
        *,
        row: Dict[str, object],
        baseline: Optional[str] = "autograd",
        timed_rounds: Optional[int] = None,
        memory_only: bool = False,
    ) -> None:
        warm_up_probed(step, device)
        peaks = []
        if memory_only:
            benchmark.pedantic(lambda: peaks.append(peak_memory(step, device)[0]), rounds=1, iterations=1, warmup_rounds=0)
        else:
            peaks.append(peak_memory(step, device)[0])

            def timed():
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()

            benchmark.pedantic(timed, rounds=timed_rounds or rounds, iterations=1, warmup_rounds=0)
        info = dict(row, peak_bytes=int(peaks[0]), device=str(device), baseline=baseline)
        benchmark.extra_info.update(info)
        _ROWS.append(dict(info, group=benchmark.group or "", fixture=benchmark, untimed=memory_only))

    return run


def warm_up_probed(step: Callable[[], object], device) -> None:
    """The warm-up step before a memory probe, itself run under the probe (NOTE [probe after a probed step])."""
    # NOTE [probe after a probed step]
    # On CPU the probe sums the profiler's allocation and free events, and a free of a block allocated
    # before the profiler started has no size, so it is left out. A step frees what the step before it
    # left (the gradients, the drift monitor's state): after an unprofiled step the probe counts 3 to
    # 6 MiB too much (paper configuration, 128 to 512 px). After a probed one it sees every
    # allocation the measured step frees.
    peak_memory(step, device)


def record_row(benchmark, **row) -> None:
    """Add a row measured without ``measure_step`` (``peak_bytes`` and ``median_s`` given; ``aten_calls``,
    ``flops`` and ``counted_at``, the side they were counted at, when counted)."""
    _ROWS.append(dict(row, group=benchmark.group or "", fixture=None))


def _median(row: Optional[dict]) -> Optional[float]:
    if row is None:
        return None
    if row.get("median_s") is not None or row.get("untimed"):
        return row.get("median_s")
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
    write("pyramidflow: peak memory, step time and work (ratios to the autograd row of the same group, size and depth)")
    header = (f"{'group':<22} {'mode':<22} {'size':>5} {'depth':>5} {'peak MiB':>10} {'mem ratio':>9} {'step s':>8} "
              f"{'time ratio':>10} {'ATen calls':>10} {'ratio':>6} {'GFLOP':>8} {'ratio':>6}  note")
    write(header)
    write("-" * len(header))
    for row in _ROWS:
        key = (row["group"], row.get("resolution"), row.get("depth"))
        base = next((r for r in _ROWS if (r["group"], r.get("resolution"), r.get("depth")) == key and r["mode"] == row.get("baseline")), None)
        time = _median(row)
        base_time = _median(base)
        calls, flops = _work_columns(row, base)
        note = row.get("note", "")
        if row.get("counted_at") not in (None, row.get("resolution")):
            note += f"; work counted at {row['counted_at']} px"
        write(
            f"{row['group']:<22} {row['mode']:<22} {row.get('resolution', '-'):>5} {row.get('depth', '-'):>5} "
            f"{row['peak_bytes'] / 2**20:>10.1f} {_ratio(row['peak_bytes'], base and base['peak_bytes'], 3):>9} "
            f"{f'{time:.3f}' if time else '-':>8} {_ratio(time, base_time, 2):>10} {calls} {flops}  {note}"
        )


def _ratio(value, base, digits: int) -> str:
    return f"{value / base:.{digits}f}" if value and base else "-"


def _work_columns(row: dict, base: Optional[dict]) -> tuple:
    """The ATen-call and GFLOP columns (value and ratio), blank where the row was not counted."""
    if row.get("aten_calls") is None:
        return f"{'-':>10} {'-':>6}", f"{'-':>8} {'-':>6}"
    base = base if base and base.get("aten_calls") is not None else None
    calls = f"{row['aten_calls']:>10,} {_ratio(row['aten_calls'], base and base['aten_calls'], 2):>6}"
    flops = f"{row['flops'] / 1e9:>8.1f} {_ratio(row['flops'], base and base['flops'], 2):>6}"
    return calls, flops
