"""The training loop: reproducibility, bit-for-bit resume, atomic checkpoints, NaN and Ctrl-C handling,
config errors, and 2 gloo processes against 1 process."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

import pyramidflow.checkpoint as checkpoint_module
import pyramidflow.train.step as step_module
from pyramidflow.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint_atomic
from pyramidflow.train.distributed import EpochBatchSampler
from pyramidflow.model import PyramidFlowConfig, anomaly_map
from pyramidflow.train import TrainConfig, TrainingDivergedError, resolve_device, train
from pyramidflow.train.log import LOG_NAME

SIZE = 32


class RandomImages(Dataset):
    """Dicts like the data package's, with a random flip drawn from torch's global RNG (as augmentation does)."""

    def __init__(self, count: int = 8, size: int = SIZE, seed: int = 1, augment: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        base = torch.rand(1, 3, size, size, generator=generator)
        self.images = base + 0.3 * torch.randn(count, 3, size, size, generator=generator)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "label": 0, "path": f"{index}.png"}


def model_config(**overrides) -> PyramidFlowConfig:
    settings = dict(channels=4, kernel_size=3, num_stacks=2, num_levels=3)
    settings.update(overrides)
    return PyramidFlowConfig(**settings)


def run(out_dir, steps=6, dataset=None, resume=False, model=None, **overrides):
    settings = dict(steps=steps, checkpoint_every=None, log_every=2, device="cpu")
    settings.update(overrides)
    return train(model or model_config(), TrainConfig(**settings), dataset or RandomImages(), out_dir, resume=resume,
                 progress=False)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# Configs and devices.


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(), "exactly one budget"),
        (dict(steps=3, epochs=1), "exactly one budget"),
        (dict(steps=0), "steps must be at least 1"),
        (dict(steps=3, batch_size=1), "batch_size must be at least 2"),
        (dict(steps=3, device="tpu"), "device must be one of"),
        (dict(steps=3, lr=-1.0), "lr must be a positive number"),
        (dict(steps=3, betas=(0.5, 1.5)), "betas"),
        (dict(steps=3, grad_clip=0.0), "grad_clip"),
        (dict(steps=3, dtype="float16"), "dtype"),
        (dict(steps=3, seed=-1), r"seed must be >= 0"),
    ],
)
def test_train_config_refuses_bad_values(settings, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**settings)


def test_train_config_refuses_a_float_step_count():
    with pytest.raises(TypeError, match="steps must be an int"):
        TrainConfig(steps=2.5)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device='cuda' was asked for but torch sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_device("gpu")


def test_sampler_splits_each_global_batch_across_ranks():
    whole = EpochBatchSampler(9, 4, seed=3)
    shares = [EpochBatchSampler(9, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    batches = list(whole)
    assert len(batches) == 2  # 9 // 4: the incomplete last batch is dropped
    for step, (left, right) in enumerate(zip(*shares)):
        assert left + right == batches[step]
    whole.set_position(epoch=1, batch=1)
    assert list(whole) == [EpochBatchSampler(9, 4, seed=3).permutation(1).tolist()[4:8]]
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        EpochBatchSampler(9, 4, seed=0, world_size=3)


# ----------------------------------------------------------------------------------------------------
# Reproducibility and resume.


def test_seeded_runs_are_equal_and_seeds_matter(tmp_path):
    a = run(tmp_path / "a")
    b = run(tmp_path / "b")
    c = run(tmp_path / "c", seed=1)
    assert len(a.losses) == 6
    assert a.losses == b.losses
    assert_same_state(a.model.state_dict(), b.model.state_dict())
    assert a.losses != c.losses


def test_resume_continues_bit_for_bit(tmp_path):
    # 8 images, batch 2: 4 steps per epoch, so the resumed run starts mid-epoch and crosses an epoch.
    straight = run(tmp_path / "straight", steps=6)
    first = run(tmp_path / "resumed", steps=3)
    assert first.losses == straight.losses[:3]
    resumed = run(tmp_path / "resumed", steps=6, resume=True)
    assert resumed.step == 6
    assert resumed.losses == straight.losses
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    a, b = load_checkpoint(straight.checkpoint_path), load_checkpoint(resumed.checkpoint_path)
    assert_same_state(a.optimizer["state"][0], b.optimizer["state"][0])
    for x, y in zip(a.template, b.template):
        assert torch.equal(x, y)
    assert a.score_stats == b.score_stats


# The smallest tile the model takes (2**(num_levels - 1) = 4 px): 8×8 tiles of level 0 at 32 px.
SMALLEST_TILE = 4


def test_resume_with_a_backward_tile_continues_bit_for_bit(tmp_path):
    tiled = model_config(backward_tile=SMALLEST_TILE, num_stacks=1)  # one stack: 64 tiles per coupling are slow enough
    straight = run(tmp_path / "straight", steps=3, model=tiled)
    run(tmp_path / "resumed", steps=1, model=tiled)
    resumed = run(tmp_path / "resumed", steps=3, resume=True, model=tiled)
    assert resumed.step == 3 and resumed.losses == straight.losses
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    a, b = load_checkpoint(straight.checkpoint_path), load_checkpoint(resumed.checkpoint_path)
    assert_same_state(a.optimizer["state"][0], b.optimizer["state"][0])
    assert b.model_config["backward_tile"] == SMALLEST_TILE


def test_resume_may_change_the_backward_tile(tmp_path):
    """The tile changes memory and rounding order, not the maths: like --mode, a resume may change it."""
    straight = run(tmp_path / "straight", steps=4)
    run(tmp_path / "resumed", steps=2)
    resumed = run(tmp_path / "resumed", steps=4, resume=True, model=model_config(backward_tile=SMALLEST_TILE))
    assert resumed.losses[:2] == straight.losses[:2]
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-4)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert load_checkpoint(resumed.checkpoint_path).model_config["backward_tile"] == SMALLEST_TILE


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    run(tmp_path, steps=2)
    with pytest.raises(FileExistsError, match="already exists; pass resume=True"):
        run(tmp_path, steps=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        run(tmp_path / "empty", steps=2, resume=True)


def test_resume_refuses_other_train_settings(tmp_path):
    run(tmp_path, steps=2)
    with pytest.raises(CheckpointError, match=r"lr=0\.0002 \(checkpoint\) vs 0\.001 \(asked\)"):
        run(tmp_path, steps=4, resume=True, lr=1e-3)


def test_resume_refuses_another_number_of_images(tmp_path):
    run(tmp_path, steps=2, calibration_fraction=0)  # no split: the split check cannot see the count
    with pytest.raises(CheckpointError, match=r"num_images 8 \(checkpoint\) vs 9 \(this run, images added or removed\)"):
        run(tmp_path, steps=4, resume=True, dataset=RandomImages(count=9), calibration_fraction=0)


# ----------------------------------------------------------------------------------------------------
# The checkpoint.


def test_final_checkpoint_holds_template_and_training_score_stats(tmp_path):
    result = run(tmp_path, steps=4)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME, model_config())
    assert ckpt.finished and ckpt.step == 4 and ckpt.losses == result.losses
    assert [tuple(t.shape) for t in ckpt.template] == [(1, 4, 32, 32), (1, 4, 16, 16), (1, 4, 8, 8)]
    # The template is the mean latent of the (unaugmented order of the) training images, in eval mode;
    # the held-out calibration images (10%, at least 4) are not among them.
    held_out = ckpt.calibration["held_out"]
    kept = [i for i in range(8) if i not in held_out]
    assert len(held_out) == 4 and ckpt.calibration["source"] == "held-out"
    model = ckpt.build_model()
    data = RandomImages(augment=False)
    with torch.no_grad():
        latents = model(data.images[kept])
    for level, template in zip(latents, ckpt.template):
        torch.testing.assert_close(level.mean(dim=0, keepdim=True), template, rtol=1e-5, atol=1e-6)
    # Score statistics: image scores are the maxima of the training images' maps.
    maps = anomaly_map(latents, ckpt.template)
    scores = maps.flatten(1).amax(dim=1).double()
    stats = ckpt.score_stats
    assert stats["num_images"] == 4
    assert stats["image_max"] == pytest.approx(float(scores.max()), rel=1e-5)
    assert stats["image_mean"] == pytest.approx(float(scores.mean()), rel=1e-5)
    assert 0 < stats["pixel_quantile"] <= stats["pixel_max"] == pytest.approx(stats["image_max"])


def test_intermediate_checkpoints_and_their_step(tmp_path, monkeypatch):
    written = []
    real_save = checkpoint_module.torch.save
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda obj, f: (written.append(obj["step"]), real_save(obj, f)))
    run(tmp_path, steps=5, checkpoint_every=2)
    assert written == [2, 4, 5]


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def failing_save(obj, handle):
        calls.append(obj["step"])
        if len(calls) == 2:
            handle.write(b"partial bytes")  # a crash half-way through the write
            raise OSError("No space left on device")
        real_save(obj, handle)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path, steps=6, checkpoint_every=2)
    assert calls == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_NAME, LOG_NAME])  # no temp file
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).step == 2


def test_save_checkpoint_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint_atomic({"a": torch.ones(2)}, path)
    save_checkpoint_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_load_checkpoint_errors_name_the_file_and_the_setting(tmp_path):
    run(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_NAME
    with pytest.raises(CheckpointError, match=r"written for another model config: channels=4 \(checkpoint\) vs 8 \(asked\)") as info:
        load_checkpoint(path, model_config(channels=8))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="num_levels=3 \\(checkpoint\\) vs 2"):
        load_checkpoint(path, model_config(num_levels=2))
    load_checkpoint(path, model_config(mode="autograd"))  # the engine's mode does not change weights
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'missing.pt'}"):
        load_checkpoint(tmp_path / "missing.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"cannot read {damaged} .*damaged"):
        load_checkpoint(damaged)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(CheckpointError, match="is not a pyramidflow checkpoint"):
        load_checkpoint(foreign)


# ----------------------------------------------------------------------------------------------------
# NaN and Ctrl-C.


def _loss_that_turns_nan_at(step: int, monkeypatch):
    real = step_module.objective_loss
    calls = []

    def loss(objective, levels, logdet=None, p=2.0):
        calls.append(1)
        value = real(objective, levels, logdet, p)
        return value * float("nan") if len(calls) == step else value

    monkeypatch.setattr(step_module, "objective_loss", loss)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _loss_that_turns_nan_at(5, monkeypatch)
    with pytest.raises(TrainingDivergedError, match=r"the loss became nan at step 5;.* \(step 4\) is kept") as info:
        run(tmp_path, steps=8, checkpoint_every=4, log_every=3)
    assert "\n" not in str(info.value)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt.step == 4 and len(ckpt.losses) == 4
    assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())


def test_nan_between_loss_checks_is_caught_before_a_checkpoint(tmp_path, monkeypatch):
    # log_every is beyond the budget: only the check before writing a checkpoint can see the NaN.
    _loss_that_turns_nan_at(3, monkeypatch)
    with pytest.raises(TrainingDivergedError, match="at step 3"):
        run(tmp_path, steps=8, checkpoint_every=2, log_every=100)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).step == 2


def test_huge_learning_rate_never_saves_nan_weights(tmp_path):
    with pytest.raises(TrainingDivergedError, match="no checkpoint was written|is kept"):
        run(tmp_path, steps=20, lr=1e30, eps=1e-30, grad_clip=None, weight_decay=0.0, checkpoint_every=1)
    path = tmp_path / CHECKPOINT_NAME
    if path.exists():
        ckpt = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())
        assert all(torch.isfinite(torch.tensor(ckpt.losses)))


def test_keyboard_interrupt_writes_the_last_completed_step_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    real = step_module.objective_loss
    calls = []

    def interrupted(objective, levels, logdet=None, p=2.0):
        calls.append(1)
        if len(calls) == 4:  # during step 4, after its batch was drawn and augmented
            raise KeyboardInterrupt
        return real(objective, levels, logdet, p)

    monkeypatch.setattr(step_module, "objective_loss", interrupted)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        run(tmp_path / "cut", steps=6, checkpoint_every=None)
    path = tmp_path / "cut" / CHECKPOINT_NAME
    # said once, by whoever reports the interrupt (the command line prints the note as its one line)
    assert f"checkpoint of step 3 written to {path}" in interrupt.value.__notes__[-1]
    assert "checkpoint of step 3" not in capsys.readouterr().err
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and not ckpt.finished and len(ckpt.losses) == 3
    monkeypatch.setattr(step_module, "objective_loss", real)
    resumed = run(tmp_path / "cut", steps=6, resume=True)
    straight = run(tmp_path / "straight", steps=6)
    assert resumed.losses == straight.losses
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())


# ----------------------------------------------------------------------------------------------------
# Two gloo processes equal one process (NOTE [global batch under DDP], NOTE [volume normalisation
# across ranks]). No augmentation: its draws come from each process's own RNG, so they differ between
# one and two processes by design. float64 so the comparison can be tight: the two runs differ only in the order of
# floating-point sums (gather, all-reduce, DDP averaging), ~1e-16 relative per operation; rtol 1e-9
# leaves room for growth over a few steps yet catches any real difference (a factor 2 in a gradient,
# per-rank VN statistics: both of order 1e-2 or more).

DDP_STEPS = 3


def _recording_clip(store: list, real):
    """A clip_grad_norm_ that first keeps every step's (DDP-averaged) gradients, before clipping."""

    def clip(params, *args, **kwargs):
        params = list(params)
        store.append([p.grad.detach().clone() for p in params])
        return real(params, *args, **kwargs)

    return clip


