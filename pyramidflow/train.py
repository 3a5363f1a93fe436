"""The PyramidFlow training loop: pairs of normal images, the pairwise Fourier loss, Adam, checkpoints.

One function, :func:`train`, runs the method's training ("Training" in the method page): batches of
``batch_size`` normal images, the pairwise Fourier loss over every pair of the batch, Adam with the
method's settings and gradient-norm clipping, for a budget of steps or epochs. Then, in eval mode and
without gradients, it computes the latent template (mean latent pyramid of the training images) and
statistics of the training images' anomaly scores, and stores both in the checkpoint. A seeded share of
the good images (``calibration_fraction``, default 10%, at least 4) is held out of all of this and
sets the image and pixel decision thresholds (:mod:`pyramidflow.calibration`), so that evaluation and
prediction threshold maps without ever looking at the test set.

The same function runs data-parallel under ``torchrun`` (see :mod:`pyramidflow.distributed`). Seeded
runs are reproducible on CPU, and a resumed run continues bit for bit (``NOTE [resume bit for bit]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pyramidflow.calibration import CalibrationSplit, calibrate, calibration_split
from pyramidflow.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CHECKPOINT_NAME,
    CheckpointError,
    config_differences,
    load_checkpoint,
    save_checkpoint_atomic,
)
from pyramidflow.distributed import DistributedContext, EpochBatchSampler, gather_levels, init_distributed
from pyramidflow.interrupts import STOP_SIGNALS, TrainingTerminated, interrupt_for
from pyramidflow.train_config import DTYPES, TrainConfig, TrainingDivergedError, TrainResult, resolve_device
from pyramidflow.train_log import LOG_NAME, DriftTracker, append_log, trim_log

__all__ = ["TrainConfig", "TrainResult", "TrainingDivergedError", "resolve_device", "train"]

# Train settings a resumed run may change: they do not alter the trajectory of the weights.
_RESUMABLE_CHANGES = ("steps", "epochs", "checkpoint_every", "log_every", "num_workers", "device", "drift")


# ----------------------------------------------------------------------------------------------------
# Model-side pieces (the model package owns the maths; these wrappers only adapt calling conventions).


def _build_model(model_config: Any) -> torch.nn.Module:
    from pyramidflow.model import PyramidFlow

    return PyramidFlow(model_config)


def _latents(model: torch.nn.Module, images: Tensor) -> tuple[Tensor, ...]:
    """The latent pyramid of ``images`` ``(N, 3, H, W)``: a tuple of ``(N, C, H_i, W_i)``."""
    return tuple(model(images))


def _pairwise_loss(levels: Sequence[Tensor], objective: str = "fourier") -> Tensor:
    """The loss over every pair of the (global) batch: the method's :func:`pyramidflow.model.fourier_loss`,
    or the ``"spatial"`` ablation (:func:`pyramidflow.model.loss.objective_loss`)."""
    from pyramidflow.model.loss import objective_loss

    return objective_loss(objective, levels)


# ----------------------------------------------------------------------------------------------------
# RNG state: every generator the run draws from (NOTE [resume bit for bit]).


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # numpy's state as tensors and ints, so the checkpoint loads with weights_only=True.
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
    }
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1]))


# ----------------------------------------------------------------------------------------------------
# Ctrl-C between a parameter update and its bookkeeping would leave weights one step ahead of `step`.


class _InterruptGuard:
    """Defers SIGINT and SIGTERM while the optimizer updates the weights and the step counter.

    Outside the guarded section Ctrl-C raises KeyboardInterrupt at once (SIGTERM raises
    :class:`~pyramidflow.interrupts.TrainingTerminated`, a KeyboardInterrupt, so both are handled
    alike); inside, it is raised as soon as the section ends, so the in-memory state is always that
    of a completed step. Only the main thread can install signal handlers; elsewhere the guard does nothing.
    """

    def __init__(self) -> None:
        self._active = threading.current_thread() is threading.main_thread()
        self._critical = False
        self._pending: int | None = None  # the signal that arrived inside the critical section
        self._previous: dict = {}

    def __enter__(self) -> "_InterruptGuard":
        if self._active:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self._critical:
            self._pending = signum
        else:
            raise interrupt_for(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise interrupt_for(signum)


# ----------------------------------------------------------------------------------------------------
# Template and score statistics (eval mode, no grad, training images only: no test data, ever).


@torch.no_grad()
def _template_and_score_stats(
    model: torch.nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device, dtype: torch.dtype
) -> tuple[list[Tensor], dict]:
    """The latent template and score statistics of the training images (eval mode, no grad).

    Only training (normal) images are used: thresholds derived from these statistics never see the
    test set.
    """
    from pyramidflow.model import anomaly_map, fit_template, image_score

    was_training = model.training
    model.eval()
    try:
        kind = getattr(getattr(model, "config", None), "template", "mean")
        difference = getattr(getattr(model, "config", None), "difference", "pyramid")
        template = fit_template(model, (_images(b, device, dtype) for b in _plain_loader(dataset, config)), kind=kind)
        image_scores, pixels = [], []
        # NOTE [pixel quantile sample]: a fixed-stride sample of at most ~4M pixel scores keeps the
        # quantile's memory bounded for large training sets; it is deterministic, never random.
        total = len(dataset) * int(np.prod(_image_size(dataset)))
        stride = max(1, math.ceil(total / (1 << 22)))
        for batch in _plain_loader(dataset, config):
            images = _images(batch, device, dtype)
            maps = anomaly_map(_latents(model, images), template, images.shape[-2:], difference=difference)  # (N, 1, H, W)
            image_scores.append(image_score(maps).double().cpu())
            pixels.append(maps.reshape(-1)[::stride].double().cpu())
        scores = torch.cat(image_scores)
        pixel_values = torch.cat(pixels).numpy()
        stats = {
            "num_images": int(scores.numel()),
            "image_mean": float(scores.mean()),
            "image_std": float(scores.std(unbiased=False)),
            "image_max": float(scores.max()),
            "quantile": float(config.score_quantile),
            "pixel_quantile": float(np.quantile(pixel_values, config.score_quantile)),
            "pixel_max": float(pixel_values.max()),
            "image_scores": [float(s) for s in scores],
        }
        return [level.detach().cpu() for level in template], stats
    finally:
        model.train(was_training)


def _apply_augmentation_setting(dataset: Dataset, augment: bool | None) -> None:
    """``TrainConfig.augment``: ``None`` keeps the data set's own choice (textures on), a bool forces it."""
    if augment is None:
        return
    if not isinstance(getattr(dataset, "augment", None), bool):
        raise ValueError(
            f"train: TrainConfig.augment={augment} but the data set ({type(dataset).__name__}) has no boolean "
            "'augment' attribute to switch; use a pyramidflow.data data set or leave augment=None."
        )
    dataset.augment = bool(augment)


