"""Peak-memory measurement of one step: CUDA allocator stats, CPU profiler events, saved-tensor bytes.

All three return bytes allocated *during* the call, above what was live
before it, so the model's parameters and the inputs do not count.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_memory", "peak_memory_cpu", "peak_memory_cpu_timeline", "peak_memory_cuda", "saved_tensor_bytes"]


def peak_memory_cuda(fn: Callable[[], Any], device: torch.device | None = None) -> Tuple[int, Any]:
    """Peak bytes allocated on a CUDA device while ``fn`` runs, above the bytes live before.

    Returns:
        ``(peak_bytes, fn's result)``.
    """
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, result


def peak_memory_cpu(fn: Callable[[], Any]) -> Tuple[int, Any]:
    """Peak live CPU bytes while ``fn`` runs, from the profiler's allocation events.

    The profiler attributes every allocation (positive) and free (negative)
    to the op that made it (an event's *self* memory, children excluded), or
    to a bare ``[memory]`` event outside any op. Their running sum in start-time
    order is the live memory and its maximum the peak. An op that allocates
    and frees a scratch buffer inside itself shows only the net change.

    Returns:
        ``(peak_bytes, fn's result)``.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, result


def peak_memory_cpu_timeline(fn: Callable[[], Any]) -> Tuple[int, Any]:
    """Peak live CPU bytes while ``fn`` runs, from the profiler's allocation events at their own times.

    Every allocation and free is a ``[memory]`` event of the profiler with its
    own timestamp; their running sum in time order is the live memory and its
    maximum the peak, scratch buffers inside ops included. Unlike
    :func:`peak_memory_cpu`, a free is not moved to the start of the op that
    encloses it: NOTE [frees inside a long op].

    Returns:
        ``(peak_bytes, fn's result)``.
    """
    # NOTE [frees inside a long op]
    # peak_memory_cpu sums each op's *self* memory at the op's start. A free
    # that happens inside a long op but in none of its children (a Python
    # variable of an autograd Function's backward going out of scope) is thus
    # counted at the start of that op, before the allocations of its
    # children: the running sum then drops too early and the peak is
    # underestimated. The engine's invertible backward is one such op: at
    # 64 px (C = 4, k = 3, 1 stack, L = 2, two training steps) peak_memory_cpu
    # gives 0.91 MB where the events in time order give 2.60 MB.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> Tuple[int, Any]:
    """Peak bytes of ``fn`` on ``device``: allocator stats on CUDA, profiler events on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return peak_memory_cuda(fn, device)
    return peak_memory_cpu(fn)


def saved_tensor_bytes(fn: Callable[[], Any]) -> Tuple[int, Any]:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    Deterministic and cheap: the right measure for "activation memory does not
    grow with depth". Parameters saved by a layer count too, once each.

    Returns:
        ``(saved_bytes, fn's result)``.
    """
    seen = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return sum(seen.values()), result
