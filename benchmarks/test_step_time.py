"""PyramidFlow training steps as ``pyramidflow train`` runs them: time, peak memory and work, per engine mode.

Every step is the library's (:func:`pyramidflow.train.step.step_on_random_images`: the training loop's
loss, clipping, Adam and drift policy, ``drift="recompute"``) on the paper's configuration (C = 16, k = 7,
4 stacks, L = 4, CVN), batch 2; ``--bench-channels`` narrows C. Groups:

* ``step``: one benchmark per side of ``--bench-sizes`` (256 and 1024 px): autograd, checkpoint,
  invertible, invertible with tiles of 128 px, and memcnn's ``InvertibleModuleWrapper`` around each
  block as the peer (when memcnn is installed; on CUDA also invertible with the Triton kernels).
  Each mode takes a warm-up step under the memory probe (NOTE [probe after a probed step] in
  conftest.py), the probe and the work count (ATen calls and FLOPs, ``count_work``); then the modes'
  steps alternate, round after round, so that a change in the machine's load hits all alike, and
  the rows are medians. On CPU a side above 256 px runs autograd and invertible only, one round of
  first steps, the memory probe after them (a few MiB high, as the NOTE says: well under 1% there),
  and its work counted at 128 px: a 1024 px step of the paper's width takes about half a minute to a
  minute on 2 cores. ``--bench-long`` runs such sides in full and adds invertible with ``drift="off"``.
* ``depth``: peak memory against the number of stacks (1, 2, 8; 16 with ``--bench-long``; 4 is the
  ``step`` group's 256 px row) at 256 px, autograd, checkpoint, invertible and the memcnn peer.
* ``resolution``: peak memory against the image side at 4 stacks (on CPU 512 px with ``--bench-long``;
  on CUDA 512 and 2048, 4096 tiled), autograd, invertible and invertible with tiles of 128 px; the
  ``step`` group's sides are its other points.
* ``encoder``: the ResNet18 variant (features at 1/4 of the input side, C = 64) at
  ``--bench-encoder-resolution`` input (1024 on CUDA; on CPU 512, k = 3 and one round).

On CPU the sweep rows measure memory only: pytest-benchmark times their probed step, and the summary
table leaves that time out.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch

from pyramidflow.memory import peak_memory
from pyramidflow.model import PyramidFlow, PyramidFlowConfig
from pyramidflow.train.config import TrainConfig
from pyramidflow.train.step import count_work, step_on_random_images, training_step_on

from conftest import record_row, step_sizes, warm_up_probed

TILE = 128  # the tiled rows' tile side (pixels at the level the network runs at)
SMALL = 256  # on CPU, sides above this run the short plan of the step group unless --bench-long
COUNT_SIDE = 128  # where the short plan counts the work (issue 25's counted figures are at this side)
_KERNELS_ENV = "PYRAMIDFLOW_KERNELS"  # read by the coupling op at every call


def _note(channels: int) -> str:
    return "paper config" if channels == 16 else f"C={channels} (paper: 16)"


def _config(channels: int, mode: str, num_stacks: int = 4, backward_tile=None) -> PyramidFlowConfig:
    return PyramidFlowConfig(mode=mode, num_stacks=num_stacks, channels=channels, backward_tile=backward_tile)


@dataclass
class _Mode:
    """A step-group row: how to build its step at a side, and the kernels it runs."""

    name: str
    make: Callable[[int], Callable[[], object]]
    backend: str = "reference"
    built: Optional[Callable[[], object]] = None  # the step at the benchmark's side
    times: List[float] = field(default_factory=list)

    def call(self) -> None:
        """One step with this mode's kernels (the environment variable is read at every call)."""
        os.environ[_KERNELS_ENV] = self.backend
        self.built()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def timed(self) -> float:
        start = time.perf_counter()
        self.call()
        return time.perf_counter() - start


