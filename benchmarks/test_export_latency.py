"""Inference latency of one 256 px image: the exported ONNX graph in onnxruntime against PyTorch, on the CPU.

The graph is :class:`pyramidflow.inference.export.InferenceGraph` (image -> anomaly map and score, template baked
in) for the method's architecture at ``--bench-channels`` width (the paper's 16 by default; C = 4 with
``--bench-channels 4``), 4 stacks, L = 4, CVN, batch 1. Both runtimes get the same number of
threads (torch's). The two are timed in alternation, round after round, so that a shared machine's
load falls on both alike; pytest-benchmark times the onnxruntime call and ``extra_info`` holds both
medians and their ratio (``--benchmark-json``; printed with ``-s``).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from pyramidflow.inference.export import InferenceGraph, export_graph
from pyramidflow.model import PyramidFlow, PyramidFlowConfig

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIDE = 256


def _graph(channels: int) -> InferenceGraph:
    torch.manual_seed(0)
    model = PyramidFlow(PyramidFlowConfig(channels=channels))
    with torch.no_grad():
        for block in model.flow.blocks:  # trained-looking couplings (the last conv starts at zero)
            block.net.conv_out.weight.normal_(0.0, 0.01)
        model.train()(torch.randn(2, 3, SIDE, SIDE))  # sets the CVN running means at this size
        model.eval()
        template = [z[:1] for z in model(torch.randn(1, 3, SIDE, SIDE))]
    return InferenceGraph(model, template).eval()


def test_inference_latency_onnxruntime_vs_pytorch(benchmark, channels, rounds, tmp_path):
    graph = _graph(channels)
    path = export_graph(graph, tmp_path / "model.onnx", image_size=(SIDE, SIDE), batch_size=1)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = torch.randn(1, 3, SIDE, SIDE)
    feed = {"images": images.numpy()}

    def run_pytorch():
        with torch.inference_mode():
            graph(images)

    def run_onnxruntime():
        session.run(None, feed)

    for _ in range(2):  # warm-up: allocator, oneDNN / onnxruntime kernel selection
        run_pytorch()
        run_onnxruntime()
    times = {"pytorch": [], "onnxruntime": []}
    for _ in range(max(rounds, 5)):
        for name, run in (("pytorch", run_pytorch), ("onnxruntime", run_onnxruntime)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    benchmark.extra_info.update(
        channels=channels, side=SIDE, batch=1, threads=torch.get_num_threads(),
        pytorch_median_s=medians["pytorch"], onnxruntime_median_s=medians["onnxruntime"],
        onnxruntime_over_pytorch=medians["onnxruntime"] / medians["pytorch"],
    )
    print(
        f"\n{SIDE} px, C={channels}, {torch.get_num_threads()} threads, {len(times['pytorch'])} interleaved rounds: "
        f"PyTorch {medians['pytorch'] * 1e3:.1f} ms, onnxruntime {medians['onnxruntime'] * 1e3:.1f} ms per image "
        f"(ratio {medians['onnxruntime'] / medians['pytorch']:.2f})"
    )
    benchmark.group = "export latency"
    benchmark.pedantic(run_onnxruntime, rounds=rounds, iterations=1, warmup_rounds=0)