@contextlib.contextmanager
def _without_augmentation(dataset: Dataset) -> Iterator[None]:
    """Template and statistics describe the training images as they are, not random flips of them.

    Data sets of :mod:`pyramidflow.data` switch augmentation with their ``augment`` attribute; other
    data sets are used as given.
    """
    augment = getattr(dataset, "augment", None)
    if isinstance(augment, bool):
        dataset.augment = False
    try:
        yield
    finally:
        if isinstance(augment, bool):
            dataset.augment = augment


def _image_size(dataset: Dataset) -> tuple[int, int]:
    return tuple(dataset[0]["image"].shape[-2:])


def _images(batch: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
    images = batch["image"] if isinstance(batch, dict) else batch
    return images.to(device=device, dtype=dtype, non_blocking=True)


def _plain_loader(dataset: Dataset, config: TrainConfig) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers,
                      generator=generator)


# ----------------------------------------------------------------------------------------------------
# The loop.


def _check_dataset(dataset: Any) -> None:
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"train: dataset must be a map-style torch Dataset of dicts with 'image', got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("train: the training data set is empty; point it at a folder of normal images.")
    item = dataset[0]
    if not isinstance(item, dict) or "image" not in item:
        raise TypeError(
            f"train: dataset items must be dicts with an 'image' tensor (3, H, W), got {type(item).__name__}; "
            "use a pyramidflow.data data set."
        )