def _step_modes(device, channels: int, full: bool, long_run: bool) -> List[_Mode]:
    def library(mode: str, tile=None, drift: Optional[str] = None):
        config = _config(channels, mode, backward_tile=tile)
        settings = TrainConfig(steps=1) if drift is None else TrainConfig(steps=1, drift=drift)
        return lambda side: step_on_random_images(config, side, 2, device, settings)

    modes = [_Mode("autograd", library("autograd")), _Mode("invertible", library("invertible"))]
    if not full:
        return modes
    modes[1:1] = [_Mode("checkpoint", library("checkpoint"))]
    modes.append(_Mode(f"invertible, tiles of {TILE}", library("invertible", TILE)))
    if device.type == "cuda":
        modes.append(_Mode("invertible+triton", library("invertible"), backend="triton"))
    if long_run:
        modes.append(_Mode("invertible, drift off", library("invertible", drift="off")))
    if _memcnn() is not None:
        modes.append(_Mode("memcnn wrapper", lambda side: _memcnn_step(device, channels, side)))
    return modes


@pytest.mark.benchmark(group="step")
def test_step(benchmark, device, channels, step_size, rounds, long_run, monkeypatch, request):
    """The training step per mode at ``step_size``, interleaved; rows with time, peak memory and work."""
    monkeypatch.setenv(_KERNELS_ENV, "reference")  # restored after the test; each mode sets its own
    full = long_run or step_size <= SMALL
    modes = _step_modes(device, channels, full, long_run)
    for mode in modes:
        mode.built = mode.make(step_size)
    measured = {}
    if full:  # warm-up (Adam's state, the CVN running means), probe and count before the timed rounds
        timed_rounds = rounds
        for mode in modes:
            warm_up_probed(mode.call, device)  # NOTE [probe after a probed step]
            measured[mode.name] = peak_memory(mode.call, device)[0], step_size, count_work(mode.call)
    else:  # the first steps are the timed round; probe and count after it
        timed_rounds = request.config.getoption("--bench-rounds") or 1

    def one_round():
        for mode in modes:
            mode.times.append(mode.timed())

    benchmark.pedantic(one_round, rounds=timed_rounds, iterations=1, warmup_rounds=0)
    rows = {}
    for mode in modes:
        if not full:
            small = _Mode(mode.name, mode.make, mode.backend, mode.make(COUNT_SIDE))
            small.call()
            measured[mode.name] = peak_memory(mode.call, device)[0], COUNT_SIDE, count_work(small.call)
        peak, counted_at, work = measured[mode.name]
        rows[mode.name] = dict(median_s=statistics.median(mode.times), times_s=mode.times, peak_bytes=int(peak),
                               aten_calls=work.aten_calls, flops=work.flops, counted_at=counted_at)
        record_row(benchmark, mode=mode.name, resolution=step_size, depth=4, baseline="autograd",
                   note=_note(channels) + _rounds_note(full, timed_rounds), **rows[mode.name])
    benchmark.extra_info.update(resolution=step_size, channels=channels, rounds=timed_rounds, device=str(device), rows=rows)


def _rounds_note(full: bool, timed_rounds: int) -> str:
    if not full:
        return f", {timed_rounds} round(s), first steps"
    return f", medians of {timed_rounds}" if timed_rounds > 1 else ", 1 round"


@pytest.fixture
def kernel_backend(monkeypatch):
    """Force the coupling op's backend for one benchmark (the env var is read at every call)."""

    def use(backend: str) -> None:
        monkeypatch.setenv(_KERNELS_ENV, backend)

    return use


def _sweep_step(device, channels: int, mode: str, side: int, num_stacks: int = 4, backward_tile=None):
    if mode == "memcnn wrapper":
        if _memcnn() is None:
            pytest.skip("memcnn is not installed (it is an optional peer, not a dependency)")
        return _memcnn_step(device, channels, side, num_stacks)
    return step_on_random_images(_config(channels, mode, num_stacks, backward_tile), side, 2, device)


