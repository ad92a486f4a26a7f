"""
The operator's control socket: ``<state_dir>/control.sock`` (mode 0600).

``pullmail queue`` sends one JSON request per line and reads one JSON
answer per line.  The running node owns its queues in memory, so listing,
flushing and deleting go through it; with no node running the command
reads and edits the files itself (see L{offline_listing}).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from pullmail import maillog
from pullmail.ids import is_gdel_id
from pullmail.storage.durable import write_atomically
from pullmail.storage.outbox import NOTIFIED, OutboxEntry
from pullmail.storage.pending import PENDING, Notification, read_records

__all__ = ["ControlFactory", "LOCAL_QUEUE", "cluster_control", "listing", "local_rows",
           "offline_listing", "offline_local_queue", "offline_delete", "offline_set_held",
           "set_held", "SOCKET_NAME"]

log = Logger(namespace="pullmail.node.control")
SOCKET_NAME = "control.sock"
# The LMTP local queue's folder under state_dir (L{pullmail.outbound.local}).
LOCAL_QUEUE = "local-queue"


def _entry_row(entry: OutboxEntry, now: float, kind: str | None = None) -> dict:
    return {
        "kind": kind or ("outbox" if entry.state == NOTIFIED else "push"),
        "id": entry.id, "queue_id": entry.queue_id, "sender": entry.sender,
        "domain": entry.domain,
        "recipients": list(entry.recipients), "age": now - entry.created,
        "held": entry.held,
        "state": "claimed" if entry.claimed else entry.state, "attempts": entry.attempts,
        "next": (entry.expires if entry.state == NOTIFIED else entry.next_attempt) - now,
        "last_error": entry.last_error,
    }


def _notification_row(notification: Notification, now: float) -> dict:
    return {
        "kind": "pending", "id": notification.gdel_id, "origin": notification.origin,
        "peer": notification.peer, "sender": notification.sender,
        "recipients": notification.recipients, "age": now - notification.notified_at,
        "domain": _domain_of(notification.recipients), "held": notification.held,
        "state": notification.state, "attempts": notification.attempts,
        "next": (notification.next_attempt if notification.state == "pending"
                 else notification.keep_until) - now,
        "last_error": notification.last_error,
    }


def _domain_of(recipients: list[str] | None) -> str | None:
    """The destination domain of a notification: its recipients' (None: bare GDEL)."""
    return recipients[0].rpartition("@")[2].lower() if recipients else None


def listing(outbox_entries, notifications, now: float, local=()) -> list[dict]:
    """The rows of the outbox, the pending notifications and the LMTP local queue."""
    return [_entry_row(e, now) for e in outbox_entries] + [
        _notification_row(n, now) for n in notifications
    ] + local_rows(local, now)


def local_rows(entries, now: float) -> list[dict]:
    """The local queue (L{pullmail.outbound.local}): recipients an LMTP store deferred."""
    return [_entry_row(e, now, "local") for e in entries]


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

    def __init__(self, outbound, retriever, clock, maildrop=None, local_queue=None) -> None:
        self.outbound = outbound
        self.retriever = retriever
        self.clock = clock
        self.maildrop = maildrop
        self.local_queue = local_queue

    def handle(self, request: dict) -> dict:
        """
        One request.  With C{"queue": "local"} a list, flush or delete
        concerns the local queue only (a cluster's ``pullmail queue`` asks
        the database for the rest).
        """
        command = request.get("command")
        local = self.local_queue
        only_local = request.get("queue") == "local"
        if command == "list":
            now = self.clock.seconds()
            rows = local_rows(local.entries() if local else (), now)
            if not only_local:
                rows = listing(self.outbound.outbox.entries(), self.retriever.store, now) + rows
            return {"ok": True, "rows": rows}
        if command == "flush":
            if not only_local:
                self.outbound.flush()
                self.retriever.flush()
            if local is not None:
                local.flush()
            maillog.OPERATOR_FLUSH(log)
            return {"ok": True}
        if command == "delete":
            target = str(request.get("id", ""))
            deleted = (not only_local and (self.outbound.delete(target)
                                           or self.retriever.delete(target))
                       or local is not None and local.delete(target))
            maillog.OPERATOR_DELETE(log, id=target, deleted=deleted)
            return {"ok": deleted, "error": "" if deleted else f"no entry {target}"}
        if command in ("hold", "release"):
            target = str(request.get("id", ""))
            changed = set_held(self.outbound, self.retriever, target, command == "hold")
            maillog.OPERATOR_HOLD(log, command=command, id=target, changed=changed)
            return {"ok": changed, "error": "" if changed else f"no entry {target}"}
        if command == "maildrop" and self.maildrop is not None:
            self.maildrop.drain()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {command!r}"}


