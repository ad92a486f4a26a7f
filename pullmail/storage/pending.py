"""
Pending notifications at the RMTA (SPEC 3, 5): what was notified, by whom,
and when to try to retrieve it next.

One versioned JSON file per (origin, id) under ``<state_dir>/pending/``,
named by a hash of the two, so that an id never becomes a file name and two
origins cannot collide.  After a successful retrieval the record stays,
marked retrieved, until ``keep_until``: a re-notified id is then fetched
again (so the SMTA can let go of it) but its copy is dropped at delivery.

The mark may be a file of its own, ``<key>.retrieved`` holding
``keep_until``, written without fsync beside the record (L{mark_retrieved}):
a hint, where the delivered copy is the proof (see
L{pullmail.pull.retrieve.Retriever.retrieved}).  A mark that a crash lost
or cut short leaves the record pending; a durable write of the record
removes the mark first, so a mark is never older than its record.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from pullmail.interfaces import IPendingStore
from pullmail.storage import record
from pullmail.storage.durable import write_atomically

__all__ = ["Notification", "NotificationState", "PendingStore", "RecordWrites", "PENDING",
           "RETRIEVED", "TooManyPending", "read_records"]

log = Logger(namespace="pullmail.storage.pending")

RECORD_VERSION = 1
MARK_SUFFIX = ".retrieved"


class NotificationState(StrEnum):
    """The values are what records say on disk, as they always have."""

    PENDING = "pending"        # to retrieve at next_attempt
    RETRIEVED = "retrieved"    # delivered; kept until keep_until to drop duplicates


PENDING = NotificationState.PENDING
RETRIEVED = NotificationState.RETRIEVED


class TooManyPending(Exception):
    """C{[limits] pending_per_origin} reached: the notification is not stored (452 4.3.1)."""


@dataclass
class Notification:
    gdel_id: str
    origin: str              # the trust identity: sender domain or EHLO domain
    peer: str                # the address that notified; retrieval goes there
    helo: str
    sender: str | None       # None for the bare form
    recipients: list[str] | None
    notified_at: float
    attempts: int = 0
    next_attempt: float = 0.0
    state: NotificationState = PENDING
    keep_until: float = 0.0
    last_error: str = ""
    size: int | None = None
    # The notification's DSN parameters (RFC 3461; L{pullmail.smtp.dsn}).
    dsn: dict = field(default_factory=dict)
    held: bool = False       # `pullmail queue hold`: not retrieved until released
    # Notified after EHLO: the SMTA saw our extensions (CHUNKING...) and may
    # use them in its turn (SPEC 4); after HELO it saw none (RFC 5321 2.2.1).
    esmtp: bool = True
    # When a delivery of the retrieved message to a store that cannot be
    # searched (LMTP) began: written durably before it, cleared once its
    # outcome is known.  Still set at a later attempt, the process (or
    # node) died during that delivery: L{pullmail.pull.handover}.
    handed_over: float = 0.0
    # A delivery may have begun (this process began one, or the record was
    # read at start-up): a retry must look in the mailboxes before storing.
    # Known in memory only: L{PendingStore.load} derives it from the state.
    delivering: bool = False
    # Notified again while a retrieval of it was under way (SPEC 4: a
    # re-notified id is retrieved again so that the notifier sees its 250;
    # in a cluster the re-notifier may be another node than the one
    # serving).  In memory only: after a restart every record is retrieved.
    notified_again: bool = False

    def __post_init__(self) -> None:
        self.state = NotificationState(self.state)   # a record's string; ValueError if unknown

    @property
    def queue_id(self) -> str:
        """The queue id of the retrieved message: the same on every retry."""
        return "G" + self.key[:15].upper()

    @cached_property
    def key(self) -> str:
        """Hashed once: origin and id never change (the scheduler asks often)."""
        return notification_key(self.origin, self.gdel_id)

    def to_json(self) -> bytes:
        return record.dump(self, RECORD_VERSION, exclude=("delivering", "notified_again"))

    @classmethod
    def from_json(cls, data: bytes) -> "Notification":
        return record.load(cls, data, RECORD_VERSION)


def read_records(root: Path) -> tuple[list[Notification], list[str]]:
    """
    Blocking: the readable records in C{root}, each with its mark applied,
    and the names of marks whose record is gone.  Changes nothing.
    """
    marks = dict(record.read_folder(root, MARK_SUFFIX))
    notifications = []
    for stem, data in record.read_folder(root):
        try:
            notification = Notification.from_json(data)
        except (ValueError, TypeError, KeyError):
            continue
        keep_until = _keep_until(marks.pop(stem, b""))
        if keep_until is not None and notification.state == PENDING:
            notification.state, notification.keep_until = RETRIEVED, keep_until
        notifications.append(notification)
    return notifications, list(marks)


def _keep_until(mark: bytes) -> float | None:
    """A mark's C{keep_until}; None for one a crash cut short (or none)."""
    try:
        return float(mark.decode("ascii")) if mark else None
    except (UnicodeDecodeError, ValueError):
        return None


