"""
Local delivery into maildirs: ``<state_dir>/mail/<domain>/<localpart>/``.

The message is written once, to ``tmp/`` of the first mailbox, and fsynced;
the other mailboxes get hard links in their ``new/``; finally the first is
renamed into ``new/`` and every touched ``new/`` directory is fsynced.  Only
then does the Deferred fire, and only then does the server say ``250``.
The waits (the fsyncs) happen in a helper process, so the reactor keeps
serving other sessions meanwhile.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Sequence

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from pullmail.interfaces import DeliveryOutcome, IDeliveryAgent
from pullmail.smtp.loops import delivery_fields
from pullmail.storage.durable import (
    fsync_directory,
    publish_new_file,
    remove_files,
    write_all,
)

__all__ = ["MaildirDelivery", "mailbox_path", "ensure_maildir", "JUNK"]

_SUBDIRECTORIES = ("tmp", "new", "cur")
# SPEC 11.1: the Maildir++ folder of quarantined mail, <mailbox>/.Junk/ (a
# folder is a dot-named maildir inside the mailbox, as Courier and Dovecot
# read it).
JUNK = ".Junk"
_FOLDERS = (None, JUNK)


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


class BlockingFsync:
    """fsync in the calling thread, for tools and tests (the node uses L{FsyncHelper})."""

    inline_limit = 1 << 62

    def fsync(self, fd: int) -> Deferred:
        """fsync C{fd}, then close it."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return succeed(None)

    def fsync_directory(self, directory: str) -> Deferred:
        fsync_directory(directory)
        return succeed(None)

    def store(self, temporary: str, final: str, data: bytes) -> Deferred:
        publish_new_file(temporary, final, [data])
        return succeed(None)


def _write_synced(path: str, chunks: Sequence[bytes], syncer) -> Deferred:
    """Create C{path} (which must not exist), write C{chunks}, have it fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, chunks)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise

    def failed(failure: Failure) -> Failure:
        os.unlink(path)
        return failure

    return maybeDeferred(syncer.fsync, fd).addErrback(failed)


def _store(root: Path, name: str, addresses: Sequence[str], chunks: Sequence[bytes],
           syncer, boxes_made: dict, folder: str | None = None,
           prefixes: Sequence[bytes] | None = None) -> Deferred:
    """
    Write one message into the ``new/`` of every mailbox of C{addresses}:
    once, fsynced, to the first ``tmp/``; hard links (or copies, across
    file systems) for the others; the rename; then the directory fsyncs.
    A small message for one mailbox is all one request to the C{syncer}.
    C{boxes_made} maps the (address, folder) whose maildirs exist to their
    paths; C{folder} is None (the inbox) or L{JUNK}.  C{prefixes}, one per
    address, go before the message in that mailbox only (its
    ``Delivered-To:``): each mailbox then gets its own copy.
    """
    boxes = [boxes_made.get((a, folder)) or _make_box(root, a, boxes_made, folder)
             for a in addresses]
    texts = [[prefix, *chunks] for prefix in prefixes] if prefixes else [list(chunks)]
    if len(boxes) == 1 and sum(map(len, texts[0])) < syncer.inline_limit:
        # Nearly every message: one request, no coroutine around it.
        final = f"{boxes[0]}/new/{name}"
        stored = syncer.store(f"{boxes[0]}/tmp/{name}", final, b"".join(texts[0]))
        return stored.addCallback(lambda _: [Path(final)])
    return Deferred.fromCoroutine(_store_copies(name, boxes, texts, syncer))


async def _store_copies(name: str, boxes: list[str], texts: list[list[bytes]],
                        syncer) -> list[Path]:
    """L{_store} of a large message, or for several mailboxes."""
    first_tmp = f"{boxes[0]}/tmp/{name}"
    await _write_synced(first_tmp, texts[0], syncer)
    written: list[str] = []
    try:
        for index, box in enumerate(boxes[1:], 1):
            target = f"{box}/new/{name}"
            if len(texts) > 1 or not _linked(first_tmp, target):
                await _write_synced(f"{box}/tmp/{name}", texts[index % len(texts)], syncer)
                os.rename(f"{box}/tmp/{name}", target)
            written.append(target)
        os.rename(first_tmp, f"{boxes[0]}/new/{name}")
        written.insert(0, f"{boxes[0]}/new/{name}")
    except BaseException:
        remove_files(*written, first_tmp)
        raise
    try:
        await gatherResults([syncer.fsync_directory(d) for d in {f"{box}/new" for box in boxes}],
                            consumeErrors=True).addErrback(lambda f: f.value.subFailure)
    except BaseException:
        remove_files(*written)    # not acknowledged: the client will send it again
        raise
    return [Path(path) for path in written]


def _linked(source: str, target: str) -> bool:
    """A hard link, or False where none can be made (across file systems)."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _make_box(root: Path, address: str, boxes_made: dict, folder: str | None = None) -> str:
    if folder not in _FOLDERS:
        raise ValueError(f"unknown folder {folder!r}")
    box = mailbox_path(root, address)
    if folder is not None:
        ensure_maildir(box)     # Maildir++: the folder lives inside a maildir
        box = box / folder
    ensure_maildir(box)
    boxes_made[(address, folder)] = str(box)
    return boxes_made[(address, folder)]


def store(root: Path, name: str, addresses: Sequence[str], chunks: Sequence[bytes]) -> list[Path]:
    """Blocking: write one message durably, directory entries included."""
    outcome: list = []
    _store(root, name, addresses, chunks, BlockingFsync(), {}).addBoth(outcome.append)
    [result] = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


@implementer(IDeliveryAgent)
class MaildirDelivery:
    """
    Delivers to maildirs under C{root}: the reactor thread writes the file
    (page-cache speed) and C{syncer} makes it durable out of the way
    (L{pullmail.storage.fsync_helper.FsyncHelper}: no disk threads to share the GIL with).
    """

    def __init__(self, root: Path, names: MaildirNames, syncer) -> None:
        self.root = root
        self._names = names
        self._syncer = syncer
        self._boxes: dict[str, str] = {}

    def deliver(self, queue_id: str, sender: str, addresses: Sequence[str],
                chunks: Sequence[bytes], folder: str | None = None) -> Deferred:
        """
        Every address or none: a maildir refuses nobody, it fails (OSError).
        Each copy starts with ``Return-Path:`` and its ``Delivered-To:``.
        """
        d = maybeDeferred(
            _store, self.root, self._names.next(queue_id), list(addresses), list(chunks),
            self._syncer, self._boxes, folder, [delivery_fields(sender, a) for a in addresses],
        )
        return d.addCallback(
            lambda paths: DeliveryOutcome(delivered=tuple(addresses), paths=tuple(paths))
        )
