# -*- test-case-name: tests.test_outbox,tests.test_postgresql -*-
"""
The outbox in PostgreSQL, shared by every node of a cluster (SPEC 11.3).

Each node keeps an index of the entries it knows, as the files backend
does, so the delivery glue and its timers work unchanged; the database
decides who does what.  A row is *taken* by one node, for due work (a
push, a notification, an expiry and its bounce) or for a RETR transfer,
until its lease runs out; each taking adds one to the row's generation,
and every write that completes the work names the generation it took
(fencing): a node that comes back after its lease ran out, and whose row
another node has taken since, finds its writes refused, and forgets the
entry.  The node renews the leases of the rows it holds while it lives.

Blocking calls run in the L{Database}'s threads when the outbox has a
runner (the node); without one (tests, the CLI) every call does its I/O
before returning, as L{MaildirOutbox} does.
"""

from __future__ import annotations

from typing import Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pullmail.interfaces import IOutbox
from pullmail.storage.ordered import InOrder
from pullmail.storage.outbox import QUEUED, Indexed, OutboxEntry
from pullmail.storage.postgresql.database import Database, StoreUnavailable

__all__ = ["PostgresOutbox", "WAKE_CHANNEL", "cluster_entries", "delete_from_cluster",
           "flush_cluster", "hold_in_cluster"]

log = Logger(namespace="pullmail.storage.postgresql")

# NOTIFY channel: work became due that any node may take.
WAKE_CHANNEL = "pullmail_wake"

_COLUMNS = "id, record::text, taken, generation"
# A row another node may take: free, or its holder's lease ran out.
_FREE = "(taken IS NULL OR lease_until < %(now)s)"


# A write the database could not take is tried again after this long (in
# order, ahead of the entry's later writes) until it returns.
RETRY_WRITE = 2.0


def _retry_unavailable(failure: Failure) -> float | None:
    return RETRY_WRITE if failure.check(StoreUnavailable) else None


def _entry(row) -> tuple[OutboxEntry, int]:
    entry_id, record, taken, generation = row
    entry = OutboxEntry.from_json(record.encode("utf-8"))
    entry.claimed = taken == "retr"
    return entry, generation


