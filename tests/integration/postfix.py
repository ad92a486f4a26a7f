"""
A private Postfix instance for interoperability tests: its own config
directory, queue and data directories, maildirs and log file, all under one
work folder, listening on one loopback address and port.

    postfix = PostfixInstance(workdir, "127.0.0.72", 2525, "postfix.test",
                              mailboxes=["carol@postfix.test"],
                              relayhost="[127.0.0.71]:2525")
    with postfix:                        # start(); always stopped on exit
        ...
        postfix.wait_delivered("carol@postfix.test")

It never reads or writes the system's /etc/postfix instance: every command
is run with C{-c <confdir>} (and C{MAIL_CONFIG}), the only C{inet} service
is C{address:port}, and C{inet_interfaces} is that one address.  Postfix's
own daemons must run as root (master) and as the C{postfix} user (the
rest), so this needs root; L{postfix_unavailable} says why it cannot run.

Postfix checks permissions along every path it uses: the work folder and
its parents must be searchable by the C{postfix} user, so put it in a
world-searchable place (L{make_workdir}), not in pytest's private C{tmp_path}.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pty
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

from .harness import _greets, accepts

__all__ = [
    "PostfixInstance",
    "PostfixError",
    "postfix_unavailable",
    "make_workdir",
    "POSTFIX",
    "POSTCONF",
]

SBIN_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"]
)
POSTFIX = shutil.which("postfix", path=SBIN_PATH) or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf", path=SBIN_PATH) or "/usr/sbin/postconf"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class PostfixError(RuntimeError):
    """The instance would not configure, check, start or stop."""


def postfix_unavailable() -> str | None:
    """Why a private Postfix cannot run here (None when it can)."""
    if not (os.path.exists(POSTFIX) and os.access(POSTFIX, os.X_OK)):
        return "the postfix command is not installed"
    if not (os.path.exists(POSTCONF) and os.access(POSTCONF, os.X_OK)):
        return "the postconf command is not installed"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master runs as root)"
    for user in ("postfix",):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"there is no {user!r} user (the postfix package makes it)"
    try:
        grp.getgrnam("postdrop")
    except KeyError:
        return "there is no 'postdrop' group (the postfix package makes it)"
    return None


def make_workdir(prefix: str = "pullmail-postfix-") -> Path:
    """A fresh folder under the system temp dir, searchable by everyone."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _env(config_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = SBIN_PATH
    if config_dir is not None:
        env["MAIL_CONFIG"] = str(config_dir)
    else:
        env.pop("MAIL_CONFIG", None)
    return env