def _ddp_settings(out_dir):
    return dict(model_config=model_config(), dataset=RandomImages(count=8, augment=False), out_dir=out_dir, progress=False,
                train_config=TrainConfig(steps=DDP_STEPS, batch_size=4, dtype="float64", checkpoint_every=2,
                                         log_every=1, device="cpu"))


def _ddp_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    grads = []
    torch.nn.utils.clip_grad_norm_ = _recording_clip(grads, torch.nn.utils.clip_grad_norm_)  # own process
    result = train(**_ddp_settings(os.path.join(out_dir, "ddp")))
    torch.save({"losses": result.losses, "grads": grads, "state": result.model.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    grads = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", _recording_clip(grads, torch.nn.utils.clip_grad_norm_))
    single = train(**_ddp_settings(tmp_path / "single"))

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted([CHECKPOINT_NAME, LOG_NAME])  # rank 0 wrote them alone
    ckpt = load_checkpoint(tmp_path / "ddp" / CHECKPOINT_NAME)
    assert ckpt.step == DDP_STEPS and ckpt.finished
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(out["losses"]) == DDP_STEPS
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(single.losses), rtol=1e-9, atol=0)
        assert len(out["grads"]) == len(grads) == DDP_STEPS
        for step_grads, reference in zip(out["grads"], grads):
            for grad, expected in zip(step_grads, reference):
                torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-14)
        state = out["state"]
        for key, value in single.model.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-14, msg=key)
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(single.losses), rtol=1e-9, atol=0)


def test_trains_on_the_synthetic_set_through_the_data_package(tmp_path):
    from pyramidflow.data import MVTecDataset, synthetic

    root = synthetic.generate(tmp_path / "data", size=SIZE, categories=("fabric",), num_train=4, num_test=1)
    dataset = MVTecDataset(root, "fabric", split="train", size=SIZE)  # a texture: augmented in training
    assert dataset.augment
    result = train(model_config(), TrainConfig(epochs=2, device="cpu", calibration_fraction=0.0), dataset,
                   tmp_path / "run", progress=False)
    assert result.step == 4 and dataset.augment  # augmentation switched back on after the template pass
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, model_config())
    assert ckpt.finished and ckpt.score_stats["num_images"] == 4
    assert ckpt.calibration["source"] == "training images" and ckpt.calibration["num_images"] == 4