@implementer(IOutbox)
class PostgresOutbox(Indexed):
    shared = True

    def __init__(self, database: Database, node: str, lease: float, clock: IReactorTime,
                 due: Callable[[OutboxEntry], float | None], run: Callable | None = None) -> None:
        """
        @param node: this node's name in the cluster (its hostname); a
            restarted node releases the rows it held.
        @param due: when an entry is next due (L{lifecycle.due_at}), stored
            so that any node can find due work.
        @param run: a runner for blocking calls (L{Database.run}), or None.
        """
        self.database = database
        self.node = node
        self.lease = lease
        self.clock = clock
        self.due = due
        self._run = run
        self._writes = InOrder(run, clock, _retry_unavailable)
        self._index: dict[str, OutboxEntry] = {}
        self._generation: dict[str, int] = {}

    def _now(self) -> dict:
        now = self.clock.seconds()
        return {"now": now, "until": now + self.lease, "node": self.node}

    def _call(self, function: Callable, *args, then: Callable) -> Deferred:
        """Blocking C{function} in a thread (or now), C{then} in the reactor thread."""
        if self._run is None:
            return succeed(then(function(*args)))
        return self._run(function, *args).addCallback(then)

    # -- the index ------------------------------------------------------------------

    def _merge(self, entry: OutboxEntry, generation: int) -> OutboxEntry:
        """Keep one object per entry: lines, timers and RETRs hold it."""
        known = self._index.get(entry.id)
        if known is not None:
            known.take_over(entry)
            entry = known
        self._index[entry.id] = entry
        self._generation[entry.id] = generation
        return entry

    def _forget(self, entry_id: str) -> None:
        self._index.pop(entry_id, None)
        self._generation.pop(entry_id, None)

    # -- start-up ------------------------------------------------------------------

    def load(self) -> list[str]:
        """
        Blocking.  Release the rows this node held before it restarted, and
        those whose holder's lease ran out; index every row.  Returns the
        ids of the RETR claims released (to be announced again, SPEC 4).
        """
        with self.database.transaction() as cursor:
            released = self._release_stale(cursor, mine=True)
            cursor.execute(f"SELECT {_COLUMNS} FROM outbox")
            rows = cursor.fetchall()
        self._index, self._generation = {}, {}
        for row in rows:
            self._merge(*_entry(row))
        return [row[0] for row in released]

    def _release_stale(self, cursor, mine: bool) -> list:
        """The rows of dead holders (and, at a restart, our own) made free;
        returns those that were claimed for a transfer."""
        cursor.execute(
            "WITH stale AS (SELECT id, taken FROM outbox WHERE taken IS NOT NULL"
            " AND (lease_until < %(now)s" + (" OR taken_by = %(node)s" if mine else "")
            + ") FOR UPDATE SKIP LOCKED) UPDATE outbox SET taken = NULL, taken_by = NULL,"
            " lease_until = NULL, generation = outbox.generation + 1 FROM stale"
            " WHERE outbox.id = stale.id RETURNING outbox.id, outbox.record::text,"
            " outbox.taken, outbox.generation, stale.taken",
            self._now(),
        )
        return sorted(row[:4] for row in cursor.fetchall() if row[4] == "retr")

    # -- adding ------------------------------------------------------------------------

    def add(self, entries: Sequence[OutboxEntry], chunks: Sequence[bytes]) -> None:
        """
        Blocking: one transaction for the message and its entries; committed
        before it returns (then the 250).  The rows are free: this node takes
        them when they come due, as any node may.
        """
        with self.database.transaction() as cursor:
            cursor.execute("INSERT INTO messages (body) VALUES (%s) RETURNING id",
                           (b"".join(chunks),))
            message = cursor.fetchone()[0]
            for entry in entries:
                self._insert(cursor, message, entry)
        for entry in entries:
            self._merge(entry, 0)

    def add_sibling(self, existing_id: str, entry: OutboxEntry) -> None:
        """A new entry sharing an existing one's message (blocking, or in order)."""
        self._index[entry.id] = entry
        self._generation[entry.id] = 0
        self._writes.submit(entry.id, self._insert_sibling, existing_id, entry,
                            self.due(entry))

    def _insert_sibling(self, existing_id: str, entry: OutboxEntry, due: float | None) -> None:
        with self.database.transaction() as cursor:
            cursor.execute("SELECT message FROM outbox WHERE id = %s", (existing_id,))
            row = cursor.fetchone()
            if row is not None:
                self._insert(cursor, row[0], entry, due)

    def _insert(self, cursor, message: int, entry: OutboxEntry, due: float | None = None) -> None:
        cursor.execute(
            "INSERT INTO outbox (id, message, record, due) VALUES (%s, %s, %s::jsonb, %s)",
            (entry.id, message, entry.to_json().decode("utf-8"),
             self.due(entry) if due is None else due),
        )

    # -- fenced writes ----------------------------------------------------------------------

    def update(self, entry: OutboxEntry) -> None:
        """
        Store the entry as it is, and give up the row's due work (a claimed
        entry stays claimed): fenced by the generation this node took.
        """
        self._index[entry.id] = entry
        self._fenced(entry.id, "UPDATE outbox SET record = %(record)s::jsonb, due = %(due)s,"
                     " taken = %(taken)s, taken_by = %(by)s, lease_until = %(until)s",
                     record=entry.to_json().decode("utf-8"), due=self.due(entry),
                     taken="retr" if entry.claimed else None,
                     by=self.node if entry.claimed else None,
                     until=self.clock.seconds() + self.lease if entry.claimed else None)

    def release(self, entry_id: str) -> None:
        entry = self._index.get(entry_id)
        if entry is None or not entry.claimed:
            return
        entry.claimed = False
        self._fenced(entry_id, "UPDATE outbox SET taken = NULL, taken_by = NULL,"
                     " lease_until = NULL")

    def remove(self, entry_id: str, after: Deferred | None = None) -> None:
        """
        Forget an entry, and its message once no entry shares it.  With
        C{after} (a bounce being stored), the row goes only once it has
        fired, and stays if it fails (SPEC 7: no loss).
        """
        if self._index.pop(entry_id, None) is None:
            return
        delete = (entry_id, "DELETE FROM outbox")
        if after is None:
            self._fenced(*delete)
            return

        def go(result: object) -> object:
            self._fenced(*delete)
            return result

        def keep(failure: Failure) -> None:
            log.failure("keeping outbox entry {id} until its lease runs out", failure,
                        id=entry_id)

        after.addCallbacks(go, keep)

    def _fenced(self, entry_id: str, statement: str, **values) -> None:
        generation = self._generation.get(entry_id, 0)
        self._writes.submit(entry_id, self._write_fenced, entry_id, generation, statement,
                            values, then=lambda done: self._written(entry_id, generation, done))

    def _write_fenced(self, entry_id: str, generation: int, statement: str,
                      values: dict) -> bool:
        with self.database.transaction() as cursor:
            cursor.execute(statement + " WHERE id = %(id)s AND generation = %(generation)s"
                           " RETURNING message", {**values, "id": entry_id,
                                                  "generation": generation})
            row = cursor.fetchone()
            if row is not None and statement.startswith("DELETE"):
                cursor.execute("DELETE FROM messages WHERE id = %s AND NOT EXISTS"
                               " (SELECT 1 FROM outbox WHERE message = %s)", (row[0], row[0]))
        return row is not None

    def _written(self, entry_id: str, generation: int, done: bool) -> None:
        """
        After a write: a removed entry is forgotten; a write refused means
        another node took the row after our lease ran out.
        """
        if entry_id not in self._index:
            self._generation.pop(entry_id, None)
        if done or self._generation.get(entry_id) not in (generation, None):
            return
        log.warn("outbox entry {id}: another node took it (generation {generation} is"
                 " stale); forgetting it here", id=entry_id, generation=generation)
        self._forget(entry_id)

    def flushed(self, entry_id: str) -> Deferred:
        return self._writes.flushed(entry_id)

    # -- taking rows -----------------------------------------------------------------------

    def claim(self, entry_id: str) -> OutboxEntry | None:
        """Blocking: take the row for a RETR transfer (any node's); None if taken."""
        return self._claimed(self._take(entry_id, "retr", self._generation.get(entry_id)))

    def acquire(self, entry_id: str) -> Deferred:
        return self._after_writes(entry_id, lambda: self._call(
            self._take, entry_id, "retr", self._generation.get(entry_id), then=self._claimed))

    def _claimed(self, row) -> OutboxEntry | None:
        return None if row is None else self._merge(*_entry(row))

    def take(self, entry_id: str) -> Deferred:
        """Take the row for due work: the entry as it now is, or None."""
        return self._after_writes(entry_id, lambda: self._call(
            self._take, entry_id, "work", self._generation.get(entry_id),
            then=lambda row: self._merged(entry_id, row)))

    def _after_writes(self, entry_id: str, take: Callable[[], Deferred]) -> Deferred:
        """
        A take waits for this node's own writes of the row: read before
        them, it would bring back an older record (a broken transfer's
        "notify again" undone) and fence those writes out.
        """
        if entry_id not in self._writes:
            return take()
        return self._writes.flushed(entry_id).addCallback(lambda _: take())

    def _take(self, entry_id: str, kind: str, generation: int | None):
        # A row this node holds for its own due work (its line) may be
        # taken again by it: a RETR of an entry waiting for a session.
        with self.database.transaction() as cursor:
            cursor.execute(
                "UPDATE outbox SET taken = %(kind)s, taken_by = %(node)s,"
                " lease_until = %(until)s, generation = generation + 1"
                f" WHERE id = %(id)s AND ({_FREE} OR (taken = 'work' AND taken_by = %(node)s"
                f" AND generation = %(generation)s)) RETURNING {_COLUMNS}",
                {**self._now(), "kind": kind, "id": entry_id, "generation": generation},
            )
            return cursor.fetchone()

    def _merged(self, entry_id: str, row) -> OutboxEntry | None:
        if row is None:
            known = self._index.get(entry_id)
            if known is not None and not known.claimed and entry_id not in self._writes:
                self._forget(entry_id)   # gone, or another node has it now
            return None
        return self._merge(*_entry(row))

    def find(self, entry_id: str) -> Deferred:
        """Any node's entry, as the database has it (a RETR at any node)."""
        def look(entry_id: str):
            with self.database.transaction() as cursor:
                cursor.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = %s", (entry_id,))
                return cursor.fetchone()

        def merged(row):
            known = self._index.get(entry_id)
            if known is not None and (known.claimed or entry_id in self._writes):
                return known   # ours, and changing: our copy is the newer
            if row is None:
                self._forget(entry_id)   # another node finished it
                return None
            return self._merge(*_entry(row))

        return self._call(look, entry_id, then=merged)

    def read_message(self, entry_id: str) -> bytes:
        with self.database.transaction() as cursor:
            cursor.execute("SELECT body FROM messages JOIN outbox ON outbox.message = messages.id"
                           " WHERE outbox.id = %s", (entry_id,))
            row = cursor.fetchone()
        if row is None:
            raise FileNotFoundError(entry_id)
        return bytes(row[0])

    # -- the cluster: leases, due work of others, wake-ups ------------------------------------

    def poll(self) -> tuple[list, list]:
        """
        Blocking: renew this node's leases; release RETR claims whose lease
        ran out; and return the entries due by now that no node holds (with
        the ids released).  A node that missed a wake-up finds them here.
        """
        values = self._now()
        with self.database.transaction() as cursor:
            cursor.execute("UPDATE outbox SET lease_until = %(until)s"
                           " WHERE taken_by = %(node)s AND taken IS NOT NULL", values)
            released = self._release_stale(cursor, mine=False)
            cursor.execute(f"SELECT {_COLUMNS} FROM outbox WHERE due <= %(now)s AND {_FREE}"
                           " AND taken_by IS DISTINCT FROM %(node)s", values)
            rows = cursor.fetchall()
        return rows, released

    def polled(self, result) -> tuple[list[OutboxEntry], list[OutboxEntry]]:
        """
        In the reactor thread: merge what L{poll} found into the index; the
        entries due, and those whose transfer was released.
        """
        rows, released = result
        entries = [self._merge(*_entry(row)) for row in rows if row[0] not in self._writes]
        return entries, [self._merge(*_entry(row)) for row in released]


