"""Whether the model runs under a tracer or exporter: the memory-lean paths step aside there.

The lean ops loop over samples, chunks and tiles and write into given tensors; a tracer would
record the loop's fixed count (pinning a dynamic batch) and not the writes.
"""

import torch

__all__ = ["tracing"]


def tracing() -> bool:
    """``torch.jit.trace``, ``torch.export`` (ONNX) or ``torch.compile`` is recording this call."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
