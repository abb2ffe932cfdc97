"""Crash-safe file writing: temp file in the same folder, fsync, rename.

A kill at any moment leaves either the old file or the new one, never a truncated one, because rename within
one filesystem is atomic and the data is on disk (fsync) before the name points at it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from sdlora.errors import DiskSpaceError

# mkstemp creates files readable by the owner only; finished files get the usual umask-based mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
# Free space left over after a write: a disk filled to the last byte breaks other programs (and the OS) too.
DISK_RESERVE = 64 * 1024 * 1024



def check_free_space(path: str | Path, needed: int) -> None:
    """Raise DiskSpaceError when the disk `path` goes to cannot take `needed` more bytes (plus DISK_RESERVE)."""
    path = Path(path)
    free = shutil.disk_usage(path.parent).free
    if free < needed + DISK_RESERVE:
        raise DiskSpaceError(
            f"{path}: not enough disk space ({_mib(needed)} to write, {_mib(free)} free); free some space or "
            "write elsewhere (train.output_dir); nothing was overwritten"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The caller writes the file at the yielded path with any library (safetensors, PIL, ...). On an exception the
    temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _disk_full_is_clear(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _disk_full_is_clear(path: Path) -> Iterator[None]:
    """A disk that fills up mid-write (other programs write too) becomes a DiskSpaceError naming the file."""
    try:
        yield
    except OSError as e:
        if isinstance(e, DiskSpaceError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskSpaceError(f"{path}: the disk filled up while writing it; free some space and run again "
                             "(the previous file, if any, is untouched)") from None


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path, sum(v.numel() * v.element_size() for v in tensors.values()))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success rename it to `path` (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _disk_full_is_clear(path):
            yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        if path.exists():
            # Move the old folder aside first: a crash now leaves the new one under its temp name and the old
            # one under .old, both complete; resume looks only at complete, correctly named folders.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

