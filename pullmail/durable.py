"""
Writing files so that a crash never shows half of one: write to a temporary
name, fsync the file, rename into place, fsync the directory (chasquid's
safeio; POSIX rename atomicity).  Blocking calls: run them off the reactor.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_directory", "write_atomically", "write_new_file"]


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, chunks, mode: int = 0o600) -> None:
    """Create C{path} (which must not exist), write C{chunks}, fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            for chunk in chunks:
                f.write(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace C{path} with C{data}: readers see the old or the new, whole."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    write_new_file(temporary, [data], mode)
    os.replace(temporary, path)
    fsync_directory(path.parent)
