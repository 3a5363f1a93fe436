"""Peak training memory predicted before any allocation: will it fit on my card?

The prediction runs one training step of the real model, loss and optimizer
on the ``meta`` device, where tensors have shapes and no storage, and counts
bytes as a caching-free allocator would: every new storage an op returns is
added when it is made and removed when it is freed (:class:`_LiveBytes`). So
it follows the model's code, whatever the engine mode or option, and costs
about the same at 2048 px as at 64 px and at batch 170 as at batch 2 (a few
seconds: no arithmetic is done, and loops over tiles and over samples run only
the iterations that set the peak: NOTE [tiles on meta], NOTE [samples on meta]).

The step is the training loop's own (:func:`pyramidflow.train.step.training_step`): forward,
the objective's loss, ``zero_grad(set_to_none=True)``, backward, gradient clipping, Adam. It
is simulated as a *second* step (Adam's state and the previous gradients
exist), which is the peak of training: the first step lacks Adam's state.

The peak is broken down into parameters and optimizer state (weights,
gradients, Adam's two moments, buffers), the input batch, the state the mode
keeps from forward to backward (measured at the end of forward: the
outputs in invertible mode, every block's input in checkpoint mode, every
saved activation in autograd mode; an option that keeps more shows up here),
and the largest block's working set (the rest of the peak).

The encoder variant (``encoder="resnet18"``) is planned without its weights:
memory does not depend on their values (NOTE [planning without encoder weights]).

On CUDA, cuDNN's workspace and the caching allocator's rounding come on top:
:data:`CUDA_MARGIN` of the peak, and :data:`CUDA_RESERVED` of the card for
the CUDA context, which the allocator never sees.

Errors name a setting as ``name=value`` in the library's terms (``batch_size=1``); the command line
says the same with its flags (``--batch-size 1``).
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..engine import MODES
from ..train.config import TrainConfig

__all__ = [
    "CUDA_MARGIN",
    "CUDA_RESERVED",
    "MODES",
    "MemoryPlan",
    "TILE_CHOICES",
    "WEIGHTS_NOT_READ",
    "MAX_BYTES",
    "check_gpu_memory",
    "check_step_size",
    "parse_bytes",
    "predict_peak",
    "plan",
    "measure_training_peak",
    "suggest_backward_tile",
]

CUDA_MARGIN = 0.10  # of the predicted peak: cuDNN workspaces and the allocator's 512-byte rounding
CUDA_RESERVED = 512 * 2**20  # of the card: the CUDA context and kernels, outside the allocator
# The tiles (px of level 0) plan and the pre-flight try when the whole-level step does not fit, largest
# first: a larger tile runs fewer, larger tiles, so it costs the least time of those that fit.
TILE_CHOICES = (512, 256, 128)
# NOTE [planning without encoder weights]
# A step's memory does not depend on the values of the weights, so the planner
# builds the encoder variant's stem with ``encoder_skeleton`` (random weights;
# on ``meta`` not even those exist) and hands it to ``PyramidFlow(config,
# encoder=...)``, the constructor's documented way to pass an encoder:
# ``config.encoder_weights`` is never read, so planning needs neither the file
# nor a download. Training builds ``PyramidFlow(config)``, which loads them;
# only :func:`_planning_model` takes this path. The stem is frozen, so its
# parameters count as parameters only (no gradient, no Adam state), and it
# runs under no-grad (``PyramidFlow.features``): its activations are freed as
# it goes, only the features it returns live on, and its forward's working set
# (the first conv's and batch norm's outputs, at half the image side) is in
# ``working_set`` when it is the step's largest. A config made only to be
# planned (``pyramidflow plan --encoder resnet18`` without --encoder-weights)
# names :data:`WEIGHTS_NOT_READ`; building it for real stops with "no file at".
WEIGHTS_NOT_READ = "<encoder weights: not read by pyramidflow plan>"  # for configs made only to be planned
# NOTE [sizes beyond any card]
# No GPU holds a pebibyte. A step whose input batch alone is larger (size=1e18, batch_size=1e9) is
# refused naming the setting before any prediction (torch would only say "Storage size calculation
# overflowed"), a gpu_memory above it is refused, and the searches for the largest batch and side stop
# below it without predicting: such a step cannot fit any budget they search.
MAX_BYTES = 2**50
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"12GiB"``, ``"16 GB"``, ``"800MiB"`` or a plain number of bytes, as bytes.

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"gpu_memory={text!r} is not a memory size; write it like 12GiB, 16GB or 800MiB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def check_gpu_memory(gpu_memory: int) -> int:
    """``gpu_memory`` if it can be a card's memory: more than 0 bytes, at most :data:`MAX_BYTES`.

    Raises:
        ValueError: any other value, naming ``gpu_memory``.
    """
    if isinstance(gpu_memory, bool) or not isinstance(gpu_memory, int) or not 0 < gpu_memory <= MAX_BYTES:
        raise ValueError(f"gpu_memory={gpu_memory!r} bytes is no GPU's memory (more than 0, at most 1 PiB); "
                         f"give the card's memory, e.g. 12GiB.")
    return gpu_memory


def check_step_size(size: int, batch_size: int, dtype: torch.dtype = torch.float32) -> None:
    """Refuse a step whose input batch alone is beyond any card (NOTE [sizes beyond any card]).

    Raises:
        ValueError: naming ``batch_size`` when even a 1 px side would be too large, else ``size``.
    """
    if _input_bytes(size, batch_size, dtype) <= MAX_BYTES:
        return
    if _input_bytes(1, batch_size, dtype) > MAX_BYTES:
        raise ValueError(f"batch_size={batch_size}: the input batch alone would need over 1 PiB, more than any GPU; "
                         f"give a batch that fits a card (a plan with gpu_memory finds the largest).")
    raise ValueError(f"size={size} (with batch_size={batch_size}): the input batch alone would need "
                     f"{_input_bytes(size, batch_size, dtype) / 2**50:.3g} PiB, more than any GPU; give the images' side "
                     f"in pixels (a plan with gpu_memory finds the largest that fits).")


def _input_bytes(size: int, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of the input batch ``(batch_size, 3, size, size)``, in Python ints (no overflow)."""
    return int(batch_size) * 3 * int(size) ** 2 * torch.empty((), dtype=dtype).element_size()


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


