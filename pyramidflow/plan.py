"""Peak training memory predicted before any allocation: will it fit on my card?

The prediction runs one training step of the real model, loss and optimizer
on the ``meta`` device, where tensors have shapes and no storage, and counts
bytes as a caching-free allocator would: every new storage an op returns is
added when it is made and removed when it is freed (:class:`_LiveBytes`). So
it follows the model's code, whatever the engine mode or option, and costs
the same at 2048 px as at 64 px (a few seconds: no arithmetic is done).

The step is the training loop's (:mod:`pyramidflow.train`): forward, Fourier
loss, ``zero_grad(set_to_none=True)``, backward, gradient clipping, Adam. It
is simulated as a *second* step (Adam's state and the previous gradients
exist), which is the peak of training: the first step lacks Adam's state.

The peak is broken down into parameters and optimizer state (weights,
gradients, Adam's two moments, buffers), the input batch, the state the mode
keeps from forward to backward (measured at the end of forward: the
outputs in invertible mode, every block's input in checkpoint mode, every
saved activation in autograd mode; an option that keeps more shows up here),
and the largest block's working set (the rest of the peak).

On CUDA, cuDNN's workspace and the caching allocator's rounding come on top:
:data:`CUDA_MARGIN` of the peak, and :data:`CUDA_RESERVED` of the card for
the CUDA context, which the allocator never sees.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "CUDA_MARGIN",
    "CUDA_RESERVED",
    "MODES",
    "MemoryPlan",
    "parse_bytes",
    "predict_peak",
    "plan",
    "measure_training_peak",
    "training_step",
]

MODES = ("invertible", "checkpoint", "autograd")
CUDA_MARGIN = 0.10  # of the predicted peak: cuDNN workspaces and the allocator's 512-byte rounding
CUDA_RESERVED = 512 * 2**20  # of the card: the CUDA context and kernels, outside the allocator
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"12GiB"``, ``"16 GB"``, ``"800MiB"`` or a plain number of bytes, as bytes.

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"--gpu-memory {text!r} is not a memory size; write it like 12GiB, 16GB or 800MiB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive, counted at every op (NOTE [counting live bytes])."""

    # NOTE [counting live bytes]
    # Every tensor an op returns is looked at; a storage not seen before is
    # new: its bytes are added and a finalizer on it subtracts them when it is
    # freed. Views and in-place results share a seen storage and add nothing.
    # Storages made before the mode started (none here) are not counted.
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: Dict[int, int] = {}

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, on_forward: Optional[Callable[[], None]] = None) -> None:
    """One step of the training loop: forward, Fourier loss, zero_grad, backward, clip at 1.0, Adam."""
    from .model import fourier_loss  # noqa: PLC0415

    params = [p for p in model.parameters() if p.requires_grad]
    loss = fourier_loss(tuple(model(images)))
    if on_forward is not None:
        on_forward()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def _adam(params: Sequence[torch.nn.Parameter]) -> torch.optim.Adam:
    # the method's settings (pyramidflow.train_config.TrainConfig)
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.9), eps=1e-4, weight_decay=1e-5)


@dataclass(frozen=True)
class PeakPrediction:
    """Predicted peak of one training step, in bytes, and its parts (they add up to ``peak``)."""

    peak: int
    parameters_and_optimizer: int
    input_batch: int
    kept_state: int
    working_set: int


def predict_peak(config: Any, size: int, batch_size: int, *, dtype: torch.dtype = torch.float32) -> PeakPrediction:
    """Predict the peak bytes of a training step of a ``PyramidFlow(config)`` on ``size`` px images.

    Args:
        config: a :class:`pyramidflow.model.PyramidFlowConfig` (its ``mode`` is the one predicted).
        size: image side, a valid size for the pyramid.
        batch_size: images per step (at least 2: the loss compares pairs).
        dtype: the model's and images' dtype.

    Returns:
        The :class:`PeakPrediction`, without the CUDA margin.
    """
    from .model import PyramidFlow  # noqa: PLC0415

    counter = _LiveBytes()
    at_forward = {}
    with torch.device("meta"), counter:
        torch.manual_seed(0)
        model = PyramidFlow(config).to(dtype).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _adam(params)
        for p in params:  # NOTE: as after a first step: gradients and Adam's state exist
            p.grad = torch.zeros_like(p)
        optimizer.step()
        state = counter.live
        images = torch.empty(batch_size, 3, size, size, dtype=dtype)
        batch = counter.live - state
        counter.peak = counter.live
        training_step(model, optimizer, images, on_forward=lambda: at_forward.setdefault("live", counter.live))
    kept = at_forward["live"] - state - batch
    return PeakPrediction(counter.peak, state, batch, kept, counter.peak - state - batch - kept)


