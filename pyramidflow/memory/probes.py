"""Peak-memory measurement of one step: CUDA allocator stats, CPU profiler events, saved-tensor bytes.

All three return bytes allocated *during* the call, above what was live
before it, so the model's parameters and the inputs do not count.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_memory", "peak_memory_cpu", "peak_memory_cuda", "saved_tensor_bytes"]


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
    """Peak live CPU bytes while ``fn`` runs, from the profiler's allocation events at their own times.

    Every allocation and free is a ``[memory]`` event of the profiler with its
    own timestamp; their running sum in time order is the live memory and its
    maximum the peak, scratch buffers inside ops included (NOTE [frees inside
    a long op]).

    Returns:
        ``(peak_bytes, fn's result)``.
    """
    # NOTE [frees inside a long op]
    # Summing each profiler op's *self* memory at the op's start would move a
    # free that happens inside a long op, but in none of its children, to that
    # op's start: before the allocations of its children. The running sum then
    # drops too early and the peak comes out low. The engine's invertible
    # backward is such an op (its Python locals are freed block by block), so
    # invertible mode would be undercounted most. The [memory] events carry
    # their own times and need no attribution to ops.
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