@pytest.mark.benchmark(group="depth")
@pytest.mark.parametrize("num_stacks", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("mode", ["autograd", "checkpoint", "invertible", "memcnn wrapper"])
def test_memory_against_depth(benchmark, measure_step, device, channels, mode, num_stacks, long_run, kernel_backend, request):
    """Peak memory against depth at 256 px: invertible must be the lowest at each depth."""
    if num_stacks == 4 and SMALL in step_sizes(request.config):
        pytest.skip("4 stacks at 256 px is the step group's row (the same run)")
    if num_stacks == 16 and not long_run:
        pytest.skip("16 stacks is a long row on CPU (--bench-long)")
    kernel_backend("reference")
    measure_step(_sweep_step(device, channels, mode, 256, num_stacks), row=dict(mode=mode, resolution=256, depth=num_stacks,
                 note=_note(channels)), memory_only=device.type == "cpu")


def _resolutions(device, tiled=False):
    return [256, 512, 1024] + ([2048] + ([4096] if tiled else []) if device.type == "cuda" else [])


@pytest.mark.benchmark(group="resolution")
@pytest.mark.parametrize("side", [256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("mode", ["autograd", "invertible", f"invertible, tiles of {TILE}"])
def test_memory_against_resolution(benchmark, measure_step, device, channels, mode, side, long_run, kernel_backend, request):
    tiled = mode.endswith(f"tiles of {TILE}")
    if side not in _resolutions(device, tiled):
        pytest.skip("2048 px (4096 px tiled) is measured on CUDA only (CPU time budget)")
    if side in step_sizes(request.config):
        pytest.skip("this side is the step group's (the same run)")
    if not long_run:
        pytest.skip("on CPU the resolution sweep's own sides are long rows (--bench-long)")
    kernel_backend("reference")
    step = _sweep_step(device, channels, mode.split(",")[0], side, backward_tile=TILE if tiled else None)
    measure_step(step, row=dict(mode=mode, resolution=side, depth=4, note=_note(channels)), memory_only=device.type == "cpu")


def _memcnn():
    try:
        import memcnn  # noqa: PLC0415
    except ImportError:
        return None
    return memcnn


def _memcnn_step(device, channels, side, num_stacks=4):
    """The library's training step of PyramidFlow whose blocks each run under memcnn's wrapper."""
    memcnn = _memcnn()
    torch.manual_seed(0)
    model = PyramidFlow(_config(channels, "autograd", num_stacks)).to(device).train()
    model.flow.blocks = torch.nn.ModuleList(_MemcnnBlock(memcnn, block) for block in model.flow.blocks)
    return training_step_on(model, torch.randn(2, 3, side, side, device=device))


class _MemcnnBlock(torch.nn.Module):
    """A pyramid block under memcnn's InvertibleModuleWrapper (which takes and returns tensors)."""

    def __init__(self, memcnn, block):
        super().__init__()

        class _Flat(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            # memcnn frees the storage of its inputs after forward (keep_input=False), so a level our
            # blocks pass through untouched must come out as a new tensor, not the input object.
            def forward(self, *xs):
                return _fresh(self.inner(tuple(xs))[0], xs)

            def inverse(self, *ys):
                return _fresh(self.inner.inverse(tuple(ys))[0], ys)

        self.wrapped = memcnn.InvertibleModuleWrapper(_Flat(block), keep_input=False, keep_input_inverse=False)

    def forward(self, xs):
        return tuple(self.wrapped(*xs)), None

    def inverse(self, ys):
        return tuple(self.wrapped.inverse(*ys)), None


def _fresh(outputs, inputs):
    return tuple(y.clone() if any(y is x for x in inputs) else y for y in outputs)


@pytest.mark.benchmark(group="encoder")
@pytest.mark.parametrize("mode", ["autograd", "invertible"])
def test_encoder_step(benchmark, measure_step, device, encoder_resolution, mode, kernel_backend, tmp_path):
    """The ResNet18 variant: images at ``--bench-encoder-resolution`` -> a frozen stem -> features at 1/4, C = 64.

    Random stem weights from a local file (what an offline machine uses). On CPU the couplings use k = 3 instead
    of the paper's 7 and one timed round, so the two rows fit the harness's budget; the row's note says so.
    """
    from pyramidflow.model.encoder import ResNet18Stem

    kernel_backend("reference")
    torch.manual_seed(0)
    torch.save(ResNet18Stem().state_dict(), tmp_path / "resnet18.pt")
    kernel_size = 7 if device.type == "cuda" else 3
    config = PyramidFlowConfig(mode=mode, encoder="resnet18", encoder_weights=str(tmp_path / "resnet18.pt"),
                               kernel_size=kernel_size)
    model = PyramidFlow(config).to(device).train()
    images = torch.randn(2, 3, encoder_resolution, encoder_resolution, device=device)
    side = encoder_resolution // config.input_stride
    note = f"resnet18 stem -> {side}²×64, k={kernel_size}" + ("" if kernel_size == 7 else " (paper: 7)")
    measure_step(training_step_on(model, images), row=dict(mode=mode, resolution=encoder_resolution, depth=4, note=note),
                 timed_rounds=None if device.type == "cuda" else 1)
