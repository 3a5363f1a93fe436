"""Memory: peak-memory probes (:mod:`.probes`) and the planner that predicts a training step's peak (:mod:`.plan`)."""

from .probes import peak_memory, peak_memory_cpu, peak_memory_cuda, saved_tensor_bytes

__all__ = ["peak_memory", "peak_memory_cpu", "peak_memory_cuda", "saved_tensor_bytes"]
