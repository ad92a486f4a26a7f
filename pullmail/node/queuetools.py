"""
``pullmail queue``: list (text or ``--json``), ``hold``/``release``/``delete``
an entry, ``flush``, and ``shape`` (messages per destination domain and age,
like Postfix's qshape).  Each asks the running node through the control
socket, or reads and edits the files when no node answers.

The ``--json`` document (SPEC 11.4), version 1::

    {"version": 1, "node": HOSTNAME, "source": "node" | "files",
     "messages": [{"id", "queue": "outbox" | "push" | "pending" | "local", "queue_id",
                   "sender", "recipients", "domain", "age_s", "state",
                   "attempts", "next_s", "last_error", "origin", "peer"}, ...]}

``state`` is ``held`` while held, else the entry's own (``queued``,
``notified``, ``claimed``, ``pending``, ``retrieved``).  ``local`` is the
LMTP local queue: recipients the mail store deferred, retried by this node
(flushed and deleted like the others; not held).  ``in-doubt`` (state
``kept``) lists the copies in ``<state_dir>/in-doubt/``
(L{pullmail.storage.indoubt}): messages the LMTP store may or may not have
delivered, never tried again by the node; ``id`` is the file's name
without ``.eml``, ``last_error`` why it is there.  They wait for the
operator, who looks in the mailboxes, re-sends what is missing and removes
the file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

from pullmail.storage.indoubt import IN_DOUBT, kept_copies

__all__ = ["message_record", "print_rows", "queue_document", "shape_table", "run", "AGE_BUCKETS",
           "in_doubt_rows"]

DOCUMENT_VERSION = 1
# qshape's buckets, in minutes: 0-5, 5-10, 10-20, ... 640-1280, 1280+.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def _age(seconds: float) -> str:
    """3725 -> '1h2m': the two largest units, like Postfix's mailq."""
    seconds = int(max(0, seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


_TITLES = {
    "outbox": "Outbox (notified, waiting for retrieval; next = expiry)",
    "push": "Push queue (waiting for an attempt)",
    "pending": "Pending notifications (to retrieve)",
    "local": "Local queue (deferred by the mail store, LMTP)",
    "in-doubt": "In doubt (kept aside: the mail store may have them or not; never re-sent)",
}
# What the operator does with a copy in doubt (README "Delivering to Dovecot over LMTP").
_IN_DOUBT_HINT = (
    "  For each: look in the recipients' mailboxes; if the message is not there,\n"
    "  re-send it without the three X-Pullmail lines on top:\n"
    "    tail -n +4 FILE | pullmail sendmail -f SENDER RECIPIENT...\n"
    "  then remove FILE."
)


def in_doubt_rows(state_dir: Path, now: float) -> list[dict]:
    """The copies in C{<state_dir>/in-doubt}, as listing rows."""
    return [{
        "kind": "in-doubt", "id": copy.id, "queue_id": copy.id.split(".")[0],
        "sender": copy.sender, "recipients": list(copy.recipients),
        "domain": copy.recipients[0].rpartition("@")[2] if copy.recipients else None,
        "age": now - copy.kept_at, "state": "kept", "attempts": 0, "next": 0.0,
        "last_error": copy.why, "path": str(copy.path),
    } for copy in kept_copies(state_dir / IN_DOUBT)]


def print_rows(rows: list[dict], out: TextIO) -> None:
    for kind, title in _TITLES.items():
        chosen = [r for r in rows if r["kind"] == kind]
        if kind == "in-doubt":
            if chosen:
                _print_in_doubt(title, chosen, out)
            continue
        print(f"{title}: {len(chosen)}", file=out)
        for row in chosen:
            who = row.get("sender") or row.get("origin") or "<>"
            recipients = ",".join(row.get("recipients") or ["(at retrieval)"])
            state = "held" if row.get("held") else row["state"]
            line = (
                f"  {row['id']}  age {_age(row['age'])}  {state}"
                f"  attempts {row['attempts']}  next in {_age(row['next'])}"
                f"  from <{who}> to {recipients}"
            )
            if row.get("last_error"):
                line += f"  ({row['last_error'][:80]})"
            print(line, file=out)


def _print_in_doubt(title: str, rows: list[dict], out: TextIO) -> None:
    print(f"{title}: {len(rows)}", file=out)
    for row in rows:
        print(f"  {row['path']}  age {_age(row['age'])}  from <{row['sender']}>"
              f" to {','.join(row['recipients'])}  ({row['last_error'][:120]})", file=out)
    print(_IN_DOUBT_HINT, file=out)


def message_record(row: dict) -> dict:
    """One listing row (L{pullmail.node.control.listing}) in the documented schema."""
    return {
        "id": row["id"], "queue": row["kind"], "queue_id": row.get("queue_id"),
        "sender": row.get("sender"), "recipients": row.get("recipients"),
        "domain": row.get("domain"), "age_s": round(max(0.0, row["age"]), 3),
        "state": "held" if row.get("held") else row["state"],
        "attempts": row.get("attempts", 0), "next_s": round(row.get("next") or 0.0, 3),
        "last_error": row.get("last_error", ""), "origin": row.get("origin"),
        "peer": row.get("peer"),
    }


def queue_document(rows: list[dict], hostname: str, source: str) -> dict:
    return {"version": DOCUMENT_VERSION, "node": hostname, "source": source,
            "messages": [message_record(row) for row in rows]}


def shape_table(messages: Sequence[dict], queues: Sequence[str] = ("outbox", "push")) -> str:
    """
    qshape's table: one row per destination domain (most messages first),
    a total column, then one column per age bucket in minutes.
    """
    columns = [f"{m}m" for m in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1]}m+"]
    counts: dict[str, list[int]] = {}
    for message in messages:
        if message["queue"] not in queues:
            continue
        row = counts.setdefault(message["domain"] or "(unknown)", [0] * len(columns))
        minutes = message["age_s"] / 60
        index = next((i for i, limit in enumerate(AGE_BUCKETS) if minutes < limit),
                     len(AGE_BUCKETS))
        row[index] += 1
    total = [sum(column) for column in zip(*counts.values())] or [0] * len(columns)
    width = max([len("TOTAL")] + [len(domain) for domain in counts])
    lines = [" " * width + "  " + f"{'T':>6}" + "".join(f"{c:>7}" for c in columns)]
    ordered = sorted(counts.items(), key=lambda item: (-sum(item[1]), item[0]))
    for domain, row in [("TOTAL", total)] + ordered:
        lines.append(f"{domain:>{width}}  {sum(row):>6}" + "".join(f"{n:>7}" for n in row))
    return "\n".join(lines) + "\n"


def run(config, args, out: TextIO, ask) -> int:
    """The ``queue`` command; C{ask(request)} is the control socket (None: no node)."""
    from pullmail.node.control import offline_delete, offline_listing, offline_set_held

    action, target = args.action, args.target
    if args.delete:
        action, target = "delete", args.delete
    if args.flush:
        action = "flush"
    if action in ("hold", "release", "delete"):
        if not target:
            print(f"pullmail queue: {action} needs an id", file=sys.stderr)
            return 64
        answer = ask({"command": action, "id": target})
        if answer is not None:
            done = answer["ok"]
        elif action == "delete":
            done = offline_delete(config.state_dir, target)
        else:
            done = offline_set_held(config.state_dir, target, action == "hold")
        if not done:
            print(f"pullmail queue: no entry {target}", file=sys.stderr)
            return 1
        past = {"hold": "held", "release": "released", "delete": "deleted"}[action]
        print(f"{past} {target}", file=out)
        return 0
    if action == "flush":
        if ask({"command": "flush"}) is None:
            print("pullmail queue: no node running; everything due is tried at start",
                  file=sys.stderr)
            return 1
        print("flushed: every queued entry and pending notification is due now", file=out)
        return 0
    answer = ask({"command": "list"})
    source = "node" if answer is not None else "files"
    rows = answer["rows"] if answer is not None else offline_listing(config.state_dir,
                                                                     time.time())
    rows = rows + in_doubt_rows(config.state_dir, time.time())
    document = queue_document(rows, config.node.hostname, source)
    if action == "shape":
        queues = (args.queue,) if args.queue else ("outbox", "push")
        out.write(shape_table(document["messages"], queues))
    elif args.json:
        print(json.dumps(document, indent=1), file=out)
    else:
        print_rows(rows, out)
    return 0
