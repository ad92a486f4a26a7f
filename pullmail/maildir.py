"""
Local delivery into maildirs: ``<state_dir>/mail/<domain>/<localpart>/``.

The message is written once, to ``tmp/`` of the first mailbox, and fsynced;
the other mailboxes get hard links in their ``new/``; finally the first is
renamed into ``new/`` and every touched ``new/`` directory is fsynced.  Only
then does the Deferred fire, and only then does the server say ``250``.
The blocking part runs in a bounded thread pool so the reactor keeps
serving other sessions during the disk wait.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from pullmail.durable import DirectorySyncs, fsync_directory, write_new_file
from pullmail.interfaces import IDeliveryAgent

__all__ = ["MaildirDelivery", "mailbox_path", "ensure_maildir"]

_SUBDIRECTORIES = ("tmp", "new", "cur")


def mailbox_path(root: Path, address: str) -> Path:
    """The maildir of a normalised local address (checked by accounts)."""
    local, _, domain = address.rpartition("@")
    if not (_safe_component(local) and _safe_component(domain)):
        raise ValueError(f"unsafe mailbox name {address!r}")
    return root / domain / local


def _safe_component(name: str) -> bool:
    """One path component that stays below its parent: not "", ".", ".."."""
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".")


def ensure_maildir(path: Path) -> None:
    for sub in _SUBDIRECTORIES:
        (path / sub).mkdir(parents=True, exist_ok=True)


class MaildirNames:
    """
    Unique file names per the maildir convention: time, a per-process
    counter, the pid and the host.  Time comes from the injected clock.
    """

    def __init__(self, clock: IReactorTime, hostname: str, pid: int) -> None:
        self._clock = clock
        self._host = hostname.replace("/", "\\057").replace(":", "\\072")
        self._pid = pid
        self._counter = itertools.count()

    def next(self, queue_id: str) -> str:
        now = self._clock.seconds()
        return (
            f"{int(now)}.M{int(now % 1 * 1e6)}P{self._pid}Q{next(self._counter)}"
            f"_{queue_id}.{self._host}"
        )


def place(root: Path, name: str, addresses: Sequence[str], chunks: Sequence[bytes],
          known: set[Path]) -> tuple[list[Path], set[Path]]:
    """
    Blocking: write one message (fsynced) into the ``new/`` of every
    mailbox of C{addresses}; return the paths and the directories whose
    entries still need an fsync.  C{known} remembers maildirs made before.
    """
    boxes = [mailbox_path(root, a) for a in addresses]
    for box in boxes:
        if box not in known:
            ensure_maildir(box)
            known.add(box)
    first_tmp = boxes[0] / "tmp" / name
    write_new_file(first_tmp, chunks)
    written = []
    try:
        for box in boxes[1:]:
            target = box / "new" / name
            try:
                os.link(first_tmp, target)
            except OSError:
                write_new_file(box / "tmp" / name, chunks)
                os.rename(box / "tmp" / name, target)
            written.append(target)
        os.rename(first_tmp, boxes[0] / "new" / name)
        written.insert(0, boxes[0] / "new" / name)
    except BaseException:
        for path in written + [first_tmp]:
            path.unlink(missing_ok=True)
        raise
    return written, {path.parent for path in written}


def store(root: Path, name: str, addresses: Sequence[str], chunks: Sequence[bytes]) -> list[Path]:
    """Blocking: write one message durably, directory entries included."""
    paths, directories = place(root, name, addresses, chunks, set())
    for directory in directories:
        fsync_directory(directory)
    return paths


@implementer(IDeliveryAgent)
class MaildirDelivery:
    """
    Delivers to maildirs under C{root}, off the reactor thread: files are
    written and fsynced in parallel in the pool, directory fsyncs are
    coalesced by L{DirectorySyncs}.
    """

    def __init__(self, root: Path, names: MaildirNames, reactor: IReactorThreads, pool) -> None:
        self.root = root
        self._names = names
        self._reactor = reactor
        self._pool = pool
        self._known: set[Path] = set()
        self._directories = DirectorySyncs(reactor, pool)

    def deliver(self, queue_id: str, addresses: Sequence[str], chunks: Sequence[bytes]) -> Deferred:
        name = self._names.next(queue_id)
        d = deferToThreadPool(self._reactor, self._pool, place, self.root, name,
                              list(addresses), list(chunks), self._known)
        return d.addCallback(self._make_durable)

    def _make_durable(self, placed: tuple[list[Path], set[Path]]) -> Deferred:
        paths, directories = placed
        synced = gatherResults(
            [self._directories.sync(directory) for directory in directories],
            consumeErrors=True,
        )
        synced.addErrback(lambda failure: failure.value.subFailure)
        return synced.addCallback(lambda _: paths)
