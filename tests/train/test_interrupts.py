"""SIGTERM is handled like Ctrl-C: deferred past a parameter update, a checkpoint of the last completed step
written atomically, exit status 143 with one `error:` line, and `--resume` continuing bit for bit."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from pyramidflow.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pyramidflow.cli import main
from pyramidflow.data import synthetic
from pyramidflow.train.interrupts import InterruptGuard, TrainingTerminated, exit_status, interrupt_for

SIZE = 32
SMALL = ["--channels", "4", "--kernel-size", "3", "--stacks", "2", "--levels", "3", "--size", str(SIZE), "--device", "cpu"]
BUDGET = 100_000  # never reached: the run is stopped by the signal


def test_sigterm_raises_a_keyboard_interrupt_with_its_own_exit_status():
    assert type(interrupt_for(signal.SIGINT)) is KeyboardInterrupt
    terminated = interrupt_for(signal.SIGTERM)
    assert isinstance(terminated, TrainingTerminated) and isinstance(terminated, KeyboardInterrupt)
    assert str(terminated) == "SIGTERM"
    assert exit_status(terminated) == 143 and exit_status(KeyboardInterrupt()) == 130


def test_guard_defers_sigterm_past_the_critical_section_and_restores_the_handler():
    outside = []  # a handler of our own around the guard: a guard that ignored SIGTERM would land here
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: outside.append(signum))
    done = []
    try:
        with pytest.raises(TrainingTerminated):
            with InterruptGuard() as guard:
                with guard.critical():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)  # the handler runs here, inside the section: it must only take note
                    done.append("update finished")
        assert done == ["update finished"] and outside == []
        os.kill(os.getpid(), signal.SIGTERM)  # after the guard: our handler is back
        time.sleep(0.05)
        assert outside == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=3, size=SIZE, categories=["nut"], num_train=6, num_test=1)


@pytest.fixture
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess (OMP_NUM_THREADS=1): same kernels, same bits
    yield
    torch.set_num_threads(threads)


class _StderrReader(threading.Thread):
    """Collects a subprocess's stderr as it comes (the progress bar redraws with carriage returns)."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.chunks = stream, []

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read1(4096), b""):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def steps_done(self) -> int:
        counts = re.findall(rf"(\d+)/{BUDGET}", self.text)
        return int(counts[-1]) if counts else 0