def set_held(outbound, retriever, target: str, held: bool) -> bool:
    """
    Hold or release an outbox entry or the notifications of an id.  A
    released one joins its line again (held ones were skipped there).
    """
    found = []
    entry = outbound.outbox.get(target)
    if entry is not None and not entry.claimed:
        found.append((entry, outbound.outbox.update, outbound))
    found += [(n, retriever.store.save, retriever) for n in retriever.store
              if n.gdel_id == target and n.state == PENDING]
    for record, persist, owner in found:
        record.held = held
        persist(record)
        if not held:
            owner._push(record)
            owner._arm()
    return bool(found)


def offline_set_held(state_dir: Path, target: str, held: bool) -> bool:
    """L{set_held} on the files, with no node running."""
    found = []
    if is_gdel_id(target):
        found += [(path, OutboxEntry) for folder in ("entries", "claimed")
                  if (path := state_dir / "outbox" / folder / f"{target}.json").exists()]
    found += [(path, Notification) for path in (state_dir / "pending").glob("*.json")]
    changed = False
    for path, kind in found:
        record = kind.from_json(path.read_bytes())
        if kind is Notification and (record.gdel_id != target or record.state != PENDING):
            continue
        record.held = held
        write_atomically(path, record.to_json())
        changed = True
    return changed


def _folder_entries(root: Path) -> list[OutboxEntry]:
    """The entries of an outbox folder (L{MaildirOutbox}'s layout), read from the files."""
    entries = []
    for folder in ("entries", "claimed"):
        for path in sorted((root / folder).glob("*.json")):
            entry = OutboxEntry.from_json(path.read_bytes())
            entry.claimed = folder == "claimed"
            entries.append(entry)
    return entries


def offline_listing(state_dir: Path, now: float) -> list[dict]:
    """What is queued, read straight from the files (no node running)."""
    pending = state_dir / "pending"
    # With their marks "retrieved" (the files store's hints) applied.
    notifications = read_records(pending)[0] if pending.is_dir() else []
    return listing(_folder_entries(state_dir / "outbox"), notifications, now,
                   offline_local_queue(state_dir))


def offline_local_queue(state_dir: Path) -> list[OutboxEntry]:
    """The local queue's entries, from its files (the node's own, in a cluster too)."""
    return _folder_entries(state_dir / LOCAL_QUEUE)


def offline_delete(state_dir: Path, target: str, outbox: bool = True) -> bool:
    """
    Remove an outbox or local-queue entry or a pending notification by id,
    from the files (C{outbox} False: the local queue only).
    """
    if not is_gdel_id(target):
        return False
    removed = False
    for root in ((state_dir / "outbox", state_dir / LOCAL_QUEUE) if outbox
                 else (state_dir / LOCAL_QUEUE,)):
        for folder in ("entries", "claimed"):
            path = root / folder / f"{target}.json"
            if path.exists():
                path.unlink()
                (root / "data" / f"{target}.eml").unlink(missing_ok=True)
                removed = True
    if not outbox:
        return removed
    for path in (state_dir / "pending").glob("*.json"):
        if Notification.from_json(path.read_bytes()).gdel_id == target:
            path.unlink()
            removed = True
    return removed


def cluster_control(config, node=lambda request: None):
    """
    With [store] backend = "postgresql", the control requests of
    ``pullmail queue`` answered from the shared database, from any node,
    running or not (SPEC 11.3): a function of the same shape as asking a
    node's control socket.  This node's local queue (files of its own) is
    added: through C{node} (its control socket) when it runs, else from
    the files.
    """
    from pullmail.storage.postgresql import outbox, pending
    from pullmail.storage.postgresql.database import Database, StoreUnavailable

    def ask(request: dict) -> dict:
        command, target = request.get("command"), str(request.get("id", ""))
        now = time.time()
        database = Database(config.store.dsn)
        try:
            database.open()
            local = {**request, "queue": "local"}
            if command == "list":
                answer = node(local)
                rows = (answer["rows"] if answer is not None
                        else local_rows(offline_local_queue(config.state_dir), now))
                return {"ok": True, "rows": listing(outbox.cluster_entries(database),
                                                    pending.cluster_notifications(database),
                                                    now) + rows}
            if command == "flush":
                pending.flush_cluster(database, now)
                outbox.flush_cluster(database, now)   # its NOTIFY wakes the nodes
                node(local)
                return {"ok": True}
            if command == "delete":
                answer = node(local)
                return {"ok": outbox.delete_from_cluster(database, target, now)
                        or pending.delete_from_cluster(database, target, now)
                        or (answer["ok"] if answer is not None
                            else offline_delete(config.state_dir, target, outbox=False))}
            if command in ("hold", "release"):
                held = command == "hold"
                return {"ok": outbox.hold_in_cluster(database, target, held, now)
                        or pending.hold_in_cluster(database, target, held, now)}
            return {"ok": False, "error": f"unknown command {command!r}"}
        except StoreUnavailable as e:
            raise SystemExit(f"pullmail queue: {e}") from None
        finally:
            database.close()

    return ask