# The settings `pyramidflow train` uses when none are given: the method's (the budget is not read).
_TRAINING = TrainConfig(steps=1)


def _planning_model(config: Any) -> torch.nn.Module:
    """``PyramidFlow(config)`` as training builds it, but with the encoder's weights not read
    (NOTE [planning without encoder weights]); the plain model (``encoder="none"``) is built as is."""
    from ..model import PyramidFlow  # noqa: PLC0415
    from ..model.encoder import encoder_skeleton  # noqa: PLC0415

    return PyramidFlow(config, encoder=encoder_skeleton(getattr(config, "encoder", "none")))


@dataclass(frozen=True)
class PeakPrediction:
    """Predicted peak of one training step, in bytes, and its parts (they add up to ``peak``)."""

    peak: int
    parameters_and_optimizer: int
    input_batch: int
    kept_state: int
    working_set: int


def predict_peak(config: Any, size: int, batch_size: int, *, dtype: torch.dtype = torch.float32,
                 train_config: Optional[TrainConfig] = None) -> PeakPrediction:
    """Predict the peak bytes of a training step of a ``PyramidFlow(config)`` on ``size`` px images.

    Args:
        config: a :class:`pyramidflow.model.PyramidFlowConfig` (its ``mode`` is the one predicted); with
            an encoder, its ``encoder_weights`` are not read (NOTE [planning without encoder weights]).
        size: image side, a valid size for the pyramid.
        batch_size: images per step (at least 2: the loss compares pairs).
        dtype: the model's and images' dtype.
        train_config: the training settings whose step is predicted (clipping, Adam); ``None``: the
            method's defaults, as ``pyramidflow train`` uses them.

    Returns:
        The :class:`PeakPrediction`, without the CUDA margin.

    Raises:
        ValueError: a step beyond any card (NOTE [sizes beyond any card]).
    """
    from ..train.step import make_optimizer, training_step  # noqa: PLC0415

    check_step_size(size, batch_size, dtype)
    settings = train_config or _TRAINING
    counter = _LiveBytes()
    at_forward = {}
    with torch.device("meta"), counter:
        torch.manual_seed(0)
        model = _planning_model(config).to(dtype).train()  # NOTE [planning without encoder weights]
        model.flow.drift = settings.drift  # as the training loop sets it
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, settings)
        for p in params:  # NOTE: as after a first step: gradients and Adam's state exist
            p.grad = torch.zeros_like(p)
        optimizer.step()
        state = counter.live
        images = torch.empty(batch_size, 3, size, size, dtype=dtype)
        batch = counter.live - state
        counter.peak = counter.live
        training_step(model, optimizer, images, model_config=model.config, config=settings,
                      on_forward=lambda: at_forward.setdefault("live", counter.live))
    kept = at_forward["live"] - state - batch
    return PeakPrediction(counter.peak, state, batch, kept, counter.peak - state - batch - kept)


