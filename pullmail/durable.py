"""
Writing files so that a crash never shows half of one: write to a temporary
name, fsync the file, rename into place, fsync the directory (chasquid's
safeio; POSIX rename atomicity).  The functions block: run them off the
reactor; L{DirectorySyncs} does the last step for many writers at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

__all__ = [
    "fsync_directory", "write_atomically", "write_new_file", "replace_file", "DirectorySyncs",
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
        _write_all(fd, [memoryview(chunk) for chunk in chunks if chunk])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


# writev(2) takes at most IOV_MAX (1024 on Linux) buffers at a time.
_IOV_MAX = 1024


def _write_all(fd: int, views: list) -> None:
    """All of C{views} with as few writev(2) calls as the kernel allows."""
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
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


class DirectorySyncs:
    """
    Coalesced directory fsyncs: a caller whose rename is done waits for an
    fsync of the directory that starts after it asked; everyone who asks
    while one is running shares the next.  Concurrent sessions delivering to
    one mailbox thus pay one directory fsync per round, not one each
    (group commit, PERF-NOTES), and each Deferred still fires only once its
    own entry is durable.
    """

    def __init__(self, reactor: IReactorThreads, pool) -> None:
        self._reactor = reactor
        self._pool = pool
        self._running: dict[Path, list[Deferred]] = {}
        self._next: dict[Path, list[Deferred]] = {}

    def sync(self, directory: Path) -> Deferred:
        d = Deferred()
        if directory in self._running:
            self._next.setdefault(directory, []).append(d)
        else:
            self._start(directory, [d])
        return d

    def _start(self, directory: Path, waiters: list[Deferred]) -> None:
        self._running[directory] = waiters
        d = deferToThreadPool(self._reactor, self._pool, fsync_directory, directory)
        d.addBoth(self._done, directory)

    def _done(self, result, directory: Path) -> None:
        for waiter in self._running.pop(directory):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)
        waiting = self._next.pop(directory, None)
        if waiting:
            self._start(directory, waiting)

