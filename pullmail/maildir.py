"""
Local delivery into maildirs: ``<state_dir>/mail/<domain>/<localpart>/``.

The message is written once, to ``tmp/`` of the first mailbox, and fsynced;
the other mailboxes get hard links in their ``new/``; finally the first is
renamed into ``new/`` and every touched ``new/`` directory is fsynced.  Only
then does the Deferred fire, and only then does the server say ``250``.
The blocking part runs in the disk threads so the reactor keeps serving
other sessions during the disk wait.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
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


def store(root: Path, name: str, addresses: Sequence[str], chunks: Sequence[bytes],
          known: set[Path] | None = None, syncs: DirectorySyncs | None = None) -> list[Path]:
    """
    Blocking: write one message durably, directory entries included.
    With C{syncs}, concurrent callers share the directory fsyncs.
    """
    paths, directories = place(root, name, addresses, chunks, set() if known is None else known)
    for directory in directories:
        if syncs is None:
            fsync_directory(directory)
        else:
            syncs.sync(directory)
    return paths


@implementer(IDeliveryAgent)
class MaildirDelivery:
    """
    Delivers to maildirs under C{root} off the reactor thread, one job per
    message: C{run_blocking} runs L{store} in the disk threads, where
    concurrent deliveries share their directory fsyncs.
    """

    def __init__(self, root: Path, names: MaildirNames,
                 run_blocking: Callable[..., Deferred]) -> None:
        self.root = root
        self._names = names
        self._run_blocking = run_blocking
        self._known: set[Path] = set()
        self._syncs = DirectorySyncs()

    def deliver(self, queue_id: str, addresses: Sequence[str], chunks: Sequence[bytes]) -> Deferred:
        return self._run_blocking(store, self.root, self._names.next(queue_id), list(addresses),
                                  list(chunks), self._known, self._syncs)
