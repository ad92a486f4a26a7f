# -*- test-case-name: tests.test_indoubt -*-
"""
``<state_dir>/in-doubt/``: messages whose delivery to a mail store that
cannot be searched (LMTP) is unknown, kept for the operator.

A store may commit a message and the news never reach us: its connection
breaks (or times out) after the end of the data and before its reply to a
recipient, or the node dies in that window.  Delivering again may deliver
twice; saying nothing may lose the message.  So the message is kept here,
durably, before anyone is told ``250``, and the operator decides: look in
the mailboxes named, and re-send the file if the message is not there
(L{pullmail.inbound.lmtp}, L{pullmail.pull.handover}).

One file per message kept, ``<queue id>.eml`` (``<queue id>.<n>.eml``
when that name holds another copy), the envelope on top::

    X-Pullmail-In-Doubt: <why>
    X-Pullmail-Envelope-From: <sender>
    X-Pullmail-Envelope-To: <recipient>, <recipient>

Keeping the same bytes again (a retrieval cut off twice) finds the file
already there.  Deleting a file is the operator's "done".
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pullmail.storage.durable import fsync_directory, write_new_file

__all__ = ["IN_DOUBT", "InDoubt", "KeptCopy", "kept_copies"]

# The folder under state_dir.
IN_DOUBT = "in-doubt"
_WHY = b"X-Pullmail-In-Doubt: "
_FROM = b"X-Pullmail-Envelope-From: "
_TO = b"X-Pullmail-Envelope-To: "


class InDoubt:
    """Keeps copies in C{folder}, durably, through C{run_blocking} (off the reactor)."""

    def __init__(self, folder: Path, run_blocking: Callable) -> None:
        self.folder = folder
        self.run_blocking = run_blocking

    async def keep(self, queue_id: str, why: str, sender: str | None,
                   recipients: Sequence[str], chunks: Sequence[bytes]) -> Path:
        """
        Store the message with its envelope and C{why} (one line of
        printable text); the file's path once it is on disk.

        @raise OSError: it could not be stored.
        """
        envelope = (_WHY + _one_line(why) + b"\r\n"
                    + _FROM + f"<{sender or ''}>".encode("utf-8") + b"\r\n"
                    + _TO + ", ".join(recipients).encode("utf-8") + b"\r\n")
        return await self.run_blocking(_keep, self.folder, queue_id,
                                       envelope + b"".join(chunks))


def _one_line(text: str) -> bytes:
    """A header field body: no line ends (the caller's text may come from a peer)."""
    return " ".join(text.split()).encode("utf-8", "replace")


def _keep(folder: Path, queue_id: str, data: bytes) -> Path:
    """
    Write C{data} under a name no other copy holds: linked into place, so
    a copy already there is never replaced (two copies of one queue id,
    e.g. two recipients kept at different times, are two files).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = folder / f".{queue_id}.{os.getpid()}.{threading.get_ident()}.tmp"
    temporary.unlink(missing_ok=True)
    write_new_file(temporary, [data])
    try:
        for n in itertools.count():
            path = folder / (f"{queue_id}.eml" if n == 0 else f"{queue_id}.{n}.eml")
            try:
                os.link(temporary, path)
                break
            except FileExistsError:
                if path.read_bytes() == data:
                    break
    finally:
        temporary.unlink()
    fsync_directory(folder)
    return path


@dataclass(frozen=True)
class KeptCopy:
    """One file of the folder, as ``pullmail queue`` shows it."""

    path: Path
    why: str
    sender: str
    recipients: tuple[str, ...]
    kept_at: float

    @property
    def id(self) -> str:
        return self.path.stem


def kept_copies(folder: Path) -> list[KeptCopy]:
    """The copies in C{folder}, oldest first (none when it does not exist)."""
    copies = []
    try:
        paths = [p for p in folder.iterdir() if p.suffix == ".eml" and not p.name.startswith(".")]
    except FileNotFoundError:
        return []
    for path in paths:
        try:
            with path.open("rb") as f:
                head = [f.readline(4096) for _ in range(3)]
            kept_at = path.stat().st_mtime
        except OSError:
            continue   # removed meanwhile
        fields = {}
        for line in head:
            name, _, value = line.partition(b": ")
            fields[name + b": "] = value.rstrip(b"\r\n").decode("utf-8", "replace")
        recipients = fields.get(_TO, "")
        copies.append(KeptCopy(
            path, fields.get(_WHY, ""), fields.get(_FROM, "").strip("<>"),
            tuple(r.strip() for r in recipients.split(",") if r.strip()), kept_at,
        ))
    return sorted(copies, key=lambda c: (c.kept_at, c.path.name))
