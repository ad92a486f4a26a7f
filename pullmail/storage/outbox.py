"""
The outbox: outbound mail waiting to be pushed, or notified and waiting to
be pulled (SPEC 2, 4, 7).

One entry per (message, recipient domain), named by its General Delivery
id.  On disk, under the outbox folder::

    data/<id>.eml        the message, written once (entries of one message
                         share it through hard links)
    entries/<id>.json    the entry's state, versioned JSON, replaced atomically
    claimed/<id>.json    an entry being retrieved right now
    entries.snapshot     the records as last read, for a quick start-up (a
                         cache, checked against each file; L{snapshot}),
                         written again at start-up and while the node runs
                         once enough entries changed (L{refresh})

A claim is a rename from ``entries/`` to ``claimed/``: of two nodes sharing
the folder, exactly one rename succeeds.  At start-up claimed entries are
released (their retrieval died with the process) and an in-memory index is
built, so a RETR lookup or an expiry pass never walks the folder.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from dataclasses import dataclass, field, fields
from enum import StrEnum
from itertools import compress, islice
from operator import attrgetter, eq
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Sequence

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pullmail import maillog
from pullmail.ids import is_gdel_id
from pullmail.interfaces import IOutbox
from pullmail.storage import record, snapshot
from pullmail.storage.durable import (
    fsync_directory,
    remove_files,
    replace_file,
    write_atomically,
    write_new_file,
)
from pullmail.storage.ordered import InOrder

__all__ = ["EntryState", "OutboxEntry", "Indexed", "MaildirOutbox", "OneNode", "QUEUED", "NOTIFIED",
           "WritesBehind"]

log = Logger(namespace="pullmail.storage.outbox")

RECORD_VERSION = 1
# The index's snapshot in the outbox folder (a cache; L{snapshot}).
SNAPSHOT = "entries.snapshot"
# A snapshot is worth writing again once more than this share of the
# entries would be read from their files (or its rows are of entries gone).
SNAPSHOT_SHARE = 0.1
# How long a write that may wait (L{WritesBehind}) waits.
WRITE_BEHIND = 5.0


def snapshot_worth_writing(changed: int, total: int, share: float = SNAPSHOT_SHARE) -> bool:
    """Whether C{changed} entries of C{total} make a snapshot stale enough to write again."""
    return changed > 0 and changed > total * share


class EntryState(StrEnum):
    """
    Where an entry is in its life (L{pullmail.outbound.lifecycle}).  The
    values are what records say on disk, as they always have.
    """

    QUEUED = "queued"        # an attempt (push or notification) is due at next_attempt
    NOTIFIED = "notified"    # the peer accepted GDEL; waiting for RETR until expires


_STATES = MappingProxyType({state.value: state for state in EntryState})
QUEUED = EntryState.QUEUED
NOTIFIED = EntryState.NOTIFIED


@dataclass(slots=True)
class OutboxEntry:
    id: str
    queue_id: str
    sender: str
    domain: str
    recipients: list[str]
    created: float
    size: int
    state: EntryState = QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    notified_at: float | None = None
    expires: float | None = None
    warned: bool = False
    last_error: str = ""
    body: str | None = None
    smtputf8: bool = False
    origin: str | None = None   # the outside address it was pushed from, if any
    renotify_at: float | None = None  # a notified entry to announce again
    held: bool = False          # `pullmail queue hold`: nothing is sent until released
    # The extensions the RMTA offered when it took the notification: the
    # SMTA uses only these in the reversed turn (SPEC 4; issue 14).
    offers: list[str] = field(default_factory=list)
    # DSN parameters (RFC 3461), as L{pullmail.smtp.dsn} keeps them.
    dsn: dict = field(default_factory=dict)
    claimed: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        try:
            self.state = _STATES[self.state]   # a record's string
        except KeyError:
            raise ValueError(f"unknown entry state {self.state!r}") from None

    def take_over(self, other: "OutboxEntry") -> None:
        """Become C{other}, field by field: lines, timers and RETRs hold this object."""
        for name in self.__slots__:
            setattr(self, name, getattr(other, name))

    def to_json(self) -> bytes:
        return record.dump(self, RECORD_VERSION, exclude=("claimed",))

    @classmethod
    def from_json(cls, data: bytes) -> "OutboxEntry":
        return record.load(cls, data, RECORD_VERSION)


# A snapshot row's values: every field but C{claimed} (the last), in order,
# so that C{OutboxEntry(*values)} builds the entry again.
COLUMNS = tuple(f.name for f in fields(OutboxEntry) if f.name != "claimed")
_values = attrgetter(*COLUMNS)


class Indexed:
    """Reading an outbox's index (C{_index}: id -> entry), which never touches the disk."""

    _index: dict[str, OutboxEntry]

    def get(self, entry_id: str) -> OutboxEntry | None:
        return self._index.get(entry_id)

    def entries(self) -> Iterator[OutboxEntry]:
        return iter(list(self._index.values()))

    def __len__(self) -> int:
        return len(self._index)


