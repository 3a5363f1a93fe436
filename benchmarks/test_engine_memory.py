"""The engine alone: 8 affine couplings, 16 channels, 256x256, hidden 32, batch 1 (issue 2's case).

Rows per mode for the table, and one interleaved run of all three modes whose
medians give the time ratios (interleaving cancels drift of a shared machine).
"""

import statistics
import time

import pytest
import torch

from pyramidflow import InvertibleSequential
from pyramidflow.engine import MODES, AffineCoupling
from pyramidflow.memory import peak_memory

from conftest import record_row, warm_up_probed



def _couplings(device, depth=8):
    seq = InvertibleSequential(*[AffineCoupling(16, 32, parity=i % 2) for i in range(depth)]).to(device)
    for block in seq.blocks:
        torch.nn.init.normal_(block.net[-1].weight, std=0.01)
    return seq


def _step(seq, x):
    def step():
        y, logdet = seq(x, release_outputs=True)  # a training step: the outputs die after the loss
        (0.5 * y.square().mean() - logdet.mean() / y[0].numel()).backward()

    return step


@pytest.mark.benchmark(group="engine 8 couplings")
@pytest.mark.parametrize("mode", MODES)
def test_engine_step(benchmark, measure_step, device, mode):
    seq = _couplings(device)
    seq.mode = mode
    x = torch.randn(1, 16, 256, 256, device=device)
    measure_step(_step(seq, x), row=dict(mode=mode, resolution=256, depth=8))


@pytest.mark.benchmark(group="engine interleaved")
def test_engine_step_interleaved(benchmark, device, rounds):
    seq = _couplings(device)
    x = torch.randn(1, 16, 256, 256, device=device)
    times = {mode: [] for mode in MODES}
    peaks = {}
    for mode in MODES:
        seq.mode = mode
        warm_up_probed(_step(seq, x), device)
        peaks[mode], _ = peak_memory(_step(seq, x), device)

    def one_round():
        for mode in MODES:
            seq.mode = mode
            start = time.perf_counter()
            _step(seq, x)()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=max(rounds, 5), iterations=1, warmup_rounds=1)
    for mode in MODES:
        median = statistics.median(times[mode][1:])  # the first entries are the warm-up round
        benchmark.extra_info[f"{mode}_median_s"] = median
        benchmark.extra_info[f"{mode}_peak_bytes"] = int(peaks[mode])
        record_row(benchmark, mode=mode, resolution=256, depth=8, peak_bytes=peaks[mode], median_s=median, baseline="autograd", note="interleaved")
