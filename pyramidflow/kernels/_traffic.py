"""Bytes each Triton kernel moves per element, and the time that implies at a GPU's copy bandwidth.

A memory-bound kernel cannot beat (bytes read + bytes written) / bandwidth.
The counts are tensor-sized passes (one pass = N*C*H*W elements of the
dtype), as the module docstring of :mod:`.triton.affine_coupling` states them; the
roofline section of ``pytest benchmarks/ --benchmark-only`` prints the
predicted times from here, and on CUDA the measured GB/s beside them.
No triton import: the numbers are needed on machines without it.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

__all__ = ["KERNEL_PASSES", "GPUS", "ROOFLINE_SHAPE", "bytes_per_element", "roofline_rows"]

# (kernel, launch) -> (tensor passes read, tensor passes written)
KERNEL_PASSES: Dict[Tuple[str, str], Tuple[int, int]] = {
    ("_affine_coupling_kernel", "forward"): (3, 1),  # read x, r, t; write y
    ("_affine_coupling_kernel", "inverse"): (3, 1),  # read y, r, t; write x
    ("_affine_coupling_bwd_kernel", "affine_coupling_bwd"): (4, 4),  # read y, r, t, g; write x, grad_x, grad_r, grad_t
    ("_affine_coupling_bwd_kernel", "autograd backward"): (4, 2),  # grad_t is g itself
    ("_affine_coupling_bwd_kernel", "reconstruct backward"): (4, 3),  # write x, grad_x, grad_r
    ("_volume_norm_partial_kernel", "batch mean of s"): (1, 0),  # read r; partial sums negligible
    ("_volume_norm_partial_kernel", "both batch means"): (4, 0),  # read r, y, t, g
    ("_atan_kernel", "test helper"): (1, 1),
}
# Copy bandwidth of three GPUs, bytes per second (vendor figures).
GPUS = {"RTX 3060": 360e9, "RTX 4090": 1008e9, "H200": 4.8e12}
# The benchmarks' level: batch 2, C = 16, 1024 x 1024 (benchmarks/test_kernels.py).
ROOFLINE_SHAPE = (2, 16, 1024, 1024)
_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def bytes_per_element(kernel: str, launch: str, dtype: str = "float32") -> int:
    """Bytes read plus written per element of the level, for one launch of ``kernel``."""
    read, written = KERNEL_PASSES[(kernel, launch)]
    return (read + written) * _ELEMENT_BYTES[dtype]


def roofline_rows(shape: Tuple[int, ...] = ROOFLINE_SHAPE, dtype: str = "float32") -> List[dict]:
    """One row per kernel launch: bytes per element, total bytes at ``shape`` and the predicted time per GPU (s)."""
    elements = 1
    for size in shape:
        elements *= size
    rows = []
    for kernel, launch in KERNEL_PASSES:
        per_element = bytes_per_element(kernel, launch, dtype)
        total = per_element * elements
        rows.append(dict(kernel=kernel, launch=launch, dtype=dtype, bytes_per_element=per_element, bytes=total,
                         seconds={gpu: total / bandwidth for gpu, bandwidth in GPUS.items()}))  # fmt: skip
    return rows