class OneNode(Indexed):
    """The asynchronous seam of an outbox no other node shares: the index answers."""

    shared = False
    # While the index is read in the background: who waits for it.
    _loading: list[Deferred] | None = None

    def find(self, entry_id: str) -> Deferred:
        return self._indexed(entry_id, self.get)

    def acquire(self, entry_id: str) -> Deferred:
        return self._indexed(entry_id, self.claim)

    def take(self, entry_id: str) -> Deferred:
        return self._indexed(entry_id, self.get)

    def _indexed(self, entry_id: str, then) -> Deferred:
        """C{then(entry_id)}, once the entry is indexed or the whole index is."""
        if self._loading is None or entry_id in self._index:
            return succeed(then(entry_id))
        waiter: Deferred = Deferred()
        self._loading.append(waiter)
        return waiter.addCallback(lambda _: then(entry_id))


@implementer(IOutbox)
class MaildirOutbox(OneNode):
    """The default outbox: files in one folder, claims by rename."""

    def __init__(self, root: Path, run_blocking=None, background: bool = False) -> None:
        """
        With C{run_blocking} (a pool runner returning Deferreds), state
        changes are written off the reactor thread: the index changes at
        once, the files follow in order per entry (L{flushed} waits for
        them).  Without it every method does its I/O before returning.
        C{background}: L{load} reads the folder in a thread.
        """
        self.root = root
        self._operations = InOrder(run_blocking)
        self._data = root / "data"
        self._entries = root / "entries"
        self._claimed = root / "claimed"
        self._index: dict[str, OutboxEntry] = {}
        self._run_blocking = run_blocking
        self._background = background
        self._gone: set[str] = set()
        self.snapshot_path = root / SNAPSHOT
        # What the snapshot on disk has wrong: the ids changed since its
        # listing, and the rows it had wrong at start-up (L{unsnapshotted}).
        self._changed: set[str] = set()
        self._stale = 0
        self._snapshot_writing: Deferred | None = None

    # -- start-up -----------------------------------------------------------

    def load(self) -> list[str] | Deferred:
        """
        Build the index from disk; release entries left claimed by a dead
        process.  Returns the ids released.  Blocking; call at start-up.

        Records whose files are unchanged since the last snapshot come
        from it, the others from their files (L{snapshot}); if many did,
        a new snapshot is written (in a thread, given C{run_blocking}).

        With C{background} (and C{run_blocking}), the folder is read in a
        thread and a Deferred fires with the ids released once the index
        is in place: the node greets meanwhile.  Until then L{find},
        L{acquire} and L{take} of an id not yet indexed wait for it, so
        that a RETR is never told that a stored entry does not exist.
        """
        self._changed, self._stale = set(), 0
        if not (self._background and self._run_blocking is not None):
            return self._install(read_folder(self.root, self.snapshot_path))
        self._loading, self._gone = [], set()
        d = Deferred.fromCoroutine(self._read_in_slices())
        d.addCallback(self._install)

        def waited(result: object) -> object:
            waiting, self._loading = self._loading, None
            for waiter in waiting or ():
                waiter.callback(None)
            return result

        return d.addBoth(waited)

    async def _read_in_slices(self) -> "Loaded":
        """
        L{read_in_slices}, one slice a job in the disk threads: between
        two, the reactor's thread has the GIL to itself and other disk work
        goes ahead.  The garbage collector is off meanwhile (L{read_folder}).
        """
        loaded = Loaded({}, [])
        slices = read_in_slices(self.root, self.snapshot_path, loaded)
        with collector_off(freeze=True):
            while await self._run_blocking(next, slices, None) is not None:
                pass
        return loaded

    def _install(self, loaded: "Loaded") -> list[str]:
        """The index read takes over (entries added meanwhile stay as they are)."""
        for stem, error in loaded.unreadable:
            # Left in place: a later version may read it (a downgrade).
            maillog.OUTBOX_UNREADABLE(log, id=stem, error=error)
        if loaded.ignored:
            maillog.OUTBOX_SNAPSHOT_IGNORED(log, path=str(self.snapshot_path), reason=loaded.ignored)
        for entry_id in self._gone:     # added and removed while the folder was read
            loaded.index.pop(entry_id, None)
        loaded.index.update(self._index)
        self._index, self._gone = loaded.index, set()
        maillog.OUTBOX_INDEXED(log, folder=str(self.root), reused=loaded.reused, read=loaded.read)
        stale = loaded.stale
        if loaded.rows is None:
            self._stale = stale
        else:
            rows, loaded.rows = loaded.rows, None

            def failed() -> None:     # the old snapshot stays, as wrong as it was
                self._stale += stale

            self._write_snapshot(functools.partial(_write_rows, self.snapshot_path, rows), failed)
        return loaded.released

    # -- the snapshot while running (L{pullmail.storage.refresh}) -------------

    @property
    def loading(self) -> bool:
        """The index is being read in the background."""
        return self._loading is not None

    @property
    def unsnapshotted(self) -> int:
        """How many entries the snapshot on disk has wrong (changed, added or gone since)."""
        return len(self._changed) + self._stale

    @property
    def snapshot_writing(self) -> bool:
        return self._snapshot_writing is not None

    def refresh_snapshot(self) -> Deferred:
        """
        Write the snapshot again from the folder as it is now (in a thread,
        given C{run_blocking}): its rows still right are kept, the files
        changed since are read (L{refreshed_snapshot}).  Changes from now on
        are counted against the new one; if it is not written, against the
        old one still.  Fires when done (never fails: a failure is logged).
        """
        changed, stale = self._changed, self._stale
        self._changed, self._stale = set(), 0

        def failed() -> None:
            self._changed |= changed
            self._stale += stale

        return self._write_snapshot(functools.partial(
            refreshed_snapshot, self.root, self.snapshot_path), failed)

    def _write_snapshot(self, write: Callable[[], int],
                        failed: Callable[[], None] = lambda: None) -> Deferred:
        """Run C{write} (it returns the rows written), one at a time; log how it went."""
        path = str(self.snapshot_path)

        def written(count: int) -> None:
            maillog.OUTBOX_SNAPSHOT_WRITTEN(log, path=path, entries=count)

        def not_written(failure: Failure) -> None:
            failed()
            maillog.OUTBOX_SNAPSHOT_FAILED(log, path=path, error=str(failure.value))

        def done(result: object) -> None:
            self._snapshot_writing = None

        if self._run_blocking is None:
            d = maybeDeferred(write)
        else:
            d = self._run_blocking(write)
        d.addCallbacks(written, not_written).addBoth(done)
        if not d.called:
            self._snapshot_writing = d
        return d

    # -- reading ------------------------------------------------------------

    def message_path(self, entry_id: str) -> Path:
        if not is_gdel_id(entry_id):
            raise ValueError("bad id")
        return self._data / f"{entry_id}.eml"

    def read_message(self, entry_id: str) -> bytes:
        return self.message_path(entry_id).read_bytes()

    # -- writing (blocking: run in a thread) ----------------------------------

    def add(self, entries: Sequence[OutboxEntry], chunks: Sequence[bytes]) -> None:
        """Store one message and its entries durably."""
        first = self.message_path(entries[0].id)
        write_new_file(first, chunks)
        for entry in entries[1:]:
            os.link(first, self.message_path(entry.id))
        fsync_directory(self._data)
        for entry in entries:
            self._write(entry)
        for entry in entries:
            self._index[entry.id] = entry
            self._changed.add(entry.id)

    def add_sibling(self, existing_id: str, entry: OutboxEntry) -> None:
        """A new entry for some recipients of an existing one's message."""
        os.link(self.message_path(existing_id), self.message_path(entry.id))
        fsync_directory(self._data)
        self._write(entry)
        self._index[entry.id] = entry
        self._changed.add(entry.id)

    def update(self, entry: OutboxEntry) -> None:
        """
        Persist a changed entry (claimed or not).  The record is replaced
        whole and fsynced; its directory is not: losing the rename in a
        crash brings back the previous state, which every transition of an
        entry tolerates (a notification is sent again, and deduplicated).
        """
        self._index[entry.id] = entry
        self._changed.add(entry.id)
        folder = self._claimed if entry.claimed else self._entries
        self._in_order(entry.id, replace_file, folder / f"{entry.id}.json", entry.to_json())

    def _write(self, entry: OutboxEntry) -> None:
        folder = self._claimed if entry.claimed else self._entries
        write_atomically(folder / f"{entry.id}.json", entry.to_json())

    def _in_order(self, entry_id: str, function, *args) -> None:
        self._operations.submit(entry_id, function, *args)

    def flushed(self, entry_id: str) -> Deferred:
        """Fires once every disk operation queued for the entry is done."""
        return self._operations.flushed(entry_id)

    # -- claims (a rename each; cheap enough for the reactor thread) ---------

    def claim(self, entry_id: str) -> OutboxEntry | None:
        """
        Take the entry for one retrieval; None if someone else has it.  Wait
        for L{flushed} first: the rename must find the entry's latest file.
        """
        entry = self._index.get(entry_id)
        if entry is None or entry.claimed or entry_id in self._operations:
            return None
        try:
            os.rename(self._entries / f"{entry_id}.json", self._claimed / f"{entry_id}.json")
        except FileNotFoundError:
            return None
        entry.claimed = True
        self._changed.add(entry_id)     # a rename: its file's ctime changed
        return entry

    def release(self, entry_id: str) -> None:
        entry = self._index.get(entry_id)
        if entry is None or not entry.claimed:
            return
        entry.claimed = False
        self._changed.add(entry_id)
        self._in_order(entry_id, os.rename, self._claimed / f"{entry_id}.json",
                       self._entries / f"{entry_id}.json")

    def remove(self, entry_id: str, after: Deferred | None = None) -> None:
        """
        Forget an entry: delivered, bounced or expired.  With C{after} (a
        bounce being stored), the files go only once it has fired, and stay
        if it fails: a crash or a failed bounce then brings the entry back
        at the next start, to be bounced again, rather than losing both.
        """
        entry = self._index.pop(entry_id, None)
        if entry is None:
            return
        self._changed.add(entry_id)
        if self._loading is not None:
            self._gone.add(entry_id)
        folder = self._claimed if entry.claimed else self._entries
        paths = (folder / f"{entry_id}.json", self.message_path(entry_id))
        if after is None:
            self._in_order(entry_id, remove_files, *paths)
            return

        def delete(result: object) -> object:
            self._in_order(entry_id, remove_files, *paths)
            return result

        def keep(failure: Failure) -> None:
            log.failure("keeping outbox entry {id} until the next start", failure, id=entry_id)

        after.addCallbacks(delete, keep)


