"""
The drop folder of ``pullmail sendmail`` (Postfix's maildrop): messages
queued while the node may be down, taken in by the node at start, on a
poke through the control socket, and every L{SCAN_INTERVAL} otherwise.

``<state_dir>/maildrop/`` holds ``tmp/`` and ``new/`` (mode 1733: anyone
may create a file, no one may list or remove another's) and ``bad/``.  One
file per message, written to ``tmp/``, fsynced, renamed into ``new/`` and
the folder fsynced (L{pullmail.storage.durable}): the node sees a whole
message or none.  A file is one JSON line (the envelope the command saw)
then the message with CRLF line ends.

The sender is not taken from the file but from its owner: the node looks up
the Unix user of the file's uid, and honours ``-f`` only for the users in
``[sendmail] trusted_users``, root and the node's own user (L{sender_for}).

Recipients the node does not know are reported to the sender in a DSN made
by the node's one L{Reports}, under the rules of every other report and the
DSN request the command was given (C{-N}, C{-R}, C{-V}: L{dsn_request}).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping

from twisted.internet import defer, task
from twisted.logger import Logger

from pullmail import maillog
from pullmail.ids import new_queue_id
from pullmail.outbound import bounce
from pullmail.outbound.bouncer import Reports
from pullmail.smtp import dsn
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.replies import Reply
from pullmail.storage.durable import fsync_directory, publish_new_file, remove_files

__all__ = ["Drop", "Maildrop", "drop_message", "dsn_request", "sender_for", "may_choose_sender",
           "MAILDROP", "SCAN_INTERVAL"]

log = Logger(namespace="pullmail.node.maildrop")

MAILDROP = "maildrop"
DROP_VERSION = 1
SCAN_INTERVAL = 30.0
STALE_AFTER = 86400.0     # a file left in tmp/ by a command killed mid-write
_SHARED_MODE = 0o1733     # like Postfix's world-writable maildrop, sticky
_FROM = re.compile(rb"^from[ \t]*:", re.IGNORECASE | re.MULTILINE)


def dsn_request(notify: str | None = None, ret: str | None = None,
                envid: str | None = None) -> dict[str, str]:
    """
    Postfix's C{-N}, C{-R} and C{-V} as the DSN parameters they stand for
    (RFC 3461: NOTIFY for every recipient, RET, ENVID as xtext), in the
    form a drop file keeps them.  @raise ValueError: saying which is wrong.
    """
    request = {}
    if ret is not None:
        if dsn.check_mail_parameter("RET", ret) is not None:
            raise ValueError("-R takes full or hdrs")
        request["ret"] = ret.upper()
    if envid is not None:
        if dsn.check_mail_parameter("ENVID", dsn.xtext_encode(envid)) is not None:
            raise ValueError(f"-V: an envelope id of at most {dsn.MAX_ENVID} characters")
        request["envid"] = dsn.xtext_encode(envid)
    if notify is not None:
        checked = dsn.check_rcpt_parameters({"NOTIFY": notify})
        if isinstance(checked, Reply):
            raise ValueError("-N takes never, or a list of success, delay, failure")
        request["notify"] = checked["notify"]
    return request


@dataclass(frozen=True)
class Drop:
    """
    What the command queued: C{sender} only as C{-f} asked (None: the
    user's own); C{dsn} its DSN request (L{dsn_request}).
    """

    sender: str | None
    recipients: tuple[str, ...]
    message: bytes
    full_name: str | None = None
    dsn: Mapping[str, str] = field(default_factory=dict, hash=False)

    def encode(self) -> list[bytes]:
        header = {"version": DROP_VERSION, "sender": self.sender,
                  "recipients": list(self.recipients), "full_name": self.full_name,
                  "dsn": dict(self.dsn)}
        return [json.dumps(header).encode("utf-8") + b"\n", self.message]

    def envelope_parameters(self, recipients: Collection[str]) -> tuple[dict, dict]:
        """Its DSN request as a transaction's MAIL and RCPT parameters, for C{recipients}."""
        mail = {key: self.dsn[name] for key, name in (("RET", "ret"), ("ENVID", "envid"))
                if name in self.dsn}
        each = {"notify": self.dsn["notify"]} if "notify" in self.dsn else {}
        return mail, {r: each for r in recipients} if each else {}

    @classmethod
    def decode(cls, data: bytes) -> "Drop":
        """@raise ValueError: not a drop file of this version."""
        line, newline, message = data.partition(b"\n")
        header = json.loads(line)
        if not newline or not isinstance(header, dict) or header.get("version") != DROP_VERSION:
            raise ValueError("not a version 1 drop file")
        recipients = header.get("recipients")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise ValueError("bad recipients")
        sender, name = header.get("sender"), header.get("full_name")
        if not isinstance(sender, (str, type(None))) or not isinstance(name, (str, type(None))):
            raise ValueError("bad sender or name")
        # Anyone may write a drop file: its DSN request is checked again.
        request = header.get("dsn", {})
        if not isinstance(request, dict) or not set(request) <= {"ret", "envid", "notify"} \
                or not all(isinstance(v, str) for v in request.values()):
            raise ValueError("bad DSN request")
        envid = request.get("envid")
        if envid is not None and dsn.xtext_decode(envid) is None:
            raise ValueError("bad DSN request")
        checked = dsn_request(request.get("notify"), request.get("ret"),
                              None if envid is None else dsn.xtext_decode(envid))
        return cls(sender, tuple(recipients), message, name, checked)


def make_folders(root: Path) -> None:
    """maildrop/{tmp,new} shared (1733), bad/ private; umask left alone."""
    for name, mode in (("", 0o755), ("tmp", _SHARED_MODE), ("new", _SHARED_MODE),
                       ("bad", 0o700)):
        folder = root / name
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, mode)


