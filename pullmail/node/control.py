"""
The operator's control socket: ``<state_dir>/control.sock`` (mode 0600).

``pullmail queue`` sends one JSON request per line and reads one JSON
answer per line.  The running node owns its queues in memory, so listing,
flushing and deleting go through it; with no node running the command
reads and edits the files itself (see L{offline_listing}).
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from pullmail.storage.outbox import NOTIFIED, OutboxEntry
from pullmail.storage.pending import Notification

__all__ = ["ControlFactory", "cluster_queue", "listing", "offline_listing", "offline_delete",
           "SOCKET_NAME"]

log = Logger(namespace="pullmail.node.control")
SOCKET_NAME = "control.sock"


def _entry_row(entry: OutboxEntry, now: float) -> dict:
    return {
        "kind": "outbox" if entry.state == NOTIFIED else "push",
        "id": entry.id, "queue_id": entry.queue_id, "sender": entry.sender,
        "domain": entry.domain,
        "recipients": list(entry.recipients), "age": now - entry.created,
        "state": "claimed" if entry.claimed else entry.state, "attempts": entry.attempts,
        "next": (entry.expires if entry.state == NOTIFIED else entry.next_attempt) - now,
        "last_error": entry.last_error,
    }


def _notification_row(notification: Notification, now: float) -> dict:
    return {
        "kind": "pending", "id": notification.gdel_id, "origin": notification.origin,
        "peer": notification.peer, "sender": notification.sender,
        "recipients": notification.recipients, "age": now - notification.notified_at,
        "state": notification.state, "attempts": notification.attempts,
        "next": (notification.next_attempt if notification.state == "pending"
                 else notification.keep_until) - now,
        "last_error": notification.last_error,
    }


def listing(outbox_entries, notifications, now: float) -> list[dict]:
    return [_entry_row(e, now) for e in outbox_entries] + [
        _notification_row(n, now) for n in notifications
    ]


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            answer = self.factory.handle(request)
        except Exception as e:  # the operator sees the error, the node carries on
            log.failure("control request failed")
            answer = {"ok": False, "error": str(e)}
        self.sendLine(json.dumps(answer).encode("utf-8"))


class ControlFactory(Factory):
    protocol = ControlProtocol

    def __init__(self, outbound, retriever, clock) -> None:
        self.outbound = outbound
        self.retriever = retriever
        self.clock = clock

    def handle(self, request: dict) -> dict:
        command = request.get("command")
        if command == "list":
            rows = listing(self.outbound.outbox.entries(), self.retriever.store,
                           self.clock.seconds())
            return {"ok": True, "rows": rows}
        if command == "flush":
            self.outbound.flush()
            self.retriever.flush()
            log.info("queues flushed by the operator", event="flush")
            return {"ok": True}
        if command == "delete":
            target = str(request.get("id", ""))
            deleted = self.outbound.delete(target) or self.retriever.delete(target)
            log.info("operator deleted {id}: {deleted}", id=target, deleted=deleted,
                     event="delete")
            return {"ok": deleted, "error": "" if deleted else f"no entry {target}"}
        return {"ok": False, "error": f"unknown command {command!r}"}


def offline_listing(state_dir: Path, now: float) -> list[dict]:
    """What is queued, read straight from the files (no node running)."""
    entries = []
    for folder in ("entries", "claimed"):
        for path in sorted((state_dir / "outbox" / folder).glob("*.json")):
            entry = OutboxEntry.from_json(path.read_bytes())
            entry.claimed = folder == "claimed"
            entries.append(entry)
    notifications = [
        Notification.from_json(path.read_bytes())
        for path in sorted((state_dir / "pending").glob("*.json"))
    ]
    return listing(entries, notifications, now)


def offline_delete(state_dir: Path, target: str) -> bool:
    """Remove an outbox entry or a pending notification by id, from the files."""
    from pullmail.ids import is_gdel_id

    if not is_gdel_id(target):
        return False
    removed = False
    for folder in ("entries", "claimed"):
        path = state_dir / "outbox" / folder / f"{target}.json"
        if path.exists():
            path.unlink()
            (state_dir / "outbox" / "data" / f"{target}.eml").unlink(missing_ok=True)
            removed = True
    for path in (state_dir / "pending").glob("*.json"):
        if Notification.from_json(path.read_bytes()).gdel_id == target:
            path.unlink()
            removed = True
    return removed


def cluster_queue(config, args, out, print_rows) -> int:
    """
    ``pullmail queue`` with [store] backend = "postgresql": the cluster's
    queue, read and changed in the database from any node (SPEC 11.3).
    The rows are those L{listing} gives the node's control socket.
    """
    import sys
    import time

    from pullmail.storage.postgresql import outbox, pending
    from pullmail.storage.postgresql.database import Database, StoreUnavailable

    database = Database(config.store.dsn)
    database.open()
    now = time.time()
    try:
        if args.delete:
            if not (outbox.delete_from_cluster(database, args.delete, now)
                    or pending.delete_from_cluster(database, args.delete, now)):
                print(f"pullmail queue: no entry {args.delete} (or a node holds it now)",
                      file=sys.stderr)
                return 1
            print(f"deleted {args.delete}", file=out)
        elif args.flush:
            pending.flush_cluster(database, now)
            outbox.flush_cluster(database, now)   # its NOTIFY wakes the nodes
            print("flushed: every queued entry and pending notification is due now", file=out)
        else:
            rows = listing(outbox.cluster_entries(database),
                           pending.cluster_notifications(database), now)
            if args.json:
                print(json.dumps(rows, indent=1), file=out)
            else:
                print_rows(rows, out)
        return 0
    except StoreUnavailable as e:
        print(f"pullmail queue: {e}", file=sys.stderr)
        return 1
    finally:
        database.close()
