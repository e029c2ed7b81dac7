"""Writing files so that a crash never leaves a half-written one: write to a temporary name beside the target,
flush and fsync, then rename over it (an atomic step on POSIX filesystems).

    write_atomic(path, "text")            # or bytes
    with atomic_file(path) as f: ...      # stream bytes into f; it replaces ``path`` only if the body finishes
    with atomic_dir(out) as tmp: ...      # fill tmp; it replaces ``out`` only if the body finishes
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def temp_path(path: str | Path, suffix: str = "tmp") -> Path:
    """A unique hidden name beside ``path`` (same directory, so a rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.{suffix}")


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to stream into; on a clean exit it is flushed, fsynced and renamed over ``path`` (then the
    directory is fsynced). On an error the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name: flush, fsync, rename, fsync the directory."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill a temporary directory, then swap it in for ``path`` (the temporary is removed on error; an existing
    ``path`` is replaced only once the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = temp_path(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def dir_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (or become) a directory this process writes into, or None when it can: it is a
    file, a file stands where a parent directory should be, or the nearest existing parent is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is an existing file"
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None