def notification_key(origin: str, gdel_id: str) -> str:
    return hashlib.sha256(f"{origin.lower()}\0{gdel_id}".encode()).hexdigest()[:40]


@implementer(IPendingStore)
class PendingStore:
    """The files backend: one record per file, the index in memory."""

    shared = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index: dict[str, Notification] = {}
        self._pending_by_peer: dict[str, int] = {}
        # Which peer each pending record was counted for: records change in
        # place, so their own fields cannot say what was counted.
        self._counted: dict[str, str] = {}
        self._writes = 0

    def load(self) -> None:
        """Blocking: read every record (start-up)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._index, self._pending_by_peer, self._counted = {}, {}, {}
        for path in self.root.glob(".*.tmp"):
            path.unlink(missing_ok=True)     # a write cut short by a crash
        notifications, strays = read_records(self.root)
        for notification in notifications:
            notification.delivering = notification.state == PENDING
            self._remember(notification)
        for stem in strays:                  # their records were removed
            (self.root / f"{stem}{MARK_SUFFIX}").unlink(missing_ok=True)

    def _remember(self, notification: Notification) -> None:
        key = notification.key
        self._uncount(key)
        self._index[key] = notification
        if notification.state == PENDING:
            self._counted[key] = notification.peer
            self._count(notification.peer, +1)

    def _uncount(self, key: str) -> None:
        peer = self._counted.pop(key, None)
        if peer is not None:
            self._count(peer, -1)

    def _count(self, peer: str, change: int) -> None:
        count = self._pending_by_peer.get(peer, 0) + change
        if count > 0:
            self._pending_by_peer[peer] = count
        else:
            self._pending_by_peer.pop(peer, None)

    def get(self, origin: str, gdel_id: str) -> Notification | None:
        return self._index.get(notification_key(origin, gdel_id))

    def by_key(self, key: str) -> Notification | None:
        return self._index.get(key)

    def pending_from(self, peer: str) -> int:
        return self._pending_by_peer.get(peer, 0)

    def __iter__(self) -> Iterator[Notification]:
        return iter(list(self._index.values()))

    def __len__(self) -> int:
        return len(self._index)

    def save(self, notification: Notification, limit: int | None = None,
             keep_taken: bool = False) -> None:
        """Blocking: write the record durably, then index it (nothing is taken here)."""
        if (limit is not None and notification.key not in self._index
                and self.pending_from(notification.peer) >= limit):
            raise TooManyPending(notification.peer)
        self._unmark(notification)
        write_atomically(self.root / f"{notification.key}.json", notification.to_json())
        self._remember(notification)

    def paths_for(self, notification: Notification) -> tuple[str, str]:
        """
        A fresh temporary name and the record's name, for a durable write
        elsewhere, which is to follow at once (the mark goes first).
        """
        self._unmark(notification)
        self._writes += 1
        return (f"{self.root}/.{notification.key}.{os.getpid()}.{self._writes}.tmp",
                f"{self.root}/{notification.key}.json")

    def remember(self, notification: Notification) -> None:
        self._remember(notification)

    def find(self, origin: str, gdel_id: str) -> Deferred:
        return succeed(self.get(origin, gdel_id))

    def take(self, key: str) -> Deferred:
        return succeed(self.by_key(key))

    def mark_retrieved(self, notification: Notification) -> None:
        """
        Blocking but quick, and not durable: the mark beside the record
        (its C{keep_until}), and the index.  The notification must be
        marked RETRIEVED already.
        """
        fd = os.open(self._mark_path(notification), os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, repr(notification.keep_until).encode("ascii"))
        finally:
            os.close(fd)
        self._remember(notification)

    def _mark_path(self, notification: Notification) -> Path:
        return self.root / f"{notification.key}{MARK_SUFFIX}"

    def _unmark(self, notification: Notification) -> None:
        self._mark_path(notification).unlink(missing_ok=True)

    def remove(self, notification: Notification) -> None:
        (self.root / f"{notification.key}.json").unlink(missing_ok=True)
        self._unmark(notification)
        self._index.pop(notification.key, None)
        self._uncount(notification.key)


class RecordWrites:
    """
    Durable writes of notification records for the retriever, in the order
    they were asked for each record: a write can be left to finish after
    the reply it would have delayed (the mark "retrieved", see
    L{pullmail.pull.retrieve}), and a later write of the same record (a
    re-notification) or its removal must not land before it.  With
    C{store_file} (the fsync helper's) the whole write happens outside this
    process; else in a thread, by the store.
    """

    def __init__(self, store, run_blocking: Callable,
                 store_file: Callable[[str, str, bytes], Deferred] | None = None) -> None:
        self.store = store
        self.run_blocking = run_blocking
        self.store_file = store_file
        self._last: dict[str, Deferred] = {}   # key -> fires when its last write is done

    def pending(self, key: str) -> bool:
        return key in self._last

    def save(self, notification: Notification, limit: int | None = None,
             keep_taken: bool = False) -> Deferred:
        """
        Write the record (as it is when its turn comes) after those asked
        before; C{limit} and C{keep_taken} as the store's C{save} takes them.
        """
        return self._after(notification.key,
                           lambda n: self._write(n, limit, keep_taken), notification)

    def remove(self, notification: Notification) -> Deferred:
        """Remove the record once the writes asked before have landed."""
        return self._after(notification.key, self._remove, notification)

    def forget(self, notification: Notification) -> None:
        """L{remove}, its failure logged."""
        self.remove(notification).addErrback(
            lambda f: log.failure("removing notification {id}", f, id=notification.gdel_id))

    def retrieved(self, notification: Notification, searchable: bool) -> Deferred:
        """
        Record a delivered message's notification as retrieved (or pending
        again, when it was notified again meanwhile).

        Where the mailboxes can be C{searchable} for a copy (maildir, the
        files store), "retrieved" is only a hint, not a durable write: the
        message, fsynced under the notification's queue id, proves the
        delivery.  A crash that loses the mark leaves the record pending;
        read at start-up it looks in the mailboxes first and drops the
        copy.  So a retrieved message costs one durable record write, the
        notification's, and nothing waits for the mark.  Pending again, or
        elsewhere, the record is written durably as ever.
        """
        if not (searchable and notification.state == RETRIEVED and not self.store.shared):
            return self.save(notification)
        self.store.remember(notification)
        self._after(notification.key, self._mark, notification).addErrback(
            lambda f: log.failure("marking {id} retrieved", f, id=notification.gdel_id))
        return succeed(None)

    def _after(self, key: str, action: Callable[[Notification], Deferred],
               notification: Notification) -> Deferred:
        before = self._last.get(key)
        done: Deferred = Deferred()
        self._last[key] = done

        def run(_: object) -> Deferred:
            return action(notification)

        def finished(result: object) -> object:
            if self._last.get(key) is done:
                del self._last[key]
            done.callback(None)
            return result

        d: Deferred = succeed(None)
        if before is not None:
            d = Deferred()
            before.addBoth(d.callback)
        return d.addCallback(run).addBoth(finished)

    def _write(self, notification: Notification, limit: int | None = None,
               keep_taken: bool = False) -> Deferred:
        if self.store_file is None:
            return self.run_blocking(self.store.save, notification, limit, keep_taken)
        # The fsync helper's write (the files store only): the limit was
        # checked against the index before, in the reactor thread.
        temporary, final = self.store.paths_for(notification)
        d = self.store_file(temporary, final, notification.to_json())
        return d.addCallback(lambda _: self.store.remember(notification))

    def _remove(self, notification: Notification) -> None:
        self.store.remove(notification)

    def _mark(self, notification: Notification) -> None:
        self.store.mark_retrieved(notification)