class _Run:
    """The state of one training run, shared by the loop, the checks and the checkpoint writer."""

    def __init__(self, model_config: Any, config: TrainConfig, dataset: Dataset, out_dir: Path,
                 ctx: DistributedContext, device: torch.device, progress: bool) -> None:
        self.model_config = model_config
        self.config = config
        self.dataset = dataset
        self.path = out_dir / CHECKPOINT_NAME
        self.ctx = ctx
        self.device = device
        self.dtype = DTYPES[config.dtype]
        self.progress = progress and ctx.is_main
        self.step = 0
        self.losses: list[float] = []
        self.pending: list[Tensor] = []  # losses of recent steps, still on the device
        self.saved_step: int | None = None  # step of the checkpoint on disk written by this run
        self.step_rng: dict | None = None  # RNG state at the end of the last completed step
        self.step_buffers: dict | None = None  # model buffers (running means) at the end of the last step
        self.held_out: Dataset | None = None  # good images kept out of training for the thresholds
        self.calibration: dict | None = None  # the split, and the thresholds once training has finished

        torch.manual_seed(config.seed)
        self.model = _build_model(model_config).to(device=device, dtype=self.dtype)
        if hasattr(self.model, "flow"):
            self.model.flow.drift = config.drift
        self.drift_tracker = DriftTracker(self.model)
        self.log_path = out_dir / LOG_NAME
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=config.betas, eps=config.eps,
                                          weight_decay=config.weight_decay)
        self.sampler = EpochBatchSampler(len(dataset), config.batch_size, seed=config.seed,
                                         rank=ctx.rank, world_size=ctx.world_size)
        self.net = self.model
        self.group = None
        if ctx.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            # A separate group for the latent gather and the VN means, so that these collectives
            # never interleave with DDP's gradient buckets on the default group.
            self.group = torch.distributed.new_group()
            self.model.synchronize_volume_norm(self.group)  # NOTE [volume normalisation across ranks]
            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, **_no_buffer_broadcast()
            )

    # --- budget ---------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        return self.config.epochs * self.sampler.batches_per_epoch

    # --- checkpoints ----------------------------------------------------------------------------
    def restore(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(
                f"train: resume=True but there is no checkpoint at {self.path}; start without resume."
            )
        ckpt = load_checkpoint(self.path, self.model_config, map_location=self.device)
        # Settings newer than the checkpoint (absent from it) are not compared: the run predates them.
        differing = config_differences(
            {k: v for k, v in ckpt.train_config.items() if k not in _RESUMABLE_CHANGES},
            {k: v for k, v in dataclasses.asdict(self.config).items()
             if k not in _RESUMABLE_CHANGES and k in ckpt.train_config},
        )
        if differing:
            raise CheckpointError(
                f"train: cannot resume from {self.path}: the train config differs in {'; '.join(differing)}; "
                f"resume with the same settings (only {', '.join(_RESUMABLE_CHANGES)} may change) or use a new folder."
            )
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.step = int(ckpt.step)
        self.losses = [float(x) for x in ckpt.losses]
        rng = ckpt.rng["ranks"]
        _set_rng_state(rng[self.ctx.rank] if self.ctx.rank < len(rng) else _fresh_rng(self.config.seed, self.step, self.ctx.rank), self.device)
        self.saved_step = self.step
        recorded = (ckpt.calibration or {}).get("held_out")
        if recorded is not None and self.calibration is not None and recorded != self.calibration["held_out"]:
            raise CheckpointError(
                f"train: cannot resume from {self.path}: its calibration split held out images {recorded} but the "
                f"data set now gives {self.calibration['held_out']} (the folder changed); resume with the same images."
            )
        self.drift_tracker.history = [list(h) for h in (ckpt.drift or [])]
        if self.ctx.is_main:
            trim_log(self.log_path, self.step)

    def _state(self, rng_states: list[dict], template: list[Tensor] | None, stats: dict | None,
               buffers: dict | None = None) -> dict:
        epoch, batch = divmod(self.step, self.sampler.batches_per_epoch)
        weights = self.model.state_dict()
        weights.update({k: v for k, v in (buffers or {}).items() if k in weights})  # persistent ones only
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "model_config": dataclasses.asdict(self.model_config),
            "train_config": dataclasses.asdict(self.config),
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": {"ranks": rng_states},
            "sampler": {"seed": self.config.seed, "epoch": epoch, "batch": batch},
            "losses": list(self.losses),
            "finished": template is not None,
            "template": template,
            "score_stats": stats,
            "calibration": self.calibration,
            "drift": [list(h) for h in self.drift_tracker.history],
        }

    def save(self, *, template: list[Tensor] | None = None, stats: dict | None = None, collective: bool = True) -> None:
        """Check, then write the checkpoint of the current step (rank 0). ``collective``: all ranks are here."""
        self.check_finite(weights=True)
        # Not collective: a Ctrl-C, possibly mid-step; save the state of the end of the last step.
        states = [_rng_state(self.device) if collective or self.step_rng is None else self.step_rng]
        buffers = None if collective else self.step_buffers
        if self.ctx.is_distributed and collective:
            states = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(states, _rng_state(self.device))
        if self.ctx.is_main:
            save_checkpoint_atomic(self._state(states, template, stats, buffers), self.path)
        self.saved_step = self.step

    # --- NaN / inf --------------------------------------------------------------------------------
    def check_finite(self, *, weights: bool = False) -> None:
        """Move pending losses to the host (one sync) and stop on a non-finite loss or weight."""
        if self.pending:
            values = torch.stack(self.pending).double().cpu()
            first = self.step - len(self.pending) + 1
            self.pending = []
            bad = (~torch.isfinite(values)).nonzero()
            self.losses.extend(values.tolist())
            if bad.numel():
                at = first + int(bad[0, 0])
                self._diverged(f"the loss became {values[int(bad[0, 0])].item()} at step {at}")
        if weights:
            finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
            if not bool(finite):
                self._diverged(f"a weight became NaN/inf by step {self.step}")

    def _diverged(self, what: str) -> None:
        kept = (
            f"the last good checkpoint {self.path} (step {self.saved_step}) is kept"
            if self.saved_step is not None
            else f"no checkpoint was written ({self.path} untouched)"
        )
        raise TrainingDivergedError(
            f"train: {what}; stopped without saving, {kept}; lower lr (now {self.config.lr}) or check the data."
        )

    # --- one step ---------------------------------------------------------------------------------
    def train_step(self, batch: Any, guard: _InterruptGuard) -> None:
        images = _images(batch, self.device, self.dtype)
        objective = getattr(self.model_config, "objective", "fourier")
        if objective == "gaussian_nll":  # volume_norm=None ablation: per sample, so no gather under DDP
            from pyramidflow.model.loss import gaussian_nll

            levels, logdet = self.net(images, return_logdet=True)
            loss = gaussian_nll(levels, logdet)
        else:
            levels = _latents(self.net, images)
            if self.ctx.is_distributed:
                levels = gather_levels(levels, self.group)  # NOTE [global batch under DDP]
            loss = _pairwise_loss(levels) if objective == "fourier" else _pairwise_loss(levels, objective)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.drift_tracker.observe()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)  # no host sync
        with guard.critical():
            self.optimizer.step()
            self.pending.append(loss.detach())
            self.step += 1
            # An interrupt may come after the next batch was drawn (and augmented): a checkpoint
            # written then must hold the RNG state of the end of this step, not the current one.
            self.step_rng = _rng_state(self.device)
            # Likewise the next step's forward updates the running means before its update is done.
            self.step_buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}

    def loader(self) -> DataLoader:
        epoch, batch = divmod(self.step, self.sampler.batches_per_epoch)
        self.sampler.set_position(epoch, batch)
        # Its own generator: building the iterator draws worker base seeds from it, never from the
        # global RNG that augmentation uses (NOTE [resume bit for bit]).
        generator = torch.Generator()
        generator.manual_seed((self.config.seed * 1_000_003 + epoch * 7919 + self.ctx.rank) & 0x7FFF_FFFF)
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.config.num_workers,
                          pin_memory=self.device.type == "cuda", generator=generator)