def measure_training_peak(config: Any, size: int, batch_size: int, device: str | torch.device = "cpu", steps: int = 2) -> int:
    """Measured peak bytes of training: model and Adam built, then ``steps`` steps, all inside the probe.

    On CPU the probe is the profiler's allocation events in time order
    (:func:`pyramidflow.memory.peak_memory_cpu`), on CUDA ``max_memory_allocated``.
    """
    from .memory import peak_memory_cpu, peak_memory_cuda  # noqa: PLC0415
    from .model import PyramidFlow  # noqa: PLC0415

    device = torch.device(device)

    def run() -> None:
        torch.manual_seed(0)
        model = PyramidFlow(config).to(device).train()
        optimizer = _adam([p for p in model.parameters() if p.requires_grad])
        images = torch.randn(batch_size, 3, size, size, device=device)
        for _ in range(steps):
            training_step(model, optimizer, images)

    peak, _ = peak_memory_cuda(run, device) if device.type == "cuda" else peak_memory_cpu(run)
    return peak


@dataclass(frozen=True)
class MemoryPlan:
    """What ``pyramidflow plan`` prints: per mode, the prediction and what fits on the card.

    Attributes:
        size, batch_size: the planned step.
        predictions: mode -> :class:`PeakPrediction`.
        gpu_memory: the card's bytes, or ``None``.
        max_batch_size, max_size: mode -> the largest batch at ``size`` and the largest valid
            side at ``batch_size`` that fit the card (0 when none does); empty without ``gpu_memory``.
    """

    size: int
    batch_size: int
    predictions: Dict[str, PeakPrediction]
    gpu_memory: Optional[int] = None
    max_batch_size: Optional[Dict[str, int]] = None
    max_size: Optional[Dict[str, int]] = None

    def cuda_need(self, mode: str) -> int:
        """Bytes of the card a run in ``mode`` needs: the peak plus the CUDA margin plus the reserve."""
        return cuda_need(self.predictions[mode].peak)

    def to_json(self) -> dict:
        out = dict(
            size=self.size,
            batch_size=self.batch_size,
            predicted_peak_bytes={m: p.peak for m, p in self.predictions.items()},
            breakdown_bytes={m: {k: v for k, v in vars(p).items() if k != "peak"} for m, p in self.predictions.items()},
            cuda_margin=dict(fraction_of_peak=CUDA_MARGIN, reserved_bytes=CUDA_RESERVED),
        )
        if self.gpu_memory is not None:
            out.update(
                gpu_memory_bytes=self.gpu_memory,
                fits={m: self.cuda_need(m) <= self.gpu_memory for m in self.predictions},
                margin_bytes={m: self.gpu_memory - self.cuda_need(m) for m in self.predictions},
                max_batch_size=dict(self.max_batch_size or {}),
                max_size=dict(self.max_size or {}),
            )
        return out


def cuda_need(peak: int) -> int:
    """Card bytes needed for a predicted peak: ``peak * (1 + CUDA_MARGIN) + CUDA_RESERVED``."""
    return int(peak * (1 + CUDA_MARGIN)) + CUDA_RESERVED


def _largest_on_grid(peak: Callable[[int], int], budget: int, points: Sequence[int], step: int, basis: Callable[[int], list]) -> int:
    """The largest ``v`` on the grid ``step, 2 step, ...`` with ``peak(v) <= budget``, 0 if none.

    The peak is linear in ``basis(v)`` (the batch: 1, images, pairs of
    images; the side: 1, its square): fitted through ``points``, searched on
    the fit, then checked with ``peak`` itself and stepped until it is the
    largest that fits (a few predictions instead of a bisection's dozen).
    """
    import numpy as np  # noqa: PLC0415

    design = np.array([basis(v) for v in points], dtype=float)
    coeffs = np.linalg.lstsq(design, np.array([peak(v) for v in points], dtype=float), rcond=None)[0]
    low, high = 0, 1 << 20  # on the fit: the largest grid index whose fitted peak is within budget
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if float(np.dot(basis(middle * step), coeffs)) <= budget else (low, middle)
    value = low * step
    while value >= step and peak(value) > budget:
        value -= step
    while peak(value + step) <= budget:  # the fit may be pessimistic by a grid step
        value += step
    return value