# master.cf: no chroot anywhere (column 5 "n"), one inet service only.
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """
    One private Postfix in C{workdir}:

        workdir/etc/{main.cf,master.cf,vmailbox}   config directory
        workdir/spool/                             queue_directory
        workdir/data/                              data_directory
        workdir/vmail/<domain>/<local>/            maildirs (virtual(8))
        workdir/maillog                            postlogd's log

    C{mydomain} is served by virtual(8) for C{mailboxes} (addresses in that
    domain).  Mail for any other domain goes to C{relayhost} (e.g.
    C{"[127.0.0.71]:2525"}) when given, else is deferred (no DNS: the
    instance never looks anything up).  C{mynetworks} may relay without
    AUTH.  With C{tls}, smtpd offers STARTTLS (a self-signed certificate
    made here) and the smtp client uses it when offered.
    """

    def __init__(
        self,
        workdir: Path,
        address: str,
        port: int,
        mydomain: str,
        relayhost: str | None = None,
        *,
        mailboxes: Iterable[str] = (),
        myhostname: str | None = None,
        mynetworks: Iterable[str] = ("127.0.0.0/8",),
        tls: bool = True,
        extra_main: dict[str, str] | None = None,
    ) -> None:
        if not address.startswith("127."):
            raise ValueError("a test Postfix listens on loopback only")
        if port == 25:
            raise ValueError("a test Postfix must not take port 25")
        self.workdir = Path(workdir)
        self.address = address
        self.port = port
        self.mydomain = mydomain
        self.relayhost = relayhost
        self.mailboxes = [m.lower() for m in mailboxes]
        self.myhostname = myhostname or f"mx.{mydomain}"
        self.mynetworks = list(mynetworks)
        self.tls = tls
        self.extra_main = dict(extra_main or {})
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.vmail_dir = self.workdir / "vmail"
        self.log_path = self.workdir / "maillog"
        self.started = False
        owner = pwd.getpwnam("postfix")
        self.uid, self.gid = owner.pw_uid, owner.pw_gid
        self.write_config()

    def __repr__(self) -> str:
        return f"<PostfixInstance {self.address}:{self.port} {self.config_dir}>"

    # -- configuration ------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.workdir),
            "myhostname": self.myhostname,
            "mydomain": self.mydomain,
            "myorigin": "$mydomain",
            "mydestination": "",
            # Postfix accepts only addresses of a network interface here,
            # and 127.0.0.72 is not one (lo has 127.0.0.1/8): the smtpd
            # service line binds address:port itself, and no service here
            # listens on a bare port, so this binds nothing.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "smtp_bind_address": self.address,
            "mynetworks": " ".join(self.mynetworks),
            "relayhost": self.relayhost or "",
            # Never DNS: relayhost is a bracketed literal, the rest is local.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 no local delivery here",
            "virtual_mailbox_domains": self.mydomain,
            "virtual_mailbox_base": str(self.vmail_dir),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "smtpd_relay_restrictions":
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_banner": "$myhostname ESMTP $mail_name (pullmail interop test)",
            "biff": "no",
            "append_dot_mydomain": "no",
            # Fast queue runs: a test waits for nothing longer than it must.
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
            "smtp_connect_timeout": "10s",
            "delay_warning_time": "0h",
            "notify_classes": "",
            "message_size_limit": "10240000",
            "smtputf8_enable": "no",
        }
        if self.tls:
            settings.update({
                "smtpd_tls_security_level": "may",
                "smtpd_tls_cert_file": str(self.config_dir / "cert.pem"),
                "smtpd_tls_key_file": str(self.config_dir / "key.pem"),
                "smtpd_tls_received_header": "yes",
                "smtpd_tls_loglevel": "1",
                "smtp_tls_security_level": "may",
                "smtp_tls_loglevel": "1",
                "smtpd_tls_session_cache_database": "",
                "smtp_tls_session_cache_database": "",
            })
        else:
            settings.update({
                "smtpd_tls_security_level": "none",
                "smtp_tls_security_level": "none",
            })
        settings.update(self.extra_main)
        return settings

    def master_cf(self) -> str:
        return (
            f"{self.address}:{self.port} inet n - n - - smtpd\n" + _MASTER_SERVICES
        )

    def write_config(self) -> None:
        for folder in (self.config_dir, self.queue_dir, self.data_dir, self.vmail_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.config_dir.chmod(0o755)
        self.queue_dir.chmod(0o755)
        os.chown(self.queue_dir, 0, 0)
        os.chown(self.data_dir, self.uid, self.gid)
        self.data_dir.chmod(0o700)
        os.chown(self.vmail_dir, self.uid, self.gid)
        self.vmail_dir.chmod(0o755)
        lines = [f"{key} = {value}".rstrip() for key, value in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self.master_cf())
        mailbox_lines = []
        for mailbox in self.mailboxes:
            local, _, domain = mailbox.rpartition("@")
            if domain != self.mydomain:
                raise ValueError(f"{mailbox} is not in {self.mydomain}")
            mailbox_lines.append(f"{mailbox} {domain}/{local}/")
        (self.config_dir / "vmailbox").write_text("\n".join(mailbox_lines) + "\n")
        if self.tls:
            self._write_certificate()
        self.log_path.touch()

    def _write_certificate(self) -> None:
        cert, key = self.config_dir / "cert.pem", self.config_dir / "key.pem"
        if cert.exists() and key.exists():
            return
        import datetime

        from pullmail.net.tls import self_signed_pair

        cert_pem, key_pem = self_signed_pair(
            self.myhostname, datetime.datetime.now(datetime.timezone.utc)
        )
        key.write_bytes(key_pem)
        key.chmod(0o600)
        cert.write_bytes(cert_pem)

    # -- commands -------------------------------------------------------------

    def run(self, *args: str, check: bool = True, timeout: float = 60.0):
        """C{postfix -c <confdir> ARGS}, with C{MAIL_CONFIG} set too."""
        argv = [POSTFIX, "-c", str(self.config_dir), *args]
        result = _run_with_tty_stderr(argv, _env(self.config_dir), timeout)
        if check and result.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}"
                f"{result.stderr}\n--- maillog ---\n{self.log_tail()}"
            )
        return result

    def postconf(self, *args: str) -> str:
        result = subprocess.run(
            [POSTCONF, "-c", str(self.config_dir), *args], capture_output=True,
            text=True, timeout=30, env=_env(self.config_dir),
        )
        if result.returncode != 0:
            raise PostfixError(f"postconf {' '.join(args)}: {result.stderr}")
        return result.stdout

    def check(self) -> str:
        """C{postfix check}: creates missing queue folders; warnings as text."""
        result = self.run("check")
        return result.stdout + result.stderr

    def master_pid(self) -> int | None:
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text().strip()
            pid = int(text)
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def start(self, timeout: float = START_TIMEOUT) -> "PostfixInstance":
        """C{postfix -c DIR start}; returns once smtpd greets on address:port."""
        if self.master_pid() is not None:
            raise PostfixError(f"{self!r} is already running")
        if accepts(self.address, self.port, source=self.address):
            raise PostfixError(f"something already listens on {self.address}:{self.port}")
        self.check()
        self.run("start")
        self.started = True
        deadline = time.monotonic() + timeout
        while not _greets(self.address, self.port, timeout=2, source=self.address):
            if time.monotonic() >= deadline:
                self.stop()
                raise PostfixError(
                    f"{self!r} did not greet within {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """C{postfix -c DIR stop}; then kill whatever of this instance is left."""
        if not self.started:
            return
        pid = self.master_pid()
        with contextlib.suppress(PostfixError, subprocess.TimeoutExpired):
            self.run("stop", check=False, timeout=timeout)
        deadline = time.monotonic() + timeout
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for leftover in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)
        self.started = False

    close = stop

    def processes(self) -> list[int]:
        """
        Pids of processes of this instance: those whose environment names
        this config directory in MAIL_CONFIG (master exports it to its
        children).  Never matches the system instance.
        """
        marker = f"MAIL_CONFIG={self.config_dir}".encode() + b"\0"
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes() + b"\0":
                    pids.append(int(entry.name))
        return pids

    def listening(self) -> set[tuple[str, int]]:
        """The TCP (address, port) pairs this instance's processes listen on."""
        inodes = set()
        for pid in self.processes():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = os.readlink(fd)
                        if target.startswith("socket:["):
                            inodes.add(target[8:-1])
        found = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                        continue
                    host, port = fields[1].split(":")
                    if len(host) == 8:
                        address = socket.inet_ntoa(bytes.fromhex(host)[::-1])
                    else:
                        address = host
                    found.add((address, int(port, 16)))
        return found

    def __enter__(self) -> "PostfixInstance":
        if self.master_pid() is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- mail -------------------------------------------------------------------

    def flush(self) -> None:
        """C{postfix flush}: try every deferred message now."""
        self.run("flush", check=False)

    def send(self, sender: str, recipients: list[str], message: bytes,
             source: str | None = None, helo: str = "client.postfix-test.test") -> dict:
        """Submit by SMTP to this instance's smtpd (from C{source})."""
        with smtplib.SMTP(self.address, self.port, local_hostname=helo, timeout=30,
                          source_address=(source, 0) if source else None) as client:
            refused = client.sendmail(sender, recipients, message)
            client.quit()
        return refused

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        return self.vmail_dir / domain / local

    def delivered_paths(self, address: str) -> list[Path]:
        maildir = self.maildir(address)
        return sorted(
            (p for sub in ("new", "cur") if (maildir / sub).is_dir()
             for p in (maildir / sub).iterdir() if p.is_file()),
            key=lambda p: p.name,
        )

    def delivered(self, address: str) -> list[bytes]:
        return [p.read_bytes() for p in self.delivered_paths(address)]

    def wait_delivered(self, address: str, count: int = 1, timeout: float = 30.0,
                       contains: bytes | None = None) -> list[bytes]:
        """Wait for C{count} messages (containing C{contains}) in C{address}'s maildir."""
        deadline = time.monotonic() + timeout
        while True:
            messages = [m for m in self.delivered(address)
                        if contains is None or contains in m]
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {count} message(s) for "
                    f"{address} in {self.maildir(address)}\n--- maillog ---\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    # -- logs ---------------------------------------------------------------------

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text("utf-8", "replace")
        return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {pattern!r} in "
                    f"{self.log_path}\n{self.log_tail()}"
                )
            time.sleep(0.1)


def _run_with_tty_stderr(argv: list[str], env: dict[str, str],
                         timeout: float) -> subprocess.CompletedProcess:
    """
    Run a Postfix command with its stderr on a pseudo-terminal: Postfix
    commands write their errors to stderr only when it is a terminal (else
    to syslog, which a test cannot read).
    """
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        try:
            process = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                env=env, timeout=timeout, start_new_session=True,
            )
        finally:
            os.close(slave)
        reader.join(5)
    finally:
        with contextlib.suppress(OSError):
            os.close(master)
    stderr = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return subprocess.CompletedProcess(
        argv, process.returncode, process.stdout.decode("utf-8", "replace"), stderr
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
