"""The PyramidFlow training loop: pairs of normal images, the pairwise Fourier loss, Adam, checkpoints.

One function, :func:`train`, runs the method's training ("Training" in the method page): batches of
``batch_size`` normal images, the pairwise Fourier loss over every pair of the batch, Adam with the
method's settings and gradient-norm clipping, for a budget of steps or epochs. Then, in eval mode and
without gradients, it computes the latent template (mean latent pyramid of the training images) and
statistics of the training images' anomaly scores, and stores both in the checkpoint. A seeded share of
the good images (``calibration_fraction``, default 10%, at least 4) is held out of all of this and
sets the image and pixel decision thresholds (:mod:`pyramidflow.calibration`), so that evaluation and
prediction threshold maps without ever looking at the test set.

The same function runs data-parallel under ``torchrun`` (see :mod:`pyramidflow.train.distributed`). Seeded
runs are reproducible on CPU, and a resumed run continues bit for bit (``NOTE [resume bit for bit]``).

This module holds the run's state and the loop; the pieces it uses live in their own modules: the data
side (:mod:`pyramidflow.train.data`), the step (:mod:`pyramidflow.train.step`), the stop-signal guard
(:mod:`pyramidflow.train.interrupts`), the NaN/inf stop (:mod:`pyramidflow.train.divergence`), the resume
checks and the RNG state (:mod:`pyramidflow.train.resume`), the statistics after training
(:mod:`pyramidflow.train.stats`) and the output folder's lock (:mod:`pyramidflow.train.folder`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pyramidflow.checkpoint import CHECKPOINT_FORMAT_VERSION, CHECKPOINT_NAME, load_checkpoint, save_checkpoint_atomic
from pyramidflow.cpu_threads import thread_settings
from pyramidflow.model import PyramidFlow, PyramidFlowConfig
from pyramidflow.train.config import DTYPES, TrainConfig, TrainingDivergedError, TrainResult, resolve_device
from pyramidflow.train.data import (
    apply_augmentation_setting, apply_bit_depth_setting, batch_images, check_dataset, check_images, data_record, epoch_loader,
    hold_out, without_augmentation,
)
from pyramidflow.train.distributed import (
    DistributedContext, EpochBatchSampler, gather_levels, init_distributed, wrap_data_parallel,
)
from pyramidflow.train.divergence import stop_if_not_finite
from pyramidflow.train.interrupts import InterruptGuard, add_note, describe
from pyramidflow.train.folder import RunFolder
from pyramidflow.train.log import LOG_NAME, DriftTracker, append_log, trim_log
from pyramidflow.train.resume import (
    capture_rng_state, check_same_data, check_same_settings, check_same_split, fresh_rng_state, restore_rng_state,
)
from pyramidflow.train.stats import decision_thresholds, registration_reference, template_and_score_stats
from pyramidflow.train.step import make_optimizer, training_step

__all__ = ["TrainConfig", "TrainResult", "TrainingDivergedError", "resolve_device", "train"]


# ----------------------------------------------------------------------------------------------------
# The loop.


class _Run:
    """The state of one training run, shared by the loop, the checks and the checkpoint writer."""

    def __init__(self, model_config: PyramidFlowConfig, config: TrainConfig, dataset: Dataset, out_dir: Path,
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
        self.good_images: Dataset = dataset  # every good image, held-out ones included (set by train; the reference)
        self.calibration: dict | None = None  # the split, and the thresholds once training has finished
        self.data: dict | None = None  # what the run trains on (train.data.data_record)

        torch.manual_seed(config.seed)
        self.model = PyramidFlow(model_config).to(device=device, dtype=self.dtype)
        self.model.flow.drift = config.drift
        self.drift_tracker = DriftTracker(self.model)
        self.log_path = out_dir / LOG_NAME
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config)
        self.sampler = EpochBatchSampler(len(dataset), config.batch_size, seed=config.seed,
                                         rank=ctx.rank, world_size=ctx.world_size)
        self.net, self.group = self.model, None  # the group of the latent gather under DDP
        if ctx.is_distributed:
            self.net, self.group = wrap_data_parallel(self.model, device)

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
        check_same_settings(ckpt.train_config, self.config, self.path)
        split = self.calibration
        check_same_split((ckpt.calibration or {}).get("held_out"), None if split is None else split["held_out"], self.path)
        check_same_data(ckpt.data, self.data, self.path)
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.step = int(ckpt.step)
        self.losses = [float(x) for x in ckpt.losses]
        rng = ckpt.rng["ranks"]
        restore_rng_state(rng[self.ctx.rank] if self.ctx.rank < len(rng) else fresh_rng_state(self.config.seed, self.step, self.ctx.rank), self.device)
        self.saved_step = self.step
        self.drift_tracker.history = [list(h) for h in (ckpt.drift or [])]
        if self.ctx.is_main:
            trim_log(self.log_path, self.step)

    def _state(self, rng_states: list[dict], template: list[Tensor] | None, stats: dict | None,
               buffers: dict | None = None, registration: dict | None = None) -> dict:
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
            "data": self.data,
            "registration": registration,
        }

    def save(self, *, template: list[Tensor] | None = None, stats: dict | None = None, registration: dict | None = None,
             collective: bool = True) -> None:
        """Check, then write the checkpoint of the current step (rank 0). ``collective``: all ranks are here."""
        self.check_finite(weights=True)
        # Not collective: a Ctrl-C, possibly mid-step; save the state of the end of the last step.
        states = [capture_rng_state(self.device) if collective or self.step_rng is None else self.step_rng]
        buffers = None if collective else self.step_buffers
        if self.ctx.is_distributed and collective:
            states = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(states, capture_rng_state(self.device))
        if self.ctx.is_main:
            save_checkpoint_atomic(self._state(states, template, stats, buffers, registration), self.path)
        self.saved_step = self.step

    # --- NaN / inf --------------------------------------------------------------------------------
    def check_finite(self, *, weights: bool = False) -> None:
        """Move pending losses to the host (one sync) and stop on a non-finite loss or weight."""
        pending, self.pending = self.pending, []
        stop_if_not_finite(pending, self.losses, self.step, params=self.params if weights else None, path=self.path,
                           saved_step=self.saved_step, lr=self.config.lr)

    # --- one step ---------------------------------------------------------------------------------
    def train_step(self, batch: Any, guard: InterruptGuard) -> None:
        gather = functools.partial(gather_levels, group=self.group) if self.ctx.is_distributed else None
        training_step(self.net, self.optimizer, batch_images(batch, self.device, self.dtype),
                      model_config=self.model_config, config=self.config, gather=gather,
                      on_backward=self.drift_tracker.observe, critical=guard.critical, after_update=self._completed)

    def _completed(self, loss: Tensor) -> None:
        """The bookkeeping of a finished update (inside the step's critical section)."""
        self.pending.append(loss.detach())
        self.step += 1
        # An interrupt may come after the next batch was drawn (and augmented): a checkpoint
        # written then must hold the RNG state of the end of this step, not the current one.
        self.step_rng = capture_rng_state(self.device)
        # Likewise the next step's forward updates the running means before its update is done.
        self.step_buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}

    def loader(self) -> DataLoader:
        return epoch_loader(self.dataset, self.sampler, self.step, self.config, self.ctx.rank, self.device)


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
    model_config: PyramidFlowConfig,
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
        out_dir: folder for ``checkpoint.pt`` (created if needed; locked for the run, see
            :mod:`pyramidflow.train.folder`).
        resume: continue from ``<out_dir>/checkpoint.pt`` (bit for bit, see ``NOTE [resume bit for bit]``);
            a finished run may be resumed with a larger budget.
        progress: show a tqdm bar (loss, images/s) on rank 0.

    Returns:
        The :class:`TrainResult`.

    Raises:
        ValueError, TypeError: bad configs or data set, an image that does not decode (found before
            the first step), or too few images to hold out a calibration split.
        FileExistsError: ``out_dir`` already holds a checkpoint and ``resume`` is False.
        RunFolderLockedError: another live run is writing to ``out_dir`` (a ``RuntimeError``).
        FileNotFoundError: ``resume`` is True but there is no checkpoint.
        CheckpointError: the checkpoint is damaged, or from another model or train config, or from
            other data (category, root, image size, number of images, calibration split).
        TrainingDivergedError: the loss or a weight became NaN/inf (the last good checkpoint is kept).
        KeyboardInterrupt: re-raised after writing a checkpoint of the last completed step, with a note
            (``__notes__``) saying what was written and how to resume (SIGTERM raises its subclass
            :class:`~pyramidflow.train.interrupts.TrainingTerminated` the same way).

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
    check_dataset(dataset)
    apply_augmentation_setting(dataset, train_config.augment)
    train_config = dataclasses.replace(train_config, bit_depth=apply_bit_depth_setting(dataset, train_config.bit_depth))
    device = resolve_device(train_config.device)
    ctx = init_distributed(device.type)
    try:
        if device.type == "cuda" and ctx.is_distributed:
            device = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(device)
        out_dir = Path(out_dir)
        # NOTE [stop signals in every phase]
        # The guard covers the whole run, from decoding the images
        # to the final checkpoint, so Ctrl-C or SIGTERM in any phase ends with a checkpoint of the last
        # completed step (or the one on disk, untouched) and one line saying so.
        with InterruptGuard() as guard, RunFolder(out_dir, lock=ctx.is_main):
            run = None
            try:
                if not resume and (out_dir / CHECKPOINT_NAME).exists():
                    raise FileExistsError(
                        f"train: {out_dir / CHECKPOINT_NAME} already exists; pass resume=True (--resume) to "
                        "continue it, or choose another output folder."
                    )
                check_images(dataset)
                training_images, held_out, split = hold_out(dataset, train_config)
                run = _Run(model_config, train_config, training_images, out_dir, ctx, device, progress)
                run.held_out, run.calibration, run.data = held_out, split, data_record(dataset)
                run.good_images = dataset
                if resume:
                    with guard.critical():  # a half-restored run must never be saved
                        run.restore()
                return _loop(run, guard)
            except KeyboardInterrupt as interrupt:
                _save_on_interrupt(run, interrupt, out_dir / CHECKPOINT_NAME, ctx.is_main)
                raise
    finally:
        ctx.close()