def plan(config: Any, size: int, batch_size: int = 2, *, modes: Sequence[str] = MODES, gpu_memory: Optional[int] = None,
         dtype: torch.dtype = torch.float32) -> MemoryPlan:  # fmt: skip
    """Predict each mode's peak at ``size`` px and ``batch_size``, and with ``gpu_memory`` what fits.

    The largest batch and side are searched with the same prediction (a few
    seconds each); a side is a multiple of ``2**(num_levels - 1)``.

    Example:
        >>> from pyramidflow.model import PyramidFlowConfig
        >>> p = plan(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=2), 32, modes=("invertible",))
        >>> p.predictions["invertible"].peak > 0
        True
    """
    import dataclasses  # noqa: PLC0415
    import functools  # noqa: PLC0415

    if getattr(config, "encoder", None) not in (None, "none"):
        raise NotImplementedError(
            f"plan: the --encoder {config.encoder} variant is not planned yet (its stem is not counted); plan without --encoder."
        )
    if batch_size < 2:
        raise ValueError(f"plan: --batch-size must be at least 2 (the loss compares pairs of images), got {batch_size}.")
    multiple = config.size_multiple
    if size < multiple or size % multiple:
        from .model.pyramid import nearest_valid_side  # noqa: PLC0415

        raise ValueError(f"plan: --size {size} is not divisible by 2^(levels-1) = {multiple}; use --size {nearest_valid_side(size, config.num_levels)}.")
    predictions, max_batch, max_size = {}, {}, {}
    for mode in modes:
        mode_config = dataclasses.replace(config, mode=mode)
        predictions[mode] = predict_peak(mode_config, size, batch_size, dtype=dtype)
        if gpu_memory is None:
            continue

        budget = int((gpu_memory - CUDA_RESERVED) / (1 + CUDA_MARGIN))
        at_size = functools.lru_cache(None)(lambda b: predict_peak(mode_config, size, b, dtype=dtype).peak)
        at_batch = functools.lru_cache(None)(lambda s: predict_peak(mode_config, s, batch_size, dtype=dtype).peak)
        batch_fit = _largest_on_grid(at_size, budget, (2, 4, 8), 1, lambda b: [1.0, b, b * (b - 1) / 2])
        max_batch[mode] = batch_fit if batch_fit >= 2 else 0
        sides = (size, 2 * size) if size // 2 < multiple or (size // 2) % multiple else (size // 2, size)
        max_size[mode] = _largest_on_grid(at_batch, budget, sides, multiple, lambda v: [1.0, float(v) ** 2])
    return MemoryPlan(size, batch_size, predictions, gpu_memory, max_batch if gpu_memory else None, max_size if gpu_memory else None)


def format_plan(result: MemoryPlan) -> str:
    """The human-readable table of ``pyramidflow plan``."""
    mib = 2**20
    lines = [
        f"predicted peak memory of one training step at {result.size}x{result.size} px, batch {result.batch_size}",
        f"{'mode':<11} {'peak MiB':>10} {'params+Adam':>12} {'batch':>8} {'kept':>10} {'working set':>12}",
    ]
    for mode, p in result.predictions.items():
        lines.append(
            f"{mode:<11} {p.peak / mib:>10.1f} {p.parameters_and_optimizer / mib:>12.1f} {p.input_batch / mib:>8.1f} "
            f"{p.kept_state / mib:>10.1f} {p.working_set / mib:>12.1f}"
        )
    if result.gpu_memory is not None:
        lines.append("")
        lines.append(
            f"on a {result.gpu_memory / 2**30:.1f} GiB card (needs peak x {1 + CUDA_MARGIN:.2f} for cuDNN workspace and "
            f"allocator rounding, plus {CUDA_RESERVED // mib} MiB for the CUDA context):"
        )
        for mode in result.predictions:
            margin = result.gpu_memory - result.cuda_need(mode)
            verdict = "fits" if margin >= 0 else "does NOT fit"
            lines.append(
                f"{mode:<11} {verdict}, margin {margin / 2**30:+.2f} GiB; largest batch at {result.size} px: "
                f"{result.max_batch_size[mode]}; largest side at batch {result.batch_size}: {result.max_size[mode]} px"
            )
    return "\n".join(lines)


class WouldNotFitError(RuntimeError):
    """A training run's predicted peak does not fit the GPU (raised before any allocation)."""


def preflight(config: Any, size: int, batch_size: int, gpu_memory: int, *, dtype: torch.dtype = torch.float32) -> Optional[PeakPrediction]:
    """Check that a training step fits ``gpu_memory`` bytes; raise naming a batch size or mode that fits.

    Raises:
        WouldNotFitError: the predicted need exceeds the card; the message
            names the largest batch size that fits in this mode, else a mode
            that fits at this batch size, else the largest side, and ``--no-plan``.
    """
    import dataclasses  # noqa: PLC0415

    if getattr(config, "encoder", None) not in (None, "none"):
        return None  # the encoder variant is not planned yet: no check rather than a wrong one
    predicted = predict_peak(config, size, batch_size, dtype=dtype)
    if cuda_need(predicted.peak) <= gpu_memory:
        return predicted
    found = plan(config, size, batch_size, modes=(config.mode,), gpu_memory=gpu_memory, dtype=dtype)
    what = (
        f"pyramidflow plan: training at {size} px, batch {batch_size}, mode {config.mode} needs about "
        f"{cuda_need(predicted.peak) / 2**30:.2f} GiB but the GPU has {gpu_memory / 2**30:.2f} GiB"
    )
    if found.max_batch_size[config.mode] >= 2:
        fix = f"use --batch-size {found.max_batch_size[config.mode]}"
    else:
        other = [m for m in MODES if m != config.mode and cuda_need(predict_peak(dataclasses.replace(config, mode=m), size, batch_size, dtype=dtype).peak) <= gpu_memory]
        if other:
            fix = f"use --mode {other[0]}"
        elif found.max_size[config.mode]:
            fix = f"use --size {found.max_size[config.mode]}"
        else:
            fix = "use a smaller model (--channels, --stacks)"
    raise WouldNotFitError(f"{what}; {fix} (or --no-plan to try anyway).")