def _no_buffer_broadcast() -> dict:
    """DDP option to skip the per-forward buffer broadcast: the synced running means agree on every rank.

    Newer torch names it ``forward_sync_buffers`` (``broadcast_buffers`` is deprecated there).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _fresh_rng(seed: int, step: int, rank: int) -> dict:
    """A deterministic RNG state for a rank whose state the checkpoint lacks (an interrupted DDP run)."""
    torch.manual_seed(seed * 1_000_003 + step * 7919 + rank)
    return _rng_state(torch.device("cpu"))


# NOTE [resume bit for bit]
# Everything random in a step comes from (a) the shuffle, a pure function of (seed, epoch), with the
# position (epoch, batch) derived from the step count; (b) torch's global CPU RNG (augmentation in a
# single-process loader), the CUDA RNG, numpy's and Python's global RNGs, all saved and restored; (c)
# the DataLoader's own generator, seeded per (seed, epoch, rank), never the global one. Model, Adam
# state and loss history are saved exactly. So "3 steps, then resume to 6" equals "6 steps" exactly,
# on CPU with num_workers=0. With worker processes, augmentation draws come from per-worker RNGs seeded
# at the start of each epoch, so a run resumed mid-epoch sees different augmentations (not different
# images) for the rest of that epoch.


def train(
    model_config: Any,
    train_config: TrainConfig,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a PyramidFlow on normal images and write ``<out_dir>/checkpoint.pt``.

    The method's training: every step draws ``batch_size`` images (a seeded shuffle per epoch), runs
    the flow, takes the pairwise Fourier loss over all pairs of the batch, and updates with Adam after
    clipping the gradient norm. Checkpoints are written atomically every ``checkpoint_every`` steps
    and at the end; the final one also holds the latent template and the score statistics of the
    training images, and the decision thresholds set on the held-out calibration split (the seeded
    ``calibration_fraction`` of ``dataset``, never trained on; see :mod:`pyramidflow.calibration`). Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains data-parallel, the
    global batch split across ranks; rank 0 writes checkpoints and shows the progress bar.

    Args:
        model_config: a ``PyramidFlowConfig``.
        train_config: the :class:`TrainConfig`.
        dataset: map-style data set of dicts with ``image`` ``(3, H, W)`` (e.g.
            ``MVTecDataset(root, category, "train")``); only normal images belong here.
        out_dir: folder for ``checkpoint.pt`` (created if needed).
        resume: continue from ``<out_dir>/checkpoint.pt`` (bit for bit, see ``NOTE [resume bit for bit]``);
            a finished run may be resumed with a larger budget.
        progress: show a tqdm bar (loss, images/s) on rank 0.

    Returns:
        The :class:`TrainResult`.

    Raises:
        ValueError, TypeError: bad configs or data set, or too few images to hold out a calibration split.
        FileExistsError: ``out_dir`` already holds a checkpoint and ``resume`` is False.
        FileNotFoundError: ``resume`` is True but there is no checkpoint.
        CheckpointError: the checkpoint is damaged or from another model or train config.
        TrainingDivergedError: the loss or a weight became NaN/inf (the last good checkpoint is kept).
        KeyboardInterrupt: re-raised after writing a checkpoint of the last completed step (SIGTERM
            raises its subclass :class:`~pyramidflow.interrupts.TrainingTerminated` the same way).

    Example:
        >>> from pyramidflow.data import MVTecDataset  # doctest: +SKIP
        >>> from pyramidflow.model import PyramidFlowConfig  # doctest: +SKIP
        >>> data = MVTecDataset("mvtec", "carpet", "train", size=256)  # doctest: +SKIP
        >>> result = train(PyramidFlowConfig(), TrainConfig(epochs=15), data, "runs/carpet")  # doctest: +SKIP
    """
    if not isinstance(train_config, TrainConfig):
        raise TypeError(f"train: train_config must be a TrainConfig, got {type(train_config).__name__}.")
    if not dataclasses.is_dataclass(model_config) or isinstance(model_config, type):
        raise TypeError(f"train: model_config must be a PyramidFlowConfig, got {type(model_config).__name__}.")
    _check_dataset(dataset)
    _apply_augmentation_setting(dataset, train_config.augment)
    device = resolve_device(train_config.device)
    ctx = init_distributed(device.type)
    try:
        if device.type == "cuda" and ctx.is_distributed:
            device = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(device)
        out_dir = Path(out_dir)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and (out_dir / CHECKPOINT_NAME).exists():
            raise FileExistsError(
                f"train: {out_dir / CHECKPOINT_NAME} already exists; pass resume=True (--resume) to continue "
                "it, or choose another output folder."
            )
        training_images, held_out, split = _hold_out(dataset, train_config)
        run = _Run(model_config, train_config, training_images, out_dir, ctx, device, progress)
        run.held_out, run.calibration = held_out, split
        if resume:
            run.restore()
        return _loop(run)
    finally:
        ctx.close()