def _loop(run: _Run, guard: InterruptGuard) -> TrainResult:
    from tqdm.auto import tqdm

    config = run.config
    total = run.total_steps
    bar = tqdm(total=total, initial=min(run.step, total), disable=not run.progress, desc="train", unit="step",
               dynamic_ncols=True)
    run.model.train()
    window_start, window_step = time.perf_counter(), run.step
    cpu = {"cpu": thread_settings()}  # on the first record of each run: the threads its images_per_s were taken with
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
                                   max_drift=drift, **cpu)
                        cpu = {}
                if config.checkpoint_every and run.step % config.checkpoint_every == 0 and run.step < total:
                    run.save()
                if run.step >= total:
                    break
        run.check_finite(weights=True)
        template = stats = registration = None
        if run.ctx.is_main:
            # The template pass must leave no trace in the RNG state the checkpoint stores: a run
            # resumed with a larger budget continues from the end of the last step.
            rng = capture_rng_state(run.device)
            with without_augmentation(run.dataset):
                template, stats = template_and_score_stats(run.model, run.dataset, config, run.device, run.dtype)
                thresholds = decision_thresholds(run.model, template, stats, held_out=run.held_out,
                                                 training_images=run.dataset, config=config, device=run.device,
                                                 dtype=run.dtype)
            with without_augmentation(run.good_images):
                registration = {"reference": registration_reference(run.good_images, batch_size=config.batch_size)}
            restore_rng_state(rng, run.device)
            run.calibration = {**(run.calibration or {}), **thresholds}
        with guard.critical():  # a stop signal now is raised once the finished checkpoint is on disk
            run.save(template=template, stats=stats, registration=registration)
        if run.ctx.is_distributed:
            torch.distributed.barrier()
    finally:
        bar.close()
    run.model.eval()
    return TrainResult(checkpoint_path=run.path, step=run.step, losses=list(run.losses), model=run.model,
                       template=template, score_stats=stats)


def _save_on_interrupt(run: _Run | None, interrupt: KeyboardInterrupt, path: Path, is_main: bool) -> None:
    """Write the checkpoint of the last completed step (rank 0), and say where it is in a note on ``interrupt``.

    ``run`` is ``None`` when the signal came before the run was set up (while the images were decoded).
    """
    if not is_main:
        return
    what = describe(interrupt)
    try:
        if run is not None and run.step != run.saved_step and run.step > 0:
            run.save(collective=False)  # other ranks are being interrupted too: no collectives
            note = f"train: {what}; checkpoint of step {run.step} written to {path}; resume with resume=True (--resume)."
        elif run is not None and run.saved_step is not None:
            note = f"train: {what}; the checkpoint {path} (step {run.saved_step}) is up to date; resume with resume=True (--resume)."
        elif path.is_file():
            note = f"train: {what} before the first step; the checkpoint {path} is untouched; resume with resume=True (--resume)."
        else:
            note = f"train: {what} before the first step; no checkpoint written."
    except TrainingDivergedError as error:
        note = f"train: {what}; not saved: {error}"
    add_note(interrupt, note)  # printed once, by whoever reports the interrupt (the command line's one line)