class WritesBehind:
    """
    Writes of entries that may wait (L{pullmail.outbound.lifecycle.Update}
    C{may_wait}): "notified", over a record that says "queued".  Most
    notified entries are retrieved (claimed, then removed) within
    milliseconds, so their write would only be replaced or unlinked at
    once: it waits C{delay} seconds, and is left out for an entry claimed
    or gone by then.  A claimed entry's outcome is written as ever (a
    broken or partial transfer stores the whole entry).  Until then a crash
    brings the entry back queued: it is notified again, and the receiver
    retrieves it once (SPEC 4).  Nothing is lost meanwhile: the queued
    record is durable, and the entry's expiry is counted from C{created}.
    """

    def __init__(self, outbox, clock, delay: float = WRITE_BEHIND) -> None:
        self.outbox = outbox
        self.clock = clock
        self.delay = delay
        self._waiting: dict[str, tuple[float, OutboxEntry]] = {}   # in the order added
        self._timer = None

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._waiting

    def add(self, entry: OutboxEntry) -> None:
        """Write C{entry} as it is then, in C{delay} seconds, if it still needs it."""
        self._waiting.pop(entry.id, None)
        self._waiting[entry.id] = (self.clock.seconds() + self.delay, entry)
        if self._timer is None:
            self._timer = self.clock.callLater(self.delay, self._due)

    def discard(self, entry_id: str) -> None:
        """A write of the entry follows now (it supersedes this one)."""
        self._waiting.pop(entry_id, None)

    def _due(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._waiting:
            entry_id, (due, _) = next(iter(self._waiting.items()))
            if due > now:
                self._timer = self.clock.callLater(due - now, self._due)
                return
            self._write(self._waiting.pop(entry_id)[1])

    def _write(self, entry: OutboxEntry) -> None:
        if self.outbox.get(entry.id) is entry and not entry.claimed:
            self.outbox.update(entry)

    def flush(self) -> None:
        """Write all that wait now (the node stops)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting, self._waiting = self._waiting, {}
        for _, entry in waiting.values():
            self._write(entry)


# -- reading the folder (blocking; no state shared with the reactor) ------------------------


@dataclass
class Loaded:
    """What L{read_folder} found, for L{MaildirOutbox} to take over."""

    index: dict[str, OutboxEntry]
    released: list[str]
    reused: int = 0                 # entries taken from the snapshot
    read: int = 0                   # record files read
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    ignored: str = ""               # why a snapshot there was not used
    rows: list | None = None        # a new snapshot's rows, when one is worth writing
    stale: int = 0                  # the entries the snapshot found has wrong


def read_folder(root: Path, snapshot_path: Path, freeze: bool = False) -> Loaded:
    """
    L{read_in_slices}, all at once.  The cyclic garbage collector is off
    meanwhile: a million new entries would set off full collections, each
    walking the whole heap with the GIL held (a stall of the reactor, when
    this runs in a thread).  With C{freeze} (the node's start-up), what was
    read is then frozen out of the collector's sight (as
    L{pullmail.node.tap.freeze_start_up_heap} does), else the first
    collection after would walk all of it at once.
    """
    loaded = Loaded({}, [])
    with collector_off(freeze):
        for _ in read_in_slices(root, snapshot_path, loaded):
            pass
    return loaded


@contextlib.contextmanager
def collector_off(freeze: bool = False) -> Iterator[None]:
    """The cyclic garbage collector off, then (C{freeze}) what is left frozen; see L{read_folder}."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
        if freeze:
            gc.freeze()
    finally:
        if collecting:
            gc.enable()


def read_in_slices(root: Path, snapshot_path: Path, loaded: Loaded) -> Iterator[int]:
    """
    Release entries left claimed, then read the index into C{loaded}: from
    the snapshot where a file is the one it read, else from the file.  The
    listing is taken before any record is read, so a row's identity is
    never newer than its values (a file replaced meanwhile is read again
    next time).

    Blocking, in slices of at most L{snapshot.SLICE} files, rows or
    entries, each yielding how many it took: run one slice a job (in a
    thread), the reactor's thread never waits long for the GIL, and the
    disk threads serve other work between slices (issue 17: a million
    entries stalled the reactor up to half a second at a time).
    """
    data, entries, claimed = root / "data", root / "entries", root / "claimed"
    for folder in (data, entries, claimed, root / "tmp"):
        folder.mkdir(parents=True, exist_ok=True)
    for path in claimed.iterdir():
        if path.suffix == ".json" and is_gdel_id(path.stem):
            os.rename(path, entries / path.name)
            loaded.released.append(path.stem)
    snapshot.remove_leftovers(snapshot_path)
    listing: dict[str, snapshot.Identity] = {}
    yield from _listing_in_slices(root, listing)
    rows = yield from _from_snapshot(snapshot_path, listing, loaded)
    index = loaded.index
    loaded.reused = len(index)
    # The listing is in inode order: so are the files read.
    names = [f"{stem}.json" for stem in listing if stem not in index and is_gdel_id(stem)]
    loaded.read = len(names)
    for start in range(0, len(names), snapshot.SLICE):
        taken = names[start:start + snapshot.SLICE]
        for entry in _records(entries, taken, loaded.unreadable):
            index[entry.id] = entry
        yield len(taken)
    yield from freed(names)
    loaded.stale = loaded.read + (rows - loaded.reused if rows >= 0 else 0)
    if snapshot_worth_writing(loaded.stale, len(index)) and (index or rows > 0):
        loaded.rows = []
        items = iter(index.items())
        while taken := list(islice(items, snapshot.SLICE)):
            loaded.rows += [(stem, listing[stem], _values(entry)) for stem, entry in taken]
            yield len(taken)
    yield from freed(listing)


def freed(big: list | dict | set) -> Iterator[int]:
    """
    Empty C{big} a slice at a time, each yielding how many went: a million
    entries freed at once (the last reference dropped) hold the GIL for
    about a tenth of a second.
    """
    while big:
        count = min(snapshot.SLICE, len(big))
        if isinstance(big, list):
            del big[-count:]
        else:
            drop = big.popitem if isinstance(big, dict) else big.pop
            for _ in range(count):
                drop()
        yield count


def _listing_in_slices(root: Path, listing: dict[str, snapshot.Identity]) -> Iterator[int]:
    """
    Fill C{listing} with the identity of each entry's record file, in
    slices; an entry whose message is gone is none.
    """
    yield from snapshot.list_folder_in_slices(root / "entries", listing)
    messages: set[str] = set()
    with os.scandir(root / "data") as found:
        while taken := list(islice(found, snapshot.SLICE)):
            messages.update(item.name[:-4] for item in taken if item.name.endswith(".eml"))
            yield len(taken)
    stems = list(listing)
    for start in range(0, len(stems), snapshot.SLICE):
        taken = stems[start:start + snapshot.SLICE]
        for stem in taken:
            if stem not in messages:
                del listing[stem]
        yield len(taken)
    yield from freed(messages)
    yield from freed(stems)


def _listing(root: Path) -> dict[str, snapshot.Identity]:
    """L{_listing_in_slices}, all at once."""
    listing: dict[str, snapshot.Identity] = {}
    for _ in _listing_in_slices(root, listing):
        pass
    return listing


def _records(entries: Path, names: list[str],
             unreadable: list[tuple[str, str]]) -> Iterator[OutboxEntry]:
    """The entries in the record files C{names}; those that cannot be read go to C{unreadable}."""
    for name, record_data in record.read_files(entries, names):
        stem = name[:-5]
        try:
            entry = OutboxEntry.from_json(record_data)
        except (ValueError, TypeError) as e:
            unreadable.append((stem, str(e)))
            continue
        if entry.id == stem:
            yield entry


def _write_rows(path: Path, rows: list) -> int:
    """Write the snapshot of C{rows}, then free them a slice at a time (in the thread)."""
    try:
        return snapshot.write_snapshot(path, COLUMNS, rows)
    finally:
        for _ in freed(rows):
            pass


def refreshed_snapshot(root: Path, snapshot_path: Path) -> int:
    """
    Blocking (a thread, while the node runs): write the snapshot again, its
    rows whose files are unchanged kept, the files changed since read.  The
    listing is taken first, so no row's identity is newer than its values;
    nothing of the node's index is touched (its objects change meanwhile).
    Returns the rows written.  The old snapshot stays whole until the new
    one is renamed over it (L{snapshot.write_snapshot}).
    """
    listing = _listing(root)
    return snapshot.write_snapshot(snapshot_path, COLUMNS,
                                   _fresh_rows(snapshot_path, listing, root / "entries"))


def _fresh_rows(path: Path, listing: dict[str, snapshot.Identity], entries: Path) -> Iterator:
    """The rows of a new snapshot: the old one's still right, then the files read."""
    try:
        for names, *columns in snapshot.read_snapshot(path, COLUMNS):
            for name, ident, values in zip(names, zip(*columns[:4]), zip(*columns[4:])):
                if listing.get(name) == ident and values[0] == name:
                    del listing[name]       # what is left is read from its file
                    yield name, ident, values
    except (snapshot.SnapshotUnusable, ValueError, TypeError, OSError):
        pass    # what it did not give is read from the files
    names = [f"{stem}.json" for stem in listing if is_gdel_id(stem)]   # in inode order
    for entry in _records(entries, names, []):
        yield entry.id, listing[entry.id], _values(entry)


def _from_snapshot(path: Path, listing: dict[str, snapshot.Identity],
                   loaded: Loaded) -> Iterator[int]:
    """
    Index the entries of the snapshot whose files are the ones it read, a
    chunk a slice; returns the number of rows it has (-1: no usable
    snapshot, and nothing indexed).
    """
    index: dict[str, OutboxEntry] = {}
    rows = 0
    try:
        chunks = snapshot.read_snapshot(path, COLUMNS)
        yield 1                                       # the whole file checked
        for names, *columns in chunks:
            rows += len(names)
            unchanged = list(map(eq, map(listing.get, names), zip(*columns[:4])))
            values = columns[4:]
            if not all(unchanged):
                names = list(compress(names, unchanged))
                values = [list(compress(column, unchanged)) for column in values]
            if names != values[0]:
                raise ValueError("snapshot rows for other entries than their names")
            # keyed by the entry's own id: one string object for both
            index.update(zip(values[0], map(OutboxEntry, *values)))
            yield len(unchanged)
    except snapshot.SnapshotUnusable as e:
        if str(e) != "none":
            loaded.ignored = str(e)
        return -1
    except (ValueError, TypeError, OSError) as e:
        loaded.ignored = repr(e)
        return -1
    loaded.index = index
    return rows