def _loop(run: _Run) -> TrainResult:
    from tqdm.auto import tqdm

    config = run.config
    total = run.total_steps
    bar = tqdm(total=total, initial=min(run.step, total), disable=not run.progress, desc="train", unit="step",
               dynamic_ncols=True)
    run.model.train()
    window_start, window_step = time.perf_counter(), run.step
    try:
        with _InterruptGuard() as guard:
            try:
                while run.step < total:
                    for batch in run.loader():
                        run.train_step(batch, guard)
                        bar.update(1)
                        if run.step % config.log_every == 0 or run.step == total:
                            run.check_finite()
                            now = time.perf_counter()
                            rate = (run.step - window_step) * config.batch_size / max(now - window_start, 1e-9)
                            window_start, window_step = now, run.step
                            drift = run.drift_tracker.close_interval(run.step)
                            bar.set_postfix(loss=f"{run.losses[-1]:.4g}", img_s=f"{rate:.1f}",
                                            drift="-" if drift is None else f"{drift:.1e}")
                            if run.ctx.is_main:
                                append_log(run.log_path, step=run.step, loss=run.losses[-1], images_per_s=rate,
                                           max_drift=drift)
                        if config.checkpoint_every and run.step % config.checkpoint_every == 0 and run.step < total:
                            run.save()
                        if run.step >= total:
                            break
            except KeyboardInterrupt as interrupt:
                _save_on_interrupt(run, interrupt, bar)
                raise
        run.check_finite(weights=True)
        template = stats = None
        if run.ctx.is_main:
            # The template pass must leave no trace in the RNG state the checkpoint stores: a run
            # resumed with a larger budget continues from the end of the last step.
            rng = _rng_state(run.device)
            with _without_augmentation(run.dataset):
                template, stats = _template_and_score_stats(run.model, run.dataset, config, run.device, run.dtype)
                _set_thresholds(run, template, stats)
            _set_rng_state(rng, run.device)
        run.save(template=template, stats=stats)
        if run.ctx.is_distributed:
            torch.distributed.barrier()
    finally:
        bar.close()
    run.model.eval()
    return TrainResult(checkpoint_path=run.path, step=run.step, losses=list(run.losses), model=run.model,
                       template=template, score_stats=stats)


