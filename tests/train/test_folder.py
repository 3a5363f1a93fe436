"""The output folder of a run: one run at a time (a dead run's lock never blocks), stale temporary files of a
killed checkpoint write removed (only those), and no empty folder left by a failed run."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pyramidflow.checkpoint as checkpoint_module
from pyramidflow._utils import stale_temp_files
from pyramidflow.checkpoint import CHECKPOINT_NAME, save_checkpoint_atomic
from pyramidflow.cli import main
from pyramidflow.data import synthetic
from pyramidflow.train.folder import LOCK_NAME, RunFolder, RunFolderLockedError
from pyramidflow.train.log import LOG_NAME

from test_train import run

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
SMALL = ["--channels", "4", "--kernel-size", "3", "--stacks", "2", "--levels", "3", "--size", str(SIZE), "--device", "cpu"]
_HOLDER = "import sys, time; from pyramidflow.train.folder import RunFolder; held = RunFolder(sys.argv[1]).__enter__(); " \
          "print('locked', flush=True); time.sleep(120)"


def test_a_held_folder_is_refused_naming_the_holder_and_released_after(tmp_path):
    with RunFolder(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderLockedError, match=rf"another training run \(pid {os.getpid()}\) is writing to "
                                                       rf"{re.escape(str(tmp_path / 'out'))} \(--out\)"):
            RunFolder(tmp_path / "out").__enter__()
    assert list((tmp_path / "out").iterdir()) == []  # the lock file goes with the lock
    with RunFolder(tmp_path / "out"):
        pass


def test_second_train_into_a_busy_folder_fails_and_a_killed_holder_does_not_block(tmp_path, capsys):
    root = synthetic.generate(tmp_path / "data", seed=3, size=SIZE, categories=["nut"], num_train=6, num_test=1)
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        args = ["train", "--data", str(root), "--category", "nut", "--out", str(out), "--steps", "2", *SMALL]
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: train: another training run (pid {holder.pid}) is writing to {out} (--out); wait for "
                       "it to finish, or choose another --out."]
        assert not (out / CHECKPOINT_NAME).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)  # left behind by the killed process
    assert main(args) == 0
    assert (out / CHECKPOINT_NAME).is_file() and not (out / LOCK_NAME).exists()


def test_stale_temp_files_of_our_writers_are_removed_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    ours = [out / f".{CHECKPOINT_NAME}.k3_x9a0q.tmp", out / f".{LOG_NAME}.w81_pz4c.tmp"]
    others = [out / f".{CHECKPOINT_NAME}.keep.tmp", out / "notes.tmp", out / f".{CHECKPOINT_NAME}.k3_x9a0q.tmp.bak",
              out / "readme.txt"]
    for path in ours + others:
        path.write_bytes(b"x" * 1000)
    run(out, steps=2)
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKPOINT_NAME, LOG_NAME] + [p.name for p in others])
    assert f"train: removed 2 temporary file(s) (0.0 MB) left in {out} by an interrupted write." in capsys.readouterr().err


def test_the_checkpoint_writer_names_its_temp_files_as_the_cleaner_finds_them(tmp_path, monkeypatch):
    seen = []

    def replace(src, dst):
        seen.append((Path(src), stale_temp_files(dst)))
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic({"step": 1}, tmp_path / CHECKPOINT_NAME)
    (written, found), = seen
    assert found == [written] and not written.exists()


def test_a_failed_run_removes_only_the_empty_folders_it_made(tmp_path):
    made = tmp_path / "runs" / "nut"
    with pytest.raises(ValueError, match="too few"):
        run(made, dataset=_TwoImages(), steps=1)
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ValueError, match="too few"):
        run(kept, dataset=_TwoImages(), steps=1)
    assert kept.is_dir()


class _TwoImages:
    """Too few images to hold out a calibration split: train fails after it made the folder."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        import torch

        return {"image": torch.zeros(3, SIZE, SIZE)}
