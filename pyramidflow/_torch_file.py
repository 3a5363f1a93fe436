"""Reading a file ``torch.save`` wrote, with one-line errors: checkpoints and encoder weights use it.

Kept below :mod:`pyramidflow.checkpoint` and :mod:`pyramidflow.model`, which both read such files.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "read_torch_file"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, of another format, or from another config."""


def read_torch_file(path: Path, where: str, fix: str, map_location: str | torch.device = "cpu") -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True`` (opening it never runs code).

    torch's errors for a file it cannot read are long, advise ``weights_only=False`` (which would run the
    file's code) or ask to file an issue; this says in one line what is wrong with the file instead.

    Args:
        path: the file; it must exist.
        where: who reads it, for messages (``"load_checkpoint"``).
        fix: the way out, ending the message (``"use another checkpoint or train again."``).

    Raises:
        CheckpointError: the file is empty, damaged, not a ``torch.save`` file, or holds Python objects
            other than tensors and plain values.
    """
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on such files
        raise CheckpointError(f"{where}: {_what_is_wrong(path, error)}; {fix}") from None


def _what_is_wrong(path: Path, error: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` raised ``error``, in a few words naming the file."""
    with open(path, "rb") as handle:
        start = handle.read(2)
    refused = re.search(r"GLOBAL (\S+)", str(error))
    if isinstance(error, pickle.UnpicklingError) and refused:
        return (f"{path} was not opened: it holds a Python object ({refused.group(1)}) that loading would have to "
                f"run code for, and a checkpoint holds only tensors and plain values")
    if not start:
        return f"cannot read {path} (the file is empty)"
    if start == b"PK" or zipfile.is_zipfile(path):  # torch.save writes a zip archive
        return f"cannot read {path} (damaged: cut short or changed after it was written)"
    if start[:1] == b"\x80":  # a pickle's first opcode, PROTO
        return f"cannot read {path} (a Python pickle, not a torch.save file of tensors and plain values)"
    return f"cannot read {path} (not a torch.save file: damaged, cut short, or another kind of file)"