@pytest.mark.slow
def test_sigterm_to_a_training_process_checkpoints_and_resumes_bit_for_bit(data_root, tmp_path, _one_thread):
    run_dir = tmp_path / "stopped"
    command = [sys.executable, "-m", "pyramidflow.cli", "train", "--data", str(data_root), "--category", "nut",
               "--out", str(run_dir), "--steps", str(BUDGET), *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    reader = _StderrReader(process.stderr)
    reader.start()
    deadline = time.monotonic() + 240
    while reader.steps_done() < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, reader.text[-2000:]
    assert reader.steps_done() >= 3, "the run made no progress in 240 s: " + reader.text[-2000:]
    process.send_signal(signal.SIGTERM)
    status = process.wait(timeout=120)
    reader.join(timeout=10)

    path = run_dir / CHECKPOINT_NAME
    lines = [line for line in re.split(r"[\r\n]+", reader.text) if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert status == 143, reader.text[-2000:]
    assert errors == [lines[-1]] and "terminated (SIGTERM)" in errors[0] and "--resume" in errors[0], lines[-3:]
    stopped = load_checkpoint(path)
    assert f"checkpoint of step {stopped.step} written to {path}" in reader.text
    assert stopped.step >= 3 and not stopped.finished and len(stopped.losses) == stopped.step
    assert [p.name for p in run_dir.iterdir()] == [CHECKPOINT_NAME]  # no temporary file left

    total = stopped.step + 2
    train_args = ["train", "--data", str(data_root), "--category", "nut", "--steps", str(total), *SMALL]
    assert main([*train_args, "--out", str(run_dir), "--resume"]) == 0
    assert main([*train_args, "--out", str(tmp_path / "straight")]) == 0
    resumed, straight = load_checkpoint(path), load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    assert resumed.step == straight.step == total and resumed.finished
    assert resumed.losses == straight.losses
    assert resumed.model.keys() == straight.model.keys()
    for key in straight.model:
        assert torch.equal(resumed.model[key], straight.model[key]), key
    for a, b in zip(resumed.template, straight.template):
        assert torch.equal(a, b)


# A training process that stops at the start of one phase of the run, says so, and waits for the signal:
# the signal lands in that phase every time (no race with a timer).
_PAUSED_RUN = """
import sys, time
import pyramidflow.train.loop as train_module
from pyramidflow.cli import main

phase = sys.argv[1]
real = getattr(train_module, phase)

def paused(*args, **kwargs):
    print("PAUSED in " + phase, file=sys.stderr, flush=True)
    time.sleep(120)
    return real(*args, **kwargs)

setattr(train_module, phase, paused)
sys.exit(main(sys.argv[2:]))
"""


def _stop_in_phase(phase: str, train_args: list) -> tuple[int, list]:
    """Run ``train`` in a subprocess, SIGTERM it once it reached ``phase``; exit status and stderr lines."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-c", _PAUSED_RUN, phase, *train_args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    reader = _StderrReader(process.stderr)
    reader.start()
    deadline = time.monotonic() + 240
    while f"PAUSED in {phase}" not in reader.text and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None and f"PAUSED in {phase}" in reader.text, reader.text[-2000:]
    process.send_signal(signal.SIGTERM)
    status = process.wait(timeout=120)
    reader.join(timeout=10)
    return status, [line for line in re.split(r"[\r\n]+", reader.text) if line.strip()]


@pytest.mark.parametrize("phase", ["template_and_score_stats", "decision_thresholds"])
def test_sigterm_in_the_post_training_pass_checkpoints_and_resume_finishes_it(phase, data_root, tmp_path, _one_thread):
    run_dir = tmp_path / "stopped"
    train_args = ["train", "--data", str(data_root), "--category", "nut", "--steps", "3", *SMALL]
    status, lines = _stop_in_phase(phase, [*train_args, "--out", str(run_dir)])
    path = run_dir / CHECKPOINT_NAME
    errors = [line for line in lines if line.startswith("error:")]
    assert status == 143, lines[-5:]
    assert errors == [lines[-1]] and "terminated (SIGTERM)" in errors[0], lines[-3:]
    note = f"train: terminated (SIGTERM); checkpoint of step 3 written to {path}; resume with resume=True (--resume)."
    assert lines[-1] == f"error: {note}" and sum(note in line for line in lines) == 1  # said once
    stopped = load_checkpoint(path)
    assert stopped.step == 3 and not stopped.finished and stopped.template is None
    assert sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_NAME, "train_log.jsonl"]  # no lock, no temp file

    assert main([*train_args, "--out", str(run_dir), "--resume"]) == 0  # no step left: only the pass runs
    assert main([*train_args, "--out", str(tmp_path / "straight")]) == 0
    resumed, straight = load_checkpoint(path), load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    assert resumed.finished and resumed.step == straight.step == 3 and resumed.losses == straight.losses
    for a, b in zip(resumed.template, straight.template):
        assert torch.equal(a, b)
    assert resumed.calibration["image_threshold"] == straight.calibration["image_threshold"]


def test_sigterm_while_the_images_are_decoded_says_nothing_was_written(data_root, tmp_path):
    run_dir = tmp_path / "new"
    status, lines = _stop_in_phase("check_images", ["train", "--data", str(data_root), "--category", "nut",
                                                    "--steps", "3", "--out", str(run_dir), *SMALL])
    assert status == 143, lines[-5:]
    note = "train: terminated (SIGTERM) before the first step; no checkpoint written."
    assert lines[-1] == f"error: {note}" and sum(note in line for line in lines) == 1  # said once
    assert not run_dir.exists()  # the folder it had made was empty: removed