def cluster_entries(database: Database) -> list[OutboxEntry]:
    """Every entry of the cluster, for ``pullmail queue`` (blocking)."""
    with database.transaction() as cursor:
        cursor.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id")
        return [_entry(row)[0] for row in cursor.fetchall()]


def flush_cluster(database: Database, now: float) -> int:
    """Make every queued entry due now and wake the nodes; returns how many."""
    with database.transaction() as cursor:
        cursor.execute(
            "UPDATE outbox SET due = %(now)s, record = jsonb_set(record, '{next_attempt}',"
            " to_jsonb(%(now)s::double precision)) WHERE record->>'state' = %(queued)s",
            {"now": now, "queued": str(QUEUED)})
        count = cursor.rowcount
        cursor.execute(f"NOTIFY {WAKE_CHANNEL}")
    return count


def delete_from_cluster(database: Database, entry_id: str, now: float) -> bool:
    """Drop an entry no node holds (``pullmail queue --delete``)."""
    with database.transaction() as cursor:
        cursor.execute(f"DELETE FROM outbox WHERE id = %(id)s AND {_FREE} RETURNING message",
                       {"id": entry_id, "now": now})
        row = cursor.fetchone()
        if row is not None:
            cursor.execute("DELETE FROM messages WHERE id = %s AND NOT EXISTS"
                           " (SELECT 1 FROM outbox WHERE message = %s)", (row[0], row[0]))
    return row is not None


def hold_in_cluster(database: Database, entry_id: str, held: bool, now: float) -> bool:
    """
    Set an entry's C{held} flag (``pullmail queue hold/release``) while no
    node holds its row; a released entry is made due now, and the nodes are
    woken: the node that takes it works out when it is really due.
    """
    with database.transaction() as cursor:
        cursor.execute(
            "UPDATE outbox SET record = jsonb_set(record, '{held}', to_jsonb(%(held)s)),"
            " due = CASE WHEN %(held)s THEN NULL ELSE %(now)s END, generation = generation + 1"
            f" WHERE id = %(id)s AND {_FREE}", {"held": held, "now": now, "id": entry_id})
        changed = cursor.rowcount > 0
        if changed and not held:
            cursor.execute(f"NOTIFY {WAKE_CHANNEL}")
    return changed