def drop_message(state_dir: Path, drop: Drop) -> str:
    """Blocking: queue C{drop} durably in the drop folder; its file name."""
    root = state_dir / MAILDROP
    if not (root / "new").is_dir():
        make_folders(root)
    name = f"{time.time_ns()}.{os.getpid()}.{secrets.token_hex(8)}"
    # Readable by the node's user: the folders cannot be listed, the name is
    # not guessable.
    publish_new_file(root / "tmp" / name, root / "new" / name, drop.encode(), mode=0o644)
    return name


def may_choose_sender(user: str, uid: int, trusted: Collection[str], node_uid: int) -> bool:
    """C{-f} is honoured for root, the node's own user and C{[sendmail] trusted_users}."""
    return uid == 0 or uid == node_uid or user in trusted


def sender_for(drop: Drop, user: str, uid: int, hostname: str, trusted: Collection[str],
               node_uid: int) -> str:
    if drop.sender is not None and may_choose_sender(user, uid, trusted, node_uid):
        return drop.sender
    return f"{user}@{hostname}"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def with_from(message: bytes, sender: str, full_name: str | None) -> bytes:
    """A ``From:`` (RFC 5322 3.6.2) for a message that has none, as Postfix adds."""
    end = message.find(b"\r\n\r\n")
    header = message[: end + 2] if end >= 0 else message
    if message.startswith(b"\r\n"):
        header = b""
    if _FROM.search(header):
        return message
    name = re.sub(r"[\x00-\x1f\"\\\\]", "", full_name or "").strip()
    field = f'From: "{name}" <{sender}>' if name else f"From: <{sender}>"
    return field.encode("utf-8") + b"\r\n" + message


def _read(path: Path) -> tuple[bytes, int, float]:
    """The file's content, owner and last change (when the command queued it)."""
    with open(path, "rb") as f:
        status = os.fstat(f.fileno())
        return f.read(), status.st_uid, status.st_mtime


