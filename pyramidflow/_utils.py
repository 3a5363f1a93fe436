"""What every wing shares: the version, which device to run on, and how a file is written.

Every file the project writes goes through :func:`atomic_write` (NOTE [atomic write]).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

__all__ = ["VERSION", "DEVICES", "resolve_device", "atomic_write", "write_text_atomic", "stale_temp_files"]

VERSION = "0.1.0"  # the package version; pyproject.toml reads it from here
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    """The device to run on: ``"auto"`` picks CUDA when present, else the CPU.

    Raises:
        ValueError: an unknown device name.
        RuntimeError: ``"cuda"`` asked for but no CUDA device is usable.
    """
    import torch  # here, not at the top: NOTE [light package import] in pyramidflow/__init__.py

    if device not in DEVICES:
        raise ValueError(f"resolve_device: device must be one of {DEVICES}, got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "resolve_device: device='cuda' was asked for but torch sees no CUDA device "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu' or 'auto'."
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# NOTE [atomic write]
# Every file the project writes (checkpoints, exported graphs, metrics and
# prediction files, pictures, logs it rewrites, ablation tables) goes through
# `atomic_write`: the bytes go to a temporary file in the same folder (same file
# system, so the rename is atomic), are flushed and fsync'ed, then moved over
# the target with `os.replace`. A crash, a full disk or Ctrl-C leaves either the
# old file or the new one, never a truncated one, and no temporary file behind.
# An error while writing names the file it was writing (a full disk otherwise
# says only `[Errno 28]`).
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved over ``path`` when the block succeeds (NOTE [atomic write]).

    The folder of ``path`` is created. On any exception (Ctrl-C included) the temporary file is
    removed, the previous file at ``path``, if any, is left as it was, and the exception goes on.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_write(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('done', ['out.txt'])
    """
    path = Path(path)
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = _temp_affixes(path)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _fsync(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temporary file, not the result
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


# Errors whose way out is room on the disk, not another file.
_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def naming_write_errors(path: Path) -> Iterator[None]:
    """An OSError that names no file, or only the temporary one, is raised again naming ``path``.

    Used by :func:`atomic_write` and by writers that append in place (the training log).

    A full disk fails inside ``write()`` or ``fsync()`` of whatever library writes the bytes, whose
    ``[Errno 28] No space left on device`` says nothing of which file; the error keeps its type and errno.
    """
    try:
        yield
    except OSError as error:
        if _names_another_file(error, path):
            raise
        reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
        fix = "; free space on that disk or write to another folder" if error.errno in _FULL else ""
        try:
            named = type(error)(f"cannot write {path}: {reason}{fix}.")
        except TypeError:  # a subclass whose constructor takes other arguments
            named = OSError(f"cannot write {path}: {reason}{fix}.")
        named.errno = error.errno  # set after: given to the constructor, it would put "[Errno 28]" first
        raise named from error


def _names_another_file(error: OSError, path: Path) -> bool:
    """Whether ``error`` names a file other than the temporary one of ``path`` (it then says where already)."""
    name = error.filename
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False
    return not os.path.basename(os.fsdecode(name)).startswith(_temp_affixes(path)[0])


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_write`; returns ``Path(path)``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _temp_affixes(path: Path) -> tuple[str, str]:
    """Prefix and suffix of the temporary files :func:`atomic_write` makes beside ``path``."""
    return f".{path.name}.", ".tmp"


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of :func:`atomic_write` beside ``path`` (only a killed process leaves them).

    Only names that ``tempfile.mkstemp`` gives with our prefix and suffix (8 random characters) match.
    """
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    return sorted(path.parent.glob(f"{glob.escape(prefix)}{'?' * 8}{suffix}"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
