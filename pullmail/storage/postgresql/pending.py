# -*- test-case-name: tests.test_pending,tests.test_postgresql -*-
"""
The pending notifications and retrieved-id records in PostgreSQL, shared by
the receiving nodes of a cluster (SPEC 3-5, 11.3): two nodes never both
retrieve the same id.

The index and its counts are L{PendingStore}'s; the rows are the
database's.  A notification that comes due is *taken* by one node until
its lease runs out (its generation goes up by one), and the write that
ends the attempt (retrieved, deferred, dropped) names that generation: a
node whose lease ran out and whose row another node took since cannot
record an outcome over it.  A write that took nothing (a new notification)
goes through only while no other node holds the row.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pullmail.interfaces import IPendingStore
from pullmail.storage.pending import (
    PENDING,
    Notification,
    PendingStore,
    TooManyPending,
    notification_key,
)
from pullmail.storage.postgresql.database import Database
from pullmail.storage.postgresql.outbox import WAKE_CHANNEL

__all__ = ["PostgresPending", "cluster_notifications", "delete_from_cluster", "flush_cluster",
           "hold_in_cluster"]

log = Logger(namespace="pullmail.storage.postgresql")

_COLUMNS = "record::text, generation"
_FREE = "(taken_by IS NULL OR lease_until < %(now)s OR taken_by = %(node)s)"
# Advisory locks (first key) serialising the new notifications of one peer
# across the cluster, so that [limits] pending_per_origin counts them all.
_PEER_LOCK = 0x70656E64


def _due(notification: Notification) -> float | None:
    """When a node should take the row: never while held (``pullmail queue hold``)."""
    if notification.state != PENDING:
        return notification.keep_until
    return None if notification.held else notification.next_attempt


@implementer(IPendingStore)
class PostgresPending(PendingStore):
    shared = True

    def __init__(self, database: Database, node: str, lease: float, clock: IReactorTime,
                 run: Callable | None = None) -> None:
        super().__init__(None)
        self.database = database
        self.node = node
        self.lease = lease
        self.clock = clock
        self._run = run
        self._generation: dict[str, int] = {}
        self._held: set[str] = set()

    def _values(self, **more) -> dict:
        now = self.clock.seconds()
        return {"now": now, "until": now + self.lease, "node": self.node, **more}

    def _call(self, function: Callable, *args, then: Callable) -> Deferred:
        if self._run is None:
            return succeed(then(function(*args)))
        return self._run(function, *args).addCallback(then)

    def _row(self, row) -> Notification:
        record, generation = row
        fresh = Notification.from_json(record.encode("utf-8"))
        known = self._index.get(fresh.key)
        if known is not None:
            fresh.delivering = known.delivering
            known.__dict__.update(fresh.__dict__)
            fresh = known
        self._generation[fresh.key] = generation
        self._remember(fresh)
        return fresh

    def load(self) -> None:
        """Blocking: release what this node held before a restart; index every row."""
        with self.database.transaction() as cursor:
            cursor.execute("UPDATE pending SET taken_by = NULL, lease_until = NULL,"
                           " generation = generation + 1 WHERE taken_by = %(node)s",
                           self._values())
            cursor.execute(f"SELECT {_COLUMNS} FROM pending")
            rows = cursor.fetchall()
        self._index, self._pending_by_peer, self._counted = {}, {}, {}
        self._generation, self._held = {}, set()
        for row in rows:
            notification = self._row(row)
            # A pending one's delivery may have begun, here or on a dead node.
            notification.delivering = notification.state == PENDING

    def save(self, notification: Notification, limit: int | None = None,
             keep_taken: bool = False) -> None:
        """
        Blocking: store the record (committed before it returns) and index
        it; the row is free again afterwards (with C{keep_taken}, a record
        written in the middle of a retrieval, still this node's).  Refused
        (and forgotten here) when another node holds it, or took it since
        this node did.

        With C{limit}, a new row is refused (L{TooManyPending}) when its
        peer has that many pending in the cluster: counted in the insert's
        transaction, under a per-peer lock, so two nodes cannot both pass.
        """
        key = notification.key
        held = key in self._held
        keep = keep_taken and held
        values = self._values(key=key, gdel_id=notification.gdel_id, peer=notification.peer,
                              record=notification.to_json().decode("utf-8"),
                              due=_due(notification),
                              generation=self._generation.get(key, 0))
        condition = ("pending.generation = %(generation)s" if held
                     else _FREE.replace("taken_by", "pending.taken_by")
                     .replace("lease_until", "pending.lease_until"))
        with self.database.transaction() as cursor:
            if limit is not None:
                _check_limit(cursor, values, limit)
            cursor.execute(
                "INSERT INTO pending (key, gdel_id, peer, record, due) VALUES (%(key)s,"
                " %(gdel_id)s, %(peer)s, %(record)s::jsonb, %(due)s) ON CONFLICT (key) DO UPDATE"
                " SET peer = excluded.peer, record = excluded.record, due = excluded.due,"
                " taken_by = CASE WHEN %(keep)s THEN pending.taken_by END, lease_until ="
                f" CASE WHEN %(keep)s THEN pending.lease_until END WHERE {condition}"
                " RETURNING generation", {**values, "keep": keep})
            row = cursor.fetchone()
        if not keep:
            self._held.discard(key)
        if row is None:
            log.warn("notification {id}: another node holds it; leaving it to that node",
                     id=notification.gdel_id)
            self._forget(key)
            return
        self._generation[key] = row[0]
        self._remember(notification)

    def _forget(self, key: str) -> None:
        self._index.pop(key, None)
        self._uncount(key)
        self._generation.pop(key, None)

    def paths_for(self, notification: Notification) -> tuple[str, str]:
        raise NotImplementedError("records are rows: save them with save()")

    def remove(self, notification: Notification) -> None:
        """Blocking: forget the record, unless another node took it since."""
        key = notification.key
        held = key in self._held
        values = self._values(key=key, generation=self._generation.get(key, 0))
        with self.database.transaction() as cursor:
            cursor.execute("DELETE FROM pending WHERE key = %(key)s AND "
                           + ("generation = %(generation)s" if held else _FREE), values)
        self._held.discard(key)
        self._forget(key)

    # -- the asynchronous seam ---------------------------------------------------------

    def find(self, origin: str, gdel_id: str) -> Deferred:
        """The notification of (origin, id) as the cluster has it, or None."""
        key = notification_key(origin, gdel_id)

        def look():
            with self.database.transaction() as cursor:
                cursor.execute(f"SELECT {_COLUMNS} FROM pending WHERE key = %s", (key,))
                return cursor.fetchone()

        return self._call(look, then=lambda row: None if row is None else self._row(row))

    def take(self, key: str) -> Deferred:
        """Take a due notification for one retrieval: as it now is, or None."""
        def take():
            with self.database.transaction() as cursor:
                cursor.execute(
                    "UPDATE pending SET taken_by = %(node)s, lease_until = %(until)s,"
                    f" generation = generation + 1 WHERE key = %(key)s AND {_FREE}"
                    f" RETURNING {_COLUMNS}", self._values(key=key))
                return cursor.fetchone()

        def taken(row):
            if row is None:
                self._forget(key)   # gone, or another node retrieves it
                return None
            self._held.add(key)
            return self._row(row)

        return self._call(take, then=taken)

    def poll(self) -> list:
        """Blocking: renew our leases; the rows due that no node holds."""
        values = self._values()
        with self.database.transaction() as cursor:
            cursor.execute("UPDATE pending SET lease_until = %(until)s"
                           " WHERE taken_by = %(node)s", values)
            cursor.execute(f"SELECT {_COLUMNS} FROM pending WHERE due <= %(now)s"
                           " AND (taken_by IS NULL OR lease_until < %(now)s)", values)
            return cursor.fetchall()

    def polled(self, rows) -> list[Notification]:
        """In the reactor thread: index what L{poll} found."""
        return [self._row(row) for row in rows]


def _check_limit(cursor, values: dict, limit: int) -> None:
    """In a save's transaction: L{TooManyPending} when a new row would pass the limit."""
    cursor.execute("SELECT pg_advisory_xact_lock(%(lock)s, hashtext(%(peer)s))",
                   {**values, "lock": _PEER_LOCK})
    cursor.execute("SELECT EXISTS (SELECT 1 FROM pending WHERE key = %(key)s), (SELECT count(*)"
                   " FROM pending WHERE peer = %(peer)s AND record->>'state' = %(pending)s)",
                   {**values, "pending": str(PENDING)})
    exists, count = cursor.fetchone()
    if not exists and count >= limit:
        raise TooManyPending(values["peer"])


def cluster_notifications(database: Database) -> list[Notification]:
    """Every pending notification of the cluster, for ``pullmail queue`` (blocking)."""
    with database.transaction() as cursor:
        cursor.execute("SELECT record::text FROM pending ORDER BY gdel_id")
        return [Notification.from_json(row[0].encode("utf-8")) for row in cursor.fetchall()]


def delete_from_cluster(database: Database, gdel_id: str, now: float) -> bool:
    with database.transaction() as cursor:
        cursor.execute("DELETE FROM pending WHERE gdel_id = %s AND (taken_by IS NULL OR"
                       " lease_until < %s)", (gdel_id, now))
        return cursor.rowcount > 0


def flush_cluster(database: Database, now: float) -> None:
    with database.transaction() as cursor:
        cursor.execute("UPDATE pending SET due = %(now)s, record = jsonb_set(record,"
                       " '{next_attempt}', to_jsonb(%(now)s::double precision))"
                       " WHERE record->>'state' = %(pending)s", {"now": now, "pending": str(PENDING)})


def hold_in_cluster(database: Database, gdel_id: str, held: bool, now: float) -> bool:
    """
    Hold or release the pending notifications of an id (``pullmail queue
    hold/release``) while no node is retrieving them.  A held row is due
    never, so no node takes it; a released one is due at its next attempt
    again, and the nodes are woken to look.
    """
    with database.transaction() as cursor:
        cursor.execute(
            "UPDATE pending SET record = jsonb_set(record, '{held}', to_jsonb(%(held)s)),"
            " due = CASE WHEN %(held)s THEN NULL ELSE (record->>'next_attempt')::double"
            " precision END, generation = generation + 1 WHERE gdel_id = %(id)s AND"
            " record->>'state' = %(pending)s AND (taken_by IS NULL OR lease_until < %(now)s)",
            {"held": held, "now": now, "id": gdel_id, "pending": str(PENDING)})
        changed = cursor.rowcount > 0
        if changed and not held:
            cursor.execute(f"NOTIFY {WAKE_CHANNEL}")
    return changed