class Maildrop:
    """
    The node's side: takes dropped messages in through the router (as
    submission); C{reports} sends the DSN on recipients it does not know.
    """

    def __init__(self, root: Path, router, reports: Reports, clock, run_blocking,
                 hostname: str, trusted_users: Collection[str], max_size: int,
                 node_uid: int | None = None) -> None:
        self.root = root
        self.router = router
        self.reports = reports
        self.clock = clock
        self.run_blocking = run_blocking
        self.hostname = hostname
        self.trusted_users = frozenset(trusted_users)
        self.max_size = max_size
        self.node_uid = os.getuid() if node_uid is None else node_uid
        self.waiting = 0              # files in new/ at the last look (the metrics)
        self._busy: set[str] = set()
        self._loop = task.LoopingCall(self.drain)
        self._loop.clock = clock

    def start(self) -> None:
        make_folders(self.root)
        remove_stale(self.root / "tmp", self.clock.seconds() - STALE_AFTER)
        self._loop.start(SCAN_INTERVAL, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def drain(self) -> defer.Deferred:
        """Take in every message waiting in new/ (``pullmail sendmail`` pokes this)."""
        return defer.Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        try:
            names = sorted(await self.run_blocking(os.listdir, self.root / "new"))
        except OSError as e:
            maillog.MAILDROP_ERROR(log, error=str(e))
            return
        self.waiting = len(names)
        for name in names:
            if name in self._busy or name.startswith("."):
                continue
            self._busy.add(name)
            try:
                await self._take_in(name)
            except Exception:
                log.failure("taking in dropped message {name}", name=name)
            finally:
                self._busy.discard(name)
        self.waiting = len(self._busy)

    async def _take_in(self, name: str) -> None:
        path = self.root / "new" / name
        try:
            data, uid, queued = await self.run_blocking(_read, path)
        except FileNotFoundError:
            return
        user = user_name(uid)
        try:
            drop = Drop.decode(data)
        except ValueError as e:
            await self._set_aside(name, f"unreadable drop file from {user}: {e}")
            return
        if len(drop.message) > self.max_size:
            await self._set_aside(name, f"message from {user} over limits.message_size")
            return
        sender = sender_for(drop, user, uid, self.hostname, self.trusted_users, self.node_uid)
        if drop.sender is not None and sender != drop.sender:
            maillog.SENDMAIL_SENDER_REFUSED(log, claimed=drop.sender, user=user)
        accounts = self.router.accounts
        known = [r for r in drop.recipients if accounts.expand(r)]
        unknown = [r for r in drop.recipients if r not in known]
        message = with_from(drop.message, sender, drop.full_name)
        if known:
            session = Session("127.0.0.1", "sendmail", helo="localhost", user=user)
            params, rcpt_params = drop.envelope_parameters(known)
            envelope = Envelope(sender, tuple(known), size=len(message), params=params,
                                rcpt_params=rcpt_params)
            reply = await self.router.accept(session, envelope, [message], len(message))
            if not reply.positive:
                if reply.permanent:
                    await self._set_aside(name, f"refused: {reply}")
                else:
                    maillog.MAILDROP_DEFERRED(log, name=name, reply=str(reply))
                return
        if unknown:
            await self._bounce(sender, unknown, message, queued,
                               dsn.for_recipients(*drop.envelope_parameters(unknown)))
        await self.run_blocking(_remove_durably, path)
        maillog.MAILDROP_TAKEN(log, user=user, sender=sender, recipients=known, unknown=unknown)

    async def _bounce(self, sender: str, unknown: list[str], message: bytes,
                      arrival: float, dsn_params: dict) -> None:
        """
        RFC 3464 through L{Reports}, as the command's DSN request asks; no
        origin (a local user: SPF has nothing to say about it).
        """
        queue_id = new_queue_id()
        sent = await self.reports.send(
            queue_id=queue_id, sender=sender, dsn_params=dsn_params, origin=None, arrival=arrival,
            recipients=[bounce.FailedRecipient(r, "5.1.1", None, None) for r in unknown],
            action="failed", original=message,
        )
        if sent:
            maillog.BOUNCED(log, action="failed", queue_id=queue_id, sender=sender,
                            recipients=sent, status="5.1.1")

    async def _set_aside(self, name: str, reason: str) -> None:
        maillog.MAILDROP_BAD(log, name=name, reason=reason)
        await self.run_blocking(os.replace, self.root / "new" / name, self.root / "bad" / name)


def remove_stale(folder: Path, before: float) -> None:
    """Blocking (start-up): files in C{folder} last changed before C{before}."""
    with os.scandir(folder) as listing:
        stale = [item.path for item in listing
                 if item.is_file(follow_symlinks=False) and item.stat().st_mtime < before]
    remove_files(*stale)


def _remove_durably(path: Path) -> None:
    remove_files(path)
    fsync_directory(path.parent)
