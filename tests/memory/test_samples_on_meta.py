"""NOTE [samples on meta]: on meta the per-sample loops run their ends only, and the planner's peak is unchanged."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyramidflow import _meta
from pyramidflow.memory import plan as planning
from pyramidflow.model import PyramidFlowConfig

TINY = dict(channels=4, kernel_size=3, num_stacks=1, num_levels=2)
# the modules whose loops take the rule; all must be imported before the switch below looks for them
USERS = ("pyramidflow.model.coupling_regions", "pyramidflow.model.lean_loss", "pyramidflow.model.pyramid")


def _run_every_sample(monkeypatch) -> list:
    """Switch the shortcut off: every module that bound :func:`samples_to_run` gets one that runs all samples."""
    for name in USERS:
        __import__(name)
    users = [m for name, m in sys.modules.items() if name.startswith("pyramidflow") and getattr(m, "samples_to_run", None) is _meta.samples_to_run]
    for module in users:
        monkeypatch.setattr(module, "samples_to_run", lambda batch, like: range(batch))
    return sorted(m.__name__ for m in users)


def test_samples_to_run():
    cpu, meta = torch.empty(0), torch.empty(0, device="meta")
    assert list(_meta.samples_to_run(5, cpu)) == [0, 1, 2, 3, 4]
    assert list(_meta.samples_to_run(5, meta)) == [0, 4]
    assert list(_meta.samples_to_run(2, meta)) == [0, 1]
    assert list(_meta.samples_to_run(1, meta)) == [0]


def test_the_switch_reaches_every_loop(monkeypatch):
    assert set(USERS) <= set(_run_every_sample(monkeypatch))


@pytest.mark.parametrize(
    "options, batch",
    [
        (dict(volume_norm="CVN"), 5),
        (dict(volume_norm="SVN"), 3),
        (dict(volume_norm="CVN", backward_tile=8), 5),
        (dict(volume_norm="CVN", backward_tile=16), 3),
        (dict(volume_norm=None, num_levels=3), 6),
        (dict(volume_norm="CVN", mode="checkpoint"), 5),
    ],
    ids=["cvn-5", "svn-3", "cvn-tile8-5", "cvn-tile16-3", "no-vn-3-levels-6", "checkpoint-5"],
)
def test_peak_with_the_ends_equals_the_peak_with_every_sample(monkeypatch, options, batch):
    """The whole predicted step (forward, lean loss, invertible backward, Adam), every part of the breakdown."""
    config = PyramidFlowConfig(**{**TINY, **options})
    size = 32
    shortened = planning.predict_peak(config, size, batch)
    _run_every_sample(monkeypatch)
    full = planning.predict_peak(config, size, batch)
    assert shortened == full


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_of_a_prediction(config: PyramidFlowConfig, batch: int) -> int:
    with _Ops() as ops:
        planning.predict_peak(config, 32, batch)
    return ops.count


def test_a_meta_step_runs_as_many_ops_at_any_batch():
    """What makes the planner's batch search fast: the step's op count does not grow with the batch.

    The reference ops' slices do not grow with the batch either (NOTE [slices of the reference ops]).
    """
    config = PyramidFlowConfig(**TINY)
    assert _ops_of_a_prediction(config, 8) == _ops_of_a_prediction(config, 40)


# One loop at a time: each op's peak on meta, counted as the planner counts it, with the ends and with
# every sample.
def _meta_peak(fn) -> int:
    counter = planning._LiveBytes()
    with torch.device("meta"), counter:
        counter.peak = counter.live
        fn()
    return counter.peak


def _both_peaks(monkeypatch, fn) -> tuple:
    shortened = _meta_peak(fn)
    with monkeypatch.context() as patch:
        _run_every_sample(patch)
        full = _meta_peak(fn)
    return shortened, full


@pytest.mark.parametrize("batch", [5, 9])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN", None])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_region_executor_peak(monkeypatch, direction, volume_norm, batch):
    """An untiled coupling's no-grad forward, reconstruct and backward, F run one sample at a time (NOTE [regions])."""
    from pyramidflow.engine.block import Writable
    from pyramidflow.model.coupling import TwoLevelCoupling

    def step():
        block = TwoLevelCoupling(0, direction, 4, kernel_size=3, volume_norm=volume_norm)
        levels = (torch.empty(batch, 4, 8, 8), torch.empty(batch, 4, 4, 4))
        with torch.no_grad():
            ys, _ = block(levels)
        xs, local, _ = block.reconstruct(tuple(ys), writable=Writable((True, False), (False, False)))
        torch.autograd.backward(list(local), [torch.empty_like(y) for y in ys])

    shortened, full = _both_peaks(monkeypatch, step)
    assert shortened == full


@pytest.mark.parametrize("batch", [3, 6])
def test_lean_loss_peak(monkeypatch, batch):
    from pyramidflow.model.lean_loss import pairwise_level_differences

    def step():
        latents = [torch.empty(batch, 4, 16 >> i, 16 >> i, requires_grad=True) for i in range(2)]
        maps = pairwise_level_differences(latents)
        torch.autograd.backward(maps, [torch.empty_like(m) for m in maps])

    shortened, full = _both_peaks(monkeypatch, step)
    assert shortened == full


@pytest.mark.parametrize("consume_input", [False, True])
def test_streamed_decomposition_peak(monkeypatch, consume_input):
    from pyramidflow.model.pyramid import laplacian_decompose

    shortened, full = _both_peaks(monkeypatch, lambda: laplacian_decompose(torch.empty(5, 3, 32, 32), 3, consume_input=consume_input))
    assert shortened == full
