"""
A private Dovecot LMTP server for integration tests: its own config file,
base_dir, state, log and maildirs, all under one work folder, listening on
a UNIX socket there (and, when asked, on one loopback address and port).

    dovecot = DovecotInstance(workdir, ["alice@example.org"])
    with dovecot:                        # start(); always stopped on exit
        ...  # [delivery] local = f"lmtp:unix:{dovecot.socket}"
        dovecot.wait_delivered("alice@example.org")

It never reads the system's /etc/dovecot: the master runs with
C{-c <config>} in the foreground, as a child killed by its pid.  Dovecot's
master wants root, and mail may not be stored as uid 0, so the mailboxes
belong to C{nobody}: put the work folder where that user can reach it
(L{make_workdir}).  L{dovecot_unavailable} says why it cannot run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
from pathlib import Path
from typing import Iterable

from .harness import _Process, _tail, wait_until
from .postfix import SBIN_PATH, make_workdir

__all__ = ["DovecotInstance", "dovecot_unavailable", "make_workdir", "DOVECOT", "MAIL_USER"]

DOVECOT = shutil.which("dovecot", path=SBIN_PATH) or "/usr/sbin/dovecot"
LMTP_BINARY = "/usr/lib/dovecot/lmtp"
MAIL_USER = "nobody"
START_TIMEOUT = 15.0

# Users live in a passwd-file keyed by the full address; every one stores
# mail as MAIL_USER in <work>/mail/<domain>/<localpart> (Maildir).
_CONFIG = """\
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
protocols = lmtp
{listen}ssl = no
first_valid_uid = 1
mail_location = maildir:{work}/mail/%d/%n
userdb {{
  driver = passwd-file
  args = username_format=%Lu {work}/users
  default_fields = uid={user} gid={group} home={work}/home/%d/%n
}}
passdb {{
  driver = passwd-file
  args = username_format=%Lu {work}/users
}}
service lmtp {{
  unix_listener {work}/lmtp {{
    mode = 0666
  }}
{inet}}}
"""

_INET = """\
  inet_listener lmtp {{
    address = {address}
    port = {port}
  }}
"""


def dovecot_unavailable() -> str | None:
    """Why a private Dovecot LMTP server cannot run here (None when it can)."""
    if not os.access(DOVECOT, os.X_OK):
        return "the dovecot command is not installed (dovecot-core)"
    if not os.access(LMTP_BINARY, os.X_OK):
        return "Dovecot's LMTP server is not installed (dovecot-lmtpd)"
    if os.geteuid() != 0:
        return "a private Dovecot needs root (its master runs as root)"
    try:
        pwd.getpwnam(MAIL_USER)
    except KeyError:
        return f"there is no {MAIL_USER!r} user to store mail as"
    return None


class DovecotInstance:
    """One Dovecot master serving LMTP for C{users}, under C{workdir}."""

    def __init__(self, workdir: Path, users: Iterable[str],
                 inet: tuple[str, int] | None = None) -> None:
        self.workdir = Path(workdir)
        self.users = [u.lower() for u in users]
        self.inet = inet
        self.config_path = self.workdir / "dovecot.conf"
        self.log_path = self.workdir / "dovecot.log"
        self.socket = self.workdir / "lmtp"
        self.mail = self.workdir / "mail"
        self.process: _Process | None = None
        entry = pwd.getpwnam(MAIL_USER)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.mail.mkdir(parents=True, exist_ok=True)
        (self.workdir / "home").mkdir(exist_ok=True)
        for folder in (self.mail, self.workdir / "home"):
            os.chown(folder, self.uid, self.gid)
        (self.workdir / "users").write_text("".join(f"{u}::::::\n" for u in self.users))
        inet = _INET.format(address=inet[0], port=inet[1]) if inet else ""
        self.config_path.write_text(_CONFIG.format(
            work=self.workdir, listen=f"listen = {self.inet[0]}\n" if self.inet else "",
            inet=inet,
            user=self.uid, group=self.gid,
        ))

    def start(self) -> "DovecotInstance":
        if self.running():
            return self
        self.socket.unlink(missing_ok=True)
        self.process = _Process([DOVECOT, "-F", "-c", str(self.config_path)], self.workdir,
                                self.workdir / "dovecot.out", env=dict(os.environ))
        wait_until(self.greets, START_TIMEOUT, message=self.diagnostics)
        return self

    def stop(self) -> None:
        """Stop the master and its children; the socket stops answering."""
        if self.process is not None:
            self.process.terminate()
            self.process = None
        self.socket.unlink(missing_ok=True)

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def __enter__(self) -> "DovecotInstance":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def greets(self) -> bool:
        """Whether the LMTP socket answers with a 220."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket))
                return sock.recv(512).startswith(b"220")
        except OSError:
            return False

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        return self.mail / domain / local

    def delivered(self, address: str) -> list[bytes]:
        """The messages in the mailbox's new/ and cur/, oldest name first."""
        box = self.maildir(address)
        paths = sorted(p for sub in ("new", "cur") if (box / sub).is_dir()
                       for p in (box / sub).iterdir())
        return [p.read_bytes() for p in paths]

    def wait_delivered(self, address: str, count: int = 1, timeout: float = 15.0) -> list[bytes]:
        wait_until(lambda: len(self.delivered(address)) >= count, timeout,
                   message=lambda: f"{address}: {len(self.delivered(address))} messages\n"
                           + self.diagnostics())
        return self.delivered(address)

    def diagnostics(self, lines: int = 30) -> str:
        """The tails of dovecot.log and of the master's own output."""
        return "\n".join(f"--- {path.name} ---\n{_tail(path, lines)}"
                         for path in (self.log_path, self.workdir / "dovecot.out"))
