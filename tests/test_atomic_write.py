"""The one atomic writer (NOTE [atomic write] in pyramidflow/_utils.py): a failed write names the file."""

import errno
import os
from pathlib import Path

import pytest
import torch

from pyramidflow._utils import atomic_write, stale_temp_files, write_text_atomic
from pyramidflow.checkpoint import save_checkpoint_atomic


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _check_named(info, target: Path) -> None:
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"cannot write {target}" in message and "No space left on device" in message
    assert "free space" in message and "[Errno" not in message and "\n" not in message
    assert not target.exists() and stale_temp_files(target) == []


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    target = tmp_path / "out" / "metrics.json"
    monkeypatch.setattr(Path, "write_text", _disk_full)
    with pytest.raises(OSError) as info:
        write_text_atomic(target, "{}")
    _check_named(info, target)


def test_a_full_disk_while_saving_a_checkpoint_names_it(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    monkeypatch.setattr(torch, "save", _disk_full)
    with pytest.raises(OSError) as info:
        save_checkpoint_atomic({"step": 1}, target)
    _check_named(info, target)


def test_a_full_disk_at_fsync_names_the_file_not_its_temporary_copy(tmp_path, monkeypatch):
    target = tmp_path / "map.png"

    def full_at_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(next(tmp_path.glob(".map.png.*"))))

    monkeypatch.setattr(os, "fsync", full_at_fsync)
    with pytest.raises(OSError) as info:
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"png")
    _check_named(info, target)


def test_an_error_naming_another_file_is_left_as_it_is(tmp_path):
    source = tmp_path / "missing-source.png"
    with pytest.raises(FileNotFoundError) as info:
        with atomic_write(tmp_path / "copy.png") as tmp:
            tmp.write_bytes(source.read_bytes())
    assert info.value.filename == str(source)


def test_the_command_line_says_which_file_the_full_disk_stopped(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from pyramidflow.cli import main

    monkeypatch.setattr(Image.Image, "save", _disk_full)
    status = main(["synth", "--out", str(tmp_path / "data"), "--size", "32", "--num-train", "1", "--num-test", "1"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"error: cannot write {tmp_path / 'data'}") and ".png: No space left on device" in err


def test_a_full_disk_while_appending_to_the_training_log_names_it(tmp_path, monkeypatch):
    from pyramidflow.train.log import append_log

    target = tmp_path / "train_log.jsonl"
    append_log(target, step=1, loss=0.5)

    class FullFile:
        def __init__(self, *args, **kwargs): pass
        def __enter__(self): return self
        def __exit__(self, *exc): return False
        def write(self, text): _disk_full()

    monkeypatch.setattr("builtins.open", FullFile)
    with pytest.raises(OSError) as info:
        append_log(target, step=2, loss=0.4)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and f"cannot write {target}" in message and "free space" in message
