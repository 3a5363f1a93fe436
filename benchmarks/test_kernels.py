"""Kernel benchmarks (GPU only): the reference ops against the Triton kernels, in GB/s.

Sizes as in a PyramidFlow level at full resolution: batch 2, C = 16,
1024 x 1024, float32. The bandwidth is the *minimum* bytes each op must read
and write (module docstring of kernels/triton/affine_coupling.py: forward reads
x, r, t and writes y, 4 tensors; the fused backward reads y, r, t, g and
writes x, grad_x, grad_r, grad_t, 8 tensors) divided by the median time, so
the two backends are compared on the same work; it goes to
``benchmark.extra_info["gbps"]`` with the bytes and the median.

Run: ``pytest benchmarks/test_kernels.py`` on a machine with CUDA and triton.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pyramidflow import kernels
from pyramidflow.kernels._traffic import ROOFLINE_SHAPE, bytes_per_element

_SHAPE = ROOFLINE_SHAPE
# what each benchmark launches, as named in kernels/_traffic.py (the bytes the module docstring states)
_LAUNCHES = {"forward": ("_affine_coupling_kernel", "forward"), "fused_backward": ("_affine_coupling_bwd_kernel", "affine_coupling_bwd")}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device to time the Triton kernels"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="GPU benchmark: needs triton"),
]


def _operands():
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(_SHAPE, device="cuda", generator=gen) for _ in range(4)]


def _run(benchmark, op, what: str, measured_gbps=None) -> None:
    def timed():
        op()
        torch.cuda.synchronize()

    timed()  # warm-up: compilation and autotuning
    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    moved = bytes_per_element(*_LAUNCHES[what]) * torch.Size(_SHAPE).numel()
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(bytes=moved, median_s=median, gbps=moved / median / 1e9, shape=list(_SHAPE), dtype="float32")
    if measured_gbps is not None:  # the Triton kernel alone (no VN reduction): the roofline's measured column
        measured_gbps[(*_LAUNCHES[what], "float32")] = moved / median / 1e9


@pytest.mark.parametrize("volume_norm", [None, "CVN"], ids=["noVN", "CVN"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_affine_coupling_forward(benchmark, backend, volume_norm, measured_gbps):
    """GPU: forward ``y = exp(s) x + t`` (training VN: with the batch mean)."""
    benchmark.group = f"affine_coupling forward {volume_norm or 'noVN'}"
    x, r, t, _ = _operands()
    with torch.no_grad():
        _run(benchmark, lambda: kernels.affine_coupling(x, r, t, volume_norm=volume_norm, backend=backend), "forward",
             measured_gbps if backend == "triton" and volume_norm is None else None)


@pytest.mark.parametrize("volume_norm", [None, "CVN"], ids=["noVN", "CVN"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_affine_coupling_fused_backward(benchmark, backend, volume_norm, measured_gbps):
    """GPU: fused backward (rebuild x and grad_x, grad_r, grad_t from y, r, t, g)."""
    benchmark.group = f"affine_coupling fused backward {volume_norm or 'noVN'}"
    y, r, t, g = _operands()
    _run(benchmark, lambda: kernels.affine_coupling_bwd(y, r, t, g, volume_norm=volume_norm, backend=backend), "fused_backward",
         measured_gbps if backend == "triton" and volume_norm is None else None)