def measure_training_peak(config: Any, size: int, batch_size: int, device: str | torch.device = "cpu", steps: int = 2,
                          train_config: Optional[TrainConfig] = None) -> int:
    """Measured peak bytes of training: model and Adam built, then ``steps`` steps, all inside the probe.

    On CPU the probe is the profiler's allocation events in time order
    (:func:`pyramidflow.memory.peak_memory_cpu`), on CUDA ``max_memory_allocated``.
    The model is built as training builds it: with an encoder, its weights are loaded from
    ``config.encoder_weights`` (a file, or ``"imagenet"``).
    """
    from .probes import peak_memory_cpu, peak_memory_cuda  # noqa: PLC0415
    from ..train.step import step_on_random_images  # noqa: PLC0415

    device = torch.device(device)

    def run() -> None:
        step = step_on_random_images(config, size, batch_size, device, train_config)
        for _ in range(steps):
            step()

    peak, _ = peak_memory_cuda(run, device) if device.type == "cuda" else peak_memory_cpu(run)
    return peak


@dataclass(frozen=True)
class MemoryPlan:
    """What ``pyramidflow plan`` prints: per mode, the prediction and what fits on the card.

    Attributes:
        size, batch_size: the planned step (``size``: the image side, before any encoder).
        predictions: mode -> :class:`PeakPrediction`.
        gpu_memory: the card's bytes, or ``None``.
        max_batch_size, max_size: mode -> the largest batch at ``size`` and the largest valid
            side at ``batch_size`` that fit the card (0 when none does); empty without ``gpu_memory``.
        backward_tile: the config's tile (``None``: whole-level backward).
        suggested_tile: when the whole-level invertible step does not fit the card but a tiled one
            does, the tile (from :data:`TILE_CHOICES`) and its prediction (:func:`suggest_backward_tile`).
    """

    size: int
    batch_size: int
    predictions: Dict[str, PeakPrediction]
    gpu_memory: Optional[int] = None
    max_batch_size: Optional[Dict[str, int]] = None
    max_size: Optional[Dict[str, int]] = None
    encoder: str = "none"
    backward_tile: Optional[int] = None
    suggested_tile: Optional[Tuple[int, PeakPrediction]] = None

    def cuda_need(self, mode: str) -> int:
        """Bytes of the card a run in ``mode`` needs: the peak plus the CUDA margin plus the reserve."""
        return cuda_need(self.predictions[mode].peak)

    def to_json(self) -> dict:
        out = dict(
            size=self.size,
            batch_size=self.batch_size,
            encoder=self.encoder,
            backward_tile=self.backward_tile,
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
            if self.suggested_tile is not None:
                tile, prediction = self.suggested_tile
                out.update(suggested_backward_tile=tile, suggested_backward_tile_peak_bytes=prediction.peak)
        return out


def cuda_need(peak: int) -> int:
    """Card bytes needed for a predicted peak: ``peak * (1 + CUDA_MARGIN) + CUDA_RESERVED``."""
    return int(peak * (1 + CUDA_MARGIN)) + CUDA_RESERVED


# NOTE [searching with few predictions]
# A prediction runs a whole step on meta (seconds on a busy CPU), so the searches for the largest batch
# and side count predictions. Each guess solves a local model of the peak for the budget: a polynomial
# of degree up to 2 in the batch, or in the side squared, through the three predictions nearest to the
# bracket. When the model is right, the guess is the answer and one more prediction (one grid step
# further) confirms it: two predictions. A guess that leaves more than half of the bracket is followed
# by a halving, and without a prediction above the budget a guess at least doubles the distance, so a
# poor model costs a few predictions, never a walk over the grid (at most about 3 * log2 of its length).
def _largest_fitting(peak: Callable[[int], int], budget: int, first: int, step: int, highest: int,
                     known: Dict[int, int], scale: Callable[[int], float]) -> int:  # fmt: skip
    """The largest ``v`` on the grid ``first, first + step, ...``, at most ``highest``, with ``peak(v) <= budget``; 0 if none.

    ``peak`` grows with ``v``; ``known`` holds the predictions already made (``v -> peak``), which the
    search starts from and adds to; ``scale(v)`` is the variable the peak is nearly linear in
    (NOTE [searching with few predictions]).
    """
    import numpy as np  # noqa: PLC0415

    from ..engine.errors import _internal_assert  # noqa: PLC0415

    def ask(v: int) -> int:
        if v not in known:
            known[v] = peak(v)
        return known[v]

    on_grid = lambda v: first + (int(v) - first) // step * step  # noqa: E731  # the grid value at or below v
    highest = on_grid(highest)
    if highest < first:
        return 0
    if not any(p <= budget and first <= v <= highest for v, p in known.items()) and ask(first) > budget:
        return 0
    last_fit: Optional[bool] = None  # whether the last guess of the model fitted
    force = False  # the model missed twice on the same side: halve the bracket, or double the distance
    for _ in range(64 * 3):
        low = max(v for v, p in known.items() if p <= budget and first <= v <= highest)
        high = min((v for v, p in known.items() if p > budget and v > low), default=None)
        if (high is None and low == highest) or (high is not None and high - low <= step):
            return low
        # the model goes through the bracket's ends and the prediction nearest to them
        ends = [low] if high is None else [low, high]
        near = ends + sorted((v for v in known if v not in ends), key=lambda v: abs(v - low))[:3 - len(ends)]
        modelled = not force and len(near) >= 2
        if modelled:
            xs = np.array([scale(v) for v in near], dtype=float)
            model = np.polynomial.Polynomial.fit(xs, [float(known[v]) for v in near], deg=min(2, len(near) - 1))
            guess = _largest_below(lambda v: float(model(scale(v))), budget, low, step, highest if high is None else high)
            if high is None:
                guess = min(guess, 64 * low + step)  # an extrapolation goes at most 64 times as far
        elif high is None:
            guess = low + max(low, step)
        else:
            guess = (low + high) // 2
        top = highest if high is None else high - step
        guess = min(max(on_grid(guess), low + step), top)  # the model's answer is low: check one step further
        fit = ask(guess) <= budget
        force = modelled and fit == last_fit
        last_fit = fit if modelled else None
    _internal_assert(False, "memory.plan: the search for the largest step that fits did not end")


def _largest_below(model: Callable[[int], float], budget: int, start: int, step: int, limit: int) -> int:
    """The largest ``v`` on ``start``'s grid, at most ``limit``, with ``model(v) <= budget``, by doubling then halving."""
    if model(start) > budget:
        return start
    reach = step
    while start + reach < limit and model(start + reach) <= budget:
        reach *= 2
    low, high = start, min(start + reach, limit)
    if model(high) <= budget:
        return high
    while high - low > step:
        middle = low + (high - low) // 2 // step * step
        low, high = (middle, high) if model(middle) <= budget else (low, middle)
    return low


def plan(config: Any, size: int, batch_size: int = 2, *, modes: Sequence[str] = MODES, gpu_memory: Optional[int] = None,
         dtype: torch.dtype = torch.float32, train_config: Optional[TrainConfig] = None,
         suggest_tile: bool = True, progress: bool = False) -> MemoryPlan:  # fmt: skip
    """Predict each mode's peak at ``size`` px and ``batch_size``, and with ``gpu_memory`` what fits.

    The largest batch and side are searched with the same prediction (a few
    seconds each, a handful per search: NOTE [searching with few predictions]); ``progress`` shows a
    bar of the predictions when they take longer than two seconds. A side is a multiple of ``config.size_multiple``
    (``2**(num_levels - 1)``, times 4 with the ResNet18 encoder, whose weights
    are not read: NOTE [planning without encoder weights]). ``train_config``: the training settings
    whose step is planned (``None``: the method's defaults). ``suggest_tile``: when the whole-level
    invertible step does not fit ``gpu_memory``, look for a tile that does (:func:`suggest_backward_tile`).

    Example:
        >>> from pyramidflow.model import PyramidFlowConfig
        >>> p = plan(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=2), 32, modes=("invertible",))
        >>> p.predictions["invertible"].peak > 0
        True
    """
    import dataclasses  # noqa: PLC0415

    from tqdm.auto import tqdm  # noqa: PLC0415

    if batch_size < 2:
        raise ValueError(f"plan: batch_size={batch_size}, but it must be at least 2 (the loss compares pairs of images).")
    multiple = config.size_multiple
    config.check_image_size(size, size, where="plan")
    check_step_size(size, batch_size, dtype)
    if gpu_memory is not None:
        check_gpu_memory(gpu_memory)
    element = torch.empty((), dtype=dtype).element_size()
    predictions, max_batch, max_size = {}, {}, {}
    # A bar only after two seconds: a plan of three predictions on an idle machine prints none.
    with tqdm(desc="plan", bar_format="{desc}: {n_fmt} predictions, {elapsed}{postfix}", delay=2.0, leave=False,
              disable=not progress) as bar:
        for mode in modes:
            mode_config = dataclasses.replace(config, mode=mode)
            bar.set_postfix_str(mode, refresh=False)

            def predict(side: int, batch: int) -> PeakPrediction:
                prediction = predict_peak(mode_config, side, batch, dtype=dtype, train_config=train_config)
                bar.update(1)
                return prediction

            predictions[mode] = predict(size, batch_size)
            if gpu_memory is None:
                continue
            budget = int((gpu_memory - CUDA_RESERVED) / (1 + CUDA_MARGIN))
            # NOTE [searching with few predictions]; the largest values searched: NOTE [sizes beyond any card]
            max_batch[mode] = _largest_fitting(
                lambda b: predict(size, b).peak, budget, 2, 1, MAX_BYTES // (3 * size * size * element),
                {batch_size: predictions[mode].peak}, scale=float)
            max_size[mode] = _largest_fitting(
                lambda side: predict(side, batch_size).peak, budget, multiple, multiple,
                math.isqrt(MAX_BYTES // (3 * batch_size * element)), {size: predictions[mode].peak},
                scale=lambda side: float(side) ** 2)
    suggested = None
    if suggest_tile and gpu_memory is not None and "invertible" in predictions and cuda_need(predictions["invertible"].peak) > gpu_memory:
        suggested = suggest_backward_tile(dataclasses.replace(config, mode="invertible"), size, batch_size, gpu_memory,
                                          dtype=dtype, train_config=train_config)  # fmt: skip
    searched = gpu_memory is not None
    return MemoryPlan(size, batch_size, predictions, gpu_memory, max_batch if searched else None, max_size if searched else None,
                      encoder=getattr(config, "encoder", "none"), backward_tile=getattr(config, "backward_tile", None),
                      suggested_tile=suggested)  # fmt: skip


def suggest_backward_tile(config: Any, size: int, batch_size: int, gpu_memory: int, *, dtype: torch.dtype = torch.float32,
                          train_config: Optional[TrainConfig] = None) -> Optional[Tuple[int, PeakPrediction]]:  # fmt: skip
    """The largest tile of :data:`TILE_CHOICES` with which a whole-level invertible step would fit.

    Only a config that can take a tile is tried: invertible mode (the mode that rebuilds in tiles),
    CVN, no tile yet. A tile is skipped unless the config takes it (a multiple of ``2**(num_levels - 1)``)
    and it is smaller than the flow's level 0 (``size // input_stride``): a tile as large is the whole level.

    Returns:
        ``(tile, prediction)`` for the first tile, largest first, whose CUDA need fits ``gpu_memory``;
        ``None`` when the config cannot take one or no tile fits.
    """
    import dataclasses  # noqa: PLC0415

    if config.mode != "invertible" or config.volume_norm != "CVN" or getattr(config, "backward_tile", None) is not None:
        return None
    side = size // config.input_stride
    for tile in TILE_CHOICES:
        if tile >= side:
            continue
        try:
            tiled = dataclasses.replace(config, backward_tile=tile)
        except ValueError:  # not aligned to this model's levels: the config's own rule
            continue
        prediction = predict_peak(tiled, size, batch_size, dtype=dtype, train_config=train_config)
        if cuda_need(prediction.peak) <= gpu_memory:
            return tile, prediction
    return None


def format_plan(result: MemoryPlan) -> str:
    """The human-readable table of ``pyramidflow plan``."""
    from ..model.encoder import ENCODER_CHANNELS, ENCODER_STRIDES  # noqa: PLC0415

    mib = 2**20
    through = ""
    if result.encoder != "none":
        side = result.size // ENCODER_STRIDES[result.encoder]
        through = f", through the {result.encoder} stem (features {side}x{side}x{ENCODER_CHANNELS[result.encoder]})"
    lines = [
        f"predicted peak memory of one training step at {result.size}x{result.size} px, batch {result.batch_size}{through}"
        + ("" if result.backward_tile is None else f", backward in {result.backward_tile}x{result.backward_tile} px tiles"),
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
        if result.suggested_tile is not None:
            tile, prediction = result.suggested_tile
            lines.append(
                f"invertible with --backward-tile {tile} fits: peak {prediction.peak / mib:.1f} MiB, margin "
                f"{(result.gpu_memory - cuda_need(prediction.peak)) / 2**30:+.2f} GiB (more time per step, the same maths)"
            )
    return "\n".join(lines)


class WouldNotFitError(RuntimeError):
    """A training run's predicted peak does not fit the GPU (raised before any allocation)."""


def preflight(config: Any, size: int, batch_size: int, gpu_memory: int, *, dtype: torch.dtype = torch.float32,
              train_config: Optional[TrainConfig] = None) -> PeakPrediction:
    """Check that a training step fits ``gpu_memory`` bytes; raise naming a batch size or mode that fits.

    The encoder variant is checked too, without reading its weights (NOTE [planning without encoder weights]).

    Raises:
        WouldNotFitError: the predicted need exceeds the card; the message
            names a ``backward_tile`` that fits (:func:`suggest_backward_tile`), else the largest
            ``batch_size`` that fits in this mode, else a ``mode`` that fits at this batch size, else
            the largest ``size``, else the model's size settings.
    """
    import dataclasses  # noqa: PLC0415

    predicted = predict_peak(config, size, batch_size, dtype=dtype, train_config=train_config)
    if cuda_need(predicted.peak) <= gpu_memory:
        return predicted
    what = (
        f"memory plan: training at {size} px, batch {batch_size}, mode {config.mode} needs about "
        f"{cuda_need(predicted.peak) / 2**30:.2f} GiB but the GPU has {gpu_memory / 2**30:.2f} GiB"
    )
    tiled = suggest_backward_tile(config, size, batch_size, gpu_memory, dtype=dtype, train_config=train_config)
    if tiled is not None:  # keeps the batch and the size asked for; costs time only
        raise WouldNotFitError(f"{what}; use backward_tile={tiled[0]}, about {cuda_need(tiled[1].peak) / 2**30:.2f} GiB.")
    found = plan(config, size, batch_size, modes=(config.mode,), gpu_memory=gpu_memory, dtype=dtype, train_config=train_config,
                 suggest_tile=False)  # fmt: skip
    if found.max_batch_size[config.mode] >= 2:
        fix = f"use batch_size={found.max_batch_size[config.mode]}"
    else:
        other = [m for m in MODES if m != config.mode and cuda_need(predict_peak(dataclasses.replace(config, mode=m), size, batch_size, dtype=dtype, train_config=train_config).peak) <= gpu_memory]
        if other:
            fix = f"use mode={other[0]}"
        elif found.max_size[config.mode]:
            fix = f"use size={found.max_size[config.mode]}"
        elif getattr(config, "encoder", "none") != "none":  # the encoder fixes C at its width
            fix = f"use a smaller model (now num_stacks={config.num_stacks}, kernel_size={config.kernel_size})"
        else:
            fix = f"use a smaller model (now channels={config.channels}, num_stacks={config.num_stacks})"
    raise WouldNotFitError(f"{what}; {fix}.")
