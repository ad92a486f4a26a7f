"""
Writing files so that a crash never shows half of one: write to a temporary
name, fsync the file, rename into place, fsync the directory (chasquid's
safeio; POSIX rename atomicity).  The functions block: run them off the
reactor thread; L{pullmail.storage.fsync_process} does the same steps in a helper process.
"""

from __future__ import annotations

import os
import threading
from itertools import islice
from pathlib import Path

__all__ = [
    "DirectorySyncs", "fsync_directory", "publish_new_file", "remove_files", "replace_file",
    "write_all", "write_atomically", "write_new_file",
]


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
        write_all(fd, chunks)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


# writev(2) takes at most IOV_MAX (1024 on Linux) buffers at a time.
_IOV_MAX = 1024


def write_all(fd: int, chunks) -> None:
    """
    All of C{chunks} (any iterable: taken IOV_MAX at a time, so a
    generator is written as it goes) with as few writev(2) calls as the
    kernel allows.
    """
    chunks = iter(chunks)
    while batch := list(islice(chunks, _IOV_MAX)):
        views = [memoryview(chunk) for chunk in batch if chunk]
        while views:
            written = os.writev(fd, views)
            while written and views:
                if written >= len(views[0]):
                    written -= len(views.pop(0))
                else:
                    views[0] = views[0][written:]
                    written = 0


def replace_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data}, fsynced: readers see the old or the new,
    whole.  The new directory entry is durable only after the directory's
    fsync (L{write_atomically}, or L{DirectorySyncs}).
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    write_new_file(temporary, [data], mode)
    os.replace(temporary, path)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """L{replace_file}, then make the new entry durable."""
    replace_file(path, data, mode)
    fsync_directory(path.parent)


def publish_new_file(temporary: str | Path, final: str | Path, chunks,
                     sync_directory=None, mode: int = 0o600) -> None:
    """
    The whole durable write of a new file: C{chunks} into C{temporary}
    (which must not exist), fsynced, renamed to C{final}, whose directory
    is fsynced (by C{sync_directory}, e.g. a L{DirectorySyncs}).  If that
    last fsync fails, C{final} goes again: a caller that was never told
    "stored" will write it again.
    """
    write_new_file(Path(temporary), chunks, mode)
    os.rename(temporary, final)
    try:
        (sync_directory or fsync_directory)(Path(final).parent)
    except BaseException:
        os.unlink(final)
        raise


def remove_files(*paths: str | Path) -> None:
    """Unlink each of C{paths} that exists."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class DirectorySyncs:
    """
    Group commit of directory fsyncs, for threads: a thread whose rename is
    done returns once an fsync of the folder that began after it asked has
    finished.  Threads that ask while one runs share the next, so twenty
    sessions storing into one mailbox pay one directory fsync per round
    rather than twenty (each is a synchronous disk write, and most of the
    kernel time of a delivery).
    """

    def __init__(self, fsync=fsync_directory) -> None:
        self._fsync = fsync
        self._changed = threading.Condition()
        self._state: dict[Path, _SyncState] = {}

    def __call__(self, directory: Path) -> None:
        with self._changed:
            state = self._state.setdefault(directory, _SyncState())
            state.asked += 1
            ticket = state.asked
            while state.covered < ticket:
                if not state.running:
                    state.running = True
                    covering = state.asked
                    break
                self._changed.wait()
            else:
                return
        synced = False
        try:
            self._fsync(directory)
            synced = True
        finally:
            with self._changed:
                state.running = False
                if synced:
                    state.covered = covering
                self._changed.notify_all()


class _SyncState:
    """Per folder: requests so far, and how many of them a finished fsync covered."""

    __slots__ = ("asked", "covered", "running")

    def __init__(self) -> None:
        self.asked = self.covered = 0
        self.running = False