def _hold_out(dataset: Dataset, config: TrainConfig) -> tuple[Dataset, Dataset | None, dict]:
    """The seeded calibration split (``pyramidflow.calibration``): training images, held-out images, record."""
    train_indices, held_out = calibration_split(len(dataset), config.calibration_fraction, config.seed)
    samples = getattr(dataset, "samples", None)
    names = [str(getattr(samples[i], "image", samples[i])) for i in held_out] if samples is not None else None
    record = {"seed": config.seed, "fraction": config.calibration_fraction, "held_out": held_out,
              "held_out_names": names}
    if not held_out:
        return dataset, None, record
    return CalibrationSplit(dataset, train_indices), CalibrationSplit(dataset, held_out), record


def _set_thresholds(run: _Run, template: list[Tensor], stats: dict) -> None:
    """Image and pixel thresholds on the held-out good images (the training images if none were held out)."""
    config = run.config
    images = run.held_out if run.held_out is not None else run.dataset
    thresholds = calibrate(
        run.model, [level.to(run.device) for level in template], images, image_fpr=config.image_fpr,
        pixel_fpr=config.pixel_fpr, batch_size=config.batch_size, device=run.device, dtype=run.dtype,
        source="held-out" if run.held_out is not None else "training images",
        training_scores=stats["image_scores"] if run.held_out is not None else None,
    )
    run.calibration = {**(run.calibration or {}), **thresholds}


def _save_on_interrupt(run: _Run, interrupt: KeyboardInterrupt, bar: Any) -> None:
    """Write the checkpoint of the last completed step (rank 0), and say where it is."""
    if not run.ctx.is_main:
        return
    what = f"terminated ({interrupt})" if isinstance(interrupt, TrainingTerminated) else "interrupted"
    try:
        if run.step != run.saved_step and run.step > 0:
            run.save(collective=False)  # other ranks are being interrupted too: no collectives
            note = f"train: {what}; checkpoint of step {run.step} written to {run.path}; resume with resume=True (--resume)."
        elif run.saved_step is not None:
            note = f"train: {what}; the checkpoint {run.path} (step {run.saved_step}) is up to date; resume with resume=True (--resume)."
        else:
            note = f"train: {what} before the first step; no checkpoint written."
    except TrainingDivergedError as error:
        note = f"train: {what}; not saved: {error}"
    bar.write(note, file=sys.stderr)
    if hasattr(interrupt, "add_note"):
        interrupt.add_note(note)
