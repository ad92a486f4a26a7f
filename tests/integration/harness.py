"""
A harness for end-to-end tests: real pullmail nodes run by twistd on loopback
addresses, a DNS server of their own, and SMTP clients that can say anything.

    node = Node(tmp_path, "mx", "127.0.0.2", ["example.org"], "mx.example.org",
                users={"alice@example.org": "secret"})
    with node:                       # start(); always killed on exit
        with smtp(node) as client:
            client.sendmail("a@outside.test", ["alice@example.org"], b"...")
        assert node.delivered("alice@example.org")

Every address in 127.0.0.2 .. 127.0.0.20 works on Linux loopback without
setup; each node listens on its own address, on fixed ports (MX 2525,
submission 2587, submissions 2465), and connects to peers on port 2525.

Nothing here waits longer than needed: every wait polls against a deadline
and fails with what the node logged.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "REPO",
    "SMTP_PORT",
    "SUBMISSION_PORT",
    "SUBMISSIONS_PORT",
    "Node",
    "NodeError",
    "DNSServer",
    "RawSMTP",
    "smtp",
    "submit",
    "free_port",
    "toml_dumps",
    "wait_until",
    "Snapshot",
    "ScriptedPeer",
    "ConnectionCounter",
    "SilentUDP",
]

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SMTP_PORT = 2525
SUBMISSION_PORT = 2587
SUBMISSIONS_PORT = 2465
START_TIMEOUT = 15.0
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
STOP_TIMEOUT = 10.0

# Every process the harness started and has not yet reaped; killed at exit
# in case a test run is interrupted before its fixtures tear down.
_LIVE: "weakref.WeakSet[_Process]" = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_LIVE):
        process.kill()


class NodeError(RuntimeError):
    """A node (or the DNS server) did not start, or a command failed."""


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition",
) -> Any:
    """
    Poll C{predicate} until it returns a true value, and return that value;
    raise C{AssertionError} naming C{message} after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(interval)


def free_port(address: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on C{address} (by binding port 0)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((address, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((address, port))
                except OSError:
                    continue
                return port
    raise NodeError(f"no port free for both TCP and UDP on {address}")


# -- TOML ---------------------------------------------------------------------
# tomllib only reads.  This writes the subset a pullmail config uses: tables
# of strings, booleans, integers, floats and (nested) lists of those.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML cannot hold {value!r} here")
        return repr(value)
    if isinstance(value, (str, Path)):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def toml_dumps(document: Mapping[str, Mapping[str, Any]]) -> str:
    """C{{section: {key: value}}} as TOML text, one table per section."""
    lines: list[str] = []
    for section, table in document.items():
        if not isinstance(table, Mapping):
            raise TypeError(f"[{section}] must be a table, not {table!r}")
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(section)}]")
        for key, value in table.items():
            if isinstance(value, Mapping):
                raise TypeError(f"{section}.{key}: nested tables are not supported")
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def merge_settings(
    *layers: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """Each layer merged over the ones before it, key by key within each section."""
    result: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, table in (layer or {}).items():
            result.setdefault(section, {}).update(table)
    return result


# -- processes ------------------------------------------------------------------


def _environment(
    pythonpath: Iterable[str | Path] = (), extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """
    The environment of a child: ours, with the repository (then
    C{pythonpath}, e.g. a folder holding C{pullmail/plugins/} drop-ins) in
    front of C{PYTHONPATH}, and C{extra} variables on top.
    """
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [str(p) for p in pythonpath]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


class _Process:
    """One child process, started in its own session, killed by its pid only."""

    def __init__(
        self, argv: list[str], cwd: Path, output: Path, env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = argv
        with open(output, "ab") as out:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env if env is not None else _environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            self.popen.send_signal(signum)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL if it does not end within C{timeout}."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL and wait."""
        if self.running():
            self.popen.kill()
        code = self.popen.wait()
        _LIVE.discard(self)
        return code


def _greets(address: str, port: int, timeout: float = 1.0, source: str | None = None) -> bool:
    """
    Whether C{address:port} accepts a connection and greets with C{220}.
    The probe then says QUIT and waits for the server to close, so that the
    server has forgotten the connection (per-IP limits) when this returns.
    """
    try:
        sock = socket.create_connection(
            (address, port), timeout=timeout, source_address=(source, 0) if source else None
        )
    except OSError:
        return False
    with sock:
        try:
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                data += chunk
            if not data.startswith(b"220"):
                return False
            sock.sendall(b"QUIT\r\n")
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
            return True
        except OSError:
            return False


def accepts(address: str, port: int, source: str | None = None) -> bool:
    """Whether something accepts TCP connections there (from C{source}, if given)."""
    try:
        socket.create_connection(
            (address, port), timeout=0.5, source_address=(source, 0) if source else None
        ).close()
        return True
    except OSError:
        return False


# -- nodes ----------------------------------------------------------------------


class Node:
    """
    One pullmail node in C{workdir/name}: its config, accounts and state,
    and its twistd process.

    The constructor writes C{pullmail.toml} and the aliases file and adds
    the users with the real C{pullmail adduser} command; C{start()} runs
    C{twistd -n pullmail --config ...} and returns once the MX service
    greets.  Use it as a context manager (or call C{close()}) so the
    process is always killed.
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        address: str,
        domains: list[str],
        hostname: str,
        users: Mapping[str, str] | None = None,
        aliases: str = "",
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        pythonpath: Iterable[str | Path] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        # pythonpath: extra PYTHONPATH entries (after the repository) for
        # twistd and the pullmail command, e.g. a folder with drop-in
        # pullmail/plugins/ modules; env: extra environment variables.
        self.pythonpath = [str(p) for p in pythonpath]
        self.extra_env = dict(env or {})
        self.workdir = Path(workdir)
        self.name = name
        self.address = address
        self.domains = list(domains)
        self.hostname = hostname
        self.dir = self.workdir / name
        self.config_path = self.dir / "pullmail.toml"
        self.log_path = self.dir / "node.log"
        self.output_path = self.dir / "node.out"  # stdout/stderr of twistd
        self.process: _Process | None = None
        self.settings = merge_settings(self.default_settings(), settings or {})
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.write_aliases(aliases)
        for address_, password in (users or {}).items():
            self.add_user(address_, password)

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<Node {self.name} {self.address} {state}>"

    # configuration

    def default_settings(self) -> dict[str, dict[str, Any]]:
        address = self.address
        return {
            "node": {
                "hostname": self.hostname,
                "domains": self.domains,
                "state_dir": "var",
            },
            "listen": {
                "smtp": [f"tcp:{SMTP_PORT}:interface={address}"],
                "submission": [f"tcp:{SUBMISSION_PORT}:interface={address}"],
                "submissions": [f"tcp:{SUBMISSIONS_PORT}:interface={address}"],
            },
            "accounts": {"users": "users", "aliases": "aliases"},
            "delivery": {"bind_address": address, "remote_port": SMTP_PORT},
            # Every node and client of a test shares 127.0.0.0/24: count per
            # address, as a node on the Internet counts per /24.
            "limits": {"idle_timeout": "30s", "ipv4_prefix": 32},
        }

    def write_config(self) -> None:
        """(Re)write C{pullmail.toml} from C{self.settings}; restart to apply."""
        self.config_path.write_text(toml_dumps(self.settings), "utf-8")

    def configure(self, settings: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge C{settings} into the config file (takes effect on restart)."""
        self.settings = merge_settings(self.settings, settings)
        self.write_config()

    @property
    def aliases_path(self) -> Path:
        return self.dir / self.settings["accounts"]["aliases"]

    @property
    def state_dir(self) -> Path:
        return self.dir / self.settings["node"]["state_dir"]

    @property
    def tls_certificate(self) -> Path:
        """The node's certificate (self-signed, made at first start by default)."""
        return self.dir / self.settings.get("tls", {}).get("certificate", "var/tls/cert.pem")

    def write_aliases(self, text: str) -> None:
        if text and not text.endswith("\n"):
            text += "\n"
        self.aliases_path.write_text(text, "utf-8")

    def cli(
        self, *args: str, input: bytes | str | None = None, check: bool = True,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess:
        """
        Run C{python -m pullmail.node.cli ARGS --config <this node's config>}
        (the C{pullmail} operator command).  With C{check}, a non-zero exit
        raises L{NodeError} with its output.
        """
        if isinstance(input, str):
            input = input.encode("utf-8")
        command, rest = args[0], list(args[1:])
        argv = [PYTHON, "-m", "pullmail.node.cli", command, "--config", str(self.config_path)]
        result = subprocess.run(
            argv + rest,
            cwd=REPO,
            env=self.environment(),
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise NodeError(
                f"{' '.join(argv + rest)} exited {result.returncode}:\n"
                f"{result.stdout.decode(errors='replace')}"
                f"{result.stderr.decode(errors='replace')}"
            )
        return result

    def environment(self) -> dict[str, str]:
        """The environment of this node's twistd and C{pullmail} commands."""
        return _environment(self.pythonpath, self.extra_env)

    def add_user(self, address: str, password: str) -> None:
        """C{printf PASSWORD | pullmail adduser --config CONFIG ADDRESS}."""
        self.cli("adduser", address, input=password)

    # process

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running() else None

    def argv(self) -> list[str]:
        # Not "python -m twisted": that is the "twist" runner, which has no
        # -n, --pidfile or --logfile.  This is the twistd console script.
        return [
            PYTHON, "-c", TWISTD, "-n", "--pidfile=",
            f"--logfile={self.log_path}",
            "pullmail", "--config", str(self.config_path),
        ]

    def start(self, timeout: float = START_TIMEOUT) -> "Node":
        """
        Start twistd and wait until the MX service on C{address:2525}
        greets with C{220}.  On failure the process is killed and the
        error shows the end of the node's log and output.
        """
        if self.running():
            raise NodeError(f"{self!r} is already running")
        host, port = self.mx_endpoint
        if accepts(host, port):
            raise NodeError(
                f"something already listens on {host}:{port}; "
                "a node of another test still running?"
            )
        self.process = _Process(self.argv(), REPO, self.output_path, self.environment())
        deadline = time.monotonic() + timeout
        while not _greets(host, port):
            if not self.process.running():
                code = self.process.kill()
                raise NodeError(f"{self.name} exited {code} at start\n{self.diagnostics()}")
            if time.monotonic() >= deadline:
                self.process.kill()
                raise NodeError(
                    f"{self.name} did not greet on {host}:{port} "
                    f"within {timeout}s\n{self.diagnostics()}"
                )
            time.sleep(0.05)
        return self

    @property
    def mx_endpoint(self) -> tuple[str, int]:
        """(address, port) of the first C{[listen] smtp} endpoint: the readiness probe."""
        endpoints = self.settings.get("listen", {}).get("smtp") or []
        for endpoint in endpoints:
            match = re.fullmatch(r"tcp:(?:port=)?(\d+)(?::.*)?", endpoint)
            if match:
                interface = re.search(r"interface=([^:]+)", endpoint)
                return (interface.group(1) if interface else "127.0.0.1", int(match.group(1)))
        return self.address, SMTP_PORT

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait (SIGKILL after C{timeout}); the exit status."""
        if self.process is None:
            return None
        code = self.process.terminate(timeout)
        self.process.kill()  # reaps and forgets
        return code

    def kill(self) -> int | None:
        """SIGKILL and wait: a crash, as far as the node can tell."""
        if self.process is None:
            return None
        return self.process.kill()

    def restart(self, timeout: float = START_TIMEOUT) -> "Node":
        self.stop()
        return self.start(timeout)

    def signal(self, signum: int) -> None:
        if self.process is not None:
            self.process.signal(signum)

    close = kill

    def __enter__(self) -> "Node":
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()

    # logs

    def log_text(self) -> str:
        """The node's log, rotated parts (node.log.N) first."""
        parts = sorted(
            self.dir.glob("node.log.*"),
            key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
            reverse=True,
        )
        text = []
        for path in parts + [self.log_path]:
            with contextlib.suppress(OSError):
                text.append(path.read_text("utf-8", "replace"))
        return "".join(text)

    def output_text(self) -> str:
        """What twistd wrote to stdout/stderr (tracebacks before logging)."""
        with contextlib.suppress(OSError):
            return self.output_path.read_text("utf-8", "replace")
        return ""

    def wait_log(self, pattern: str, timeout: float = 5.0) -> re.Match:
        """Wait until the log matches the regular expression C{pattern}."""
        regex = re.compile(pattern)
        return wait_until(
            lambda: regex.search(self.log_text()),
            timeout,
            message=lambda: f"{pattern!r} in {self.name}'s log:\n{self.diagnostics()}",
        )

    def diagnostics(self, lines: int = 40) -> str:
        return (
            f"--- {self.log_path} (tail) ---\n{_tail(self.log_path, lines)}\n"
            f"--- {self.output_path} (tail) ---\n{_tail(self.output_path, lines)}"
        )

    # mail

    def maildir(self, address: str) -> Path:
        """C{<state_dir>/mail/<domain>/<localpart>} for C{address}."""
        local, _, domain = address.rpartition("@")
        return self.state_dir / "mail" / domain / local

    def delivered_paths(self, address: str) -> list[Path]:
        """The files in the maildir's new/ and cur/, sorted by file name."""
        maildir = self.maildir(address)
        paths = [
            p for sub in ("new", "cur") if (maildir / sub).is_dir()
            for p in (maildir / sub).iterdir() if p.is_file()
        ]
        return sorted(paths, key=lambda p: p.name)

    def delivered(self, address: str) -> list[bytes]:
        """The contents of the messages in the maildir, sorted by file name."""
        return [p.read_bytes() for p in self.delivered_paths(address)]

    def wait_delivered(self, address: str, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Wait until C{address} holds at least C{count} messages; return them."""
        wait_until(
            lambda: len(self.delivered_paths(address)) >= count,
            timeout,
            message=lambda: f"{count} message(s) for {address} on {self.name}\n"
            + self.diagnostics(),
        )
        return self.delivered(address)

    def mail_snapshot(self) -> "Snapshot":
        """Every file under C{<state_dir>/mail}, to compare with a later one."""
        return Snapshot.take(self.state_dir / "mail")

    def state_snapshot(self) -> "Snapshot":
        """
        Every file under C{state_dir} but the TLS keys: mail, outbox, queue,
        pending notifications.  A refused message must change none of it.
        """
        return Snapshot.take(self.state_dir, exclude=("tls",))


class Snapshot:
    """The files under a folder at one moment: relative path -> bytes."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        self.root = root
        self.files = files

    @classmethod
    def take(cls, root: Path, exclude: Iterable[str] = ()) -> "Snapshot":
        """C{exclude}: top-level names under C{root} to leave out."""
        exclude = set(exclude)
        files = {}
        if root.is_dir():
            for path in root.rglob("*"):
                relative = path.relative_to(root)
                if relative.parts[0] in exclude:
                    continue
                with contextlib.suppress(OSError):
                    if path.is_file():
                        files[relative.as_posix()] = path.read_bytes()
        return cls(root, files)

    def new_since(self, earlier: "Snapshot") -> dict[str, bytes]:
        """Files present now and not (or different) then."""
        return {
            name: data for name, data in self.files.items()
            if earlier.files.get(name) != data
        }

    def changes_since(self, earlier: "Snapshot") -> dict[str, str]:
        """Every difference, as path -> "added" / "changed" / "removed"."""
        changes = {}
        for name, data in self.files.items():
            if name not in earlier.files:
                changes[name] = "added"
            elif earlier.files[name] != data:
                changes[name] = "changed"
        for name in earlier.files:
            if name not in self.files:
                changes[name] = "removed"
        return changes


# -- SMTP clients ---------------------------------------------------------------


def smtp(
    node: Node | str, port: int = SMTP_PORT, timeout: float = 10.0,
    local_hostname: str = "client.outside.test", source: str | None = None,
) -> smtplib.SMTP:
    """An C{smtplib.SMTP} connected to C{node} (a Node or an address)."""
    address = node.address if isinstance(node, Node) else node
    return smtplib.SMTP(
        address, port, local_hostname=local_hostname, timeout=timeout,
        source_address=(source, 0) if source else None,
    )


def submit(
    node: Node | str, user: str, password: str, recipients: Iterable[str],
    message: bytes, sender: str | None = None, port: int = SUBMISSION_PORT,
    timeout: float = 30.0,
) -> dict:
    """
    Submit C{message} as an authenticated user: connect to the submission
    port, STARTTLS (certificate not verified: nodes use self-signed ones),
    AUTH, MAIL FROM C{sender} (default: C{user}).  Returns smtplib's refused
    recipients (C{{}} when all were accepted).
    """
    import ssl

    address = node.address if isinstance(node, Node) else node
    with smtplib.SMTP(address, port, local_hostname="client.submit.test",
                      timeout=timeout) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(user, password)
        refused = client.sendmail(sender or user, list(recipients), message)
        client.quit()
    return refused


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)")


class RawSMTP:
    """
    An SMTP client that sends exactly the bytes it is given and parses the
    replies strictly, so tests can speak malformed, pipelined or smuggled
    SMTP.  Every read is bounded by C{timeout}.

    The constructor reads the greeting into C{self.greeting} unless
    C{greeting=False}.
    """

    def __init__(
        self, address: str, port: int = SMTP_PORT, timeout: float = 10.0,
        source: str | None = None, greeting: bool = True,
    ) -> None:
        self.address = address
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection(
            (address, port), timeout=timeout,
            source_address=(source, 0) if source else None,
        )
        self.buffer = b""
        self.closed = False  # the peer closed
        self.transcript: list[tuple[str, bytes]] = []
        self.greeting = self.read_reply() if greeting else None

    def __enter__(self) -> "RawSMTP":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.transcript.append(("C", data))
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read more into the buffer; False at end of stream."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(self._timeout_message())
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError(self._timeout_message()) from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.transcript.append(("S", chunk))
        self.buffer += chunk
        return True

    def _timeout_message(self) -> str:
        return (
            f"no complete reply from {self.address}:{self.port} within "
            f"{self.timeout}s; buffered {self.buffer!r}; transcript tail "
            f"{self.transcript[-6:]!r}"
        )

    def read_line(self, timeout: float | None = None) -> bytes:
        """One line, without its CRLF; ConnectionError at end of stream."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\r\n" not in self.buffer:
            if not self._fill(deadline):
                raise ConnectionError(
                    f"connection closed; unterminated data {self.buffer!r}"
                )
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read_reply(self, timeout: float | None = None) -> tuple[int, list[str]]:
        """
        One complete reply (RFC 5321 4.2): C{(code, texts)} where C{texts}
        holds each line's text after C{"250-"} / C{"250 "}.  A line that is
        not a reply line, or a code that changes within one reply, raises
        C{AssertionError}.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        code, texts = None, []
        while True:
            line = self.read_line(max(0.0, deadline - time.monotonic()))
            match = _REPLY_LINE.fullmatch(line) or (
                re.fullmatch(rb"[2-5][0-9][0-9]", line) and _REPLY_LINE.fullmatch(line + b" ")
            )
            if not match:
                raise AssertionError(f"not an SMTP reply line: {line!r}")
            this = int(match.group(1))
            if code is not None and this != code:
                raise AssertionError(f"reply code changed from {code} to {this} in {line!r}")
            code = this
            texts.append(match.group(3).decode("utf-8", "replace"))
            if match.group(2) == b" ":
                return code, texts

    def read_replies(self, n: int, timeout: float | None = None) -> list[tuple[int, list[str]]]:
        return [self.read_reply(timeout) for _ in range(n)]

    def command(self, line: str | bytes, timeout: float | None = None) -> tuple[int, list[str]]:
        """Send C{line} + CRLF, read one reply."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.read_reply(timeout)

    def expect(self, line: str | bytes, code: int) -> list[str]:
        """Send C{line}, and fail unless the reply has C{code}; its texts."""
        got, texts = self.command(line)
        assert got == code, (line, got, texts)
        return texts

    def ehlo(self, name: str = "client.outside.test") -> tuple[int, list[str]]:
        code, texts = self.command(f"EHLO {name}")
        if code != 250:
            raise AssertionError(f"EHLO got {code} {texts}")
        return code, texts

    def starttls(self, context=None, server_hostname: str | None = None) -> tuple[int, list[str]]:
        """
        C{STARTTLS}; on C{220} wrap the socket in TLS (by default without
        verifying the certificate: nodes use self-signed ones) and forget
        anything buffered before the handshake.  Returns the reply.
        """
        import ssl

        code, texts = self.command("STARTTLS")
        if code == 220:
            context = context or ssl._create_unverified_context()
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
            self.buffer = b""
        return code, texts

    def pending(self, wait: float = 0.3) -> bytes:
        """
        Whatever the server sends within C{wait} seconds, beyond what has
        been read (b"" when it stays silent; also b"" if it closed).
        """
        deadline = time.monotonic() + wait
        with contextlib.suppress(TimeoutError):
            while not self.closed and self._fill(deadline):
                pass
        data, self.buffer = self.buffer, b""
        return data

    def assert_silent(self, wait: float = 0.3) -> None:
        """Fail if the server sends anything more within C{wait} seconds."""
        extra = self.pending(wait)
        if extra:
            raise AssertionError(f"unexpected extra data from server: {extra!r}")

    def expect_closed(self, timeout: float | None = None) -> None:
        """
        Wait for the server to close the connection; fail if it sends any
        data first, or is still open after C{timeout}.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            raise AssertionError(
                f"connection still open after {self.timeout if timeout is None else timeout}s"
            ) from None
        except OSError:
            pass
        if self.buffer:
            raise AssertionError(f"data before close: {self.buffer!r}")

    def sendmail(self, sender: str, recipients: Iterable[str], message: bytes) -> tuple[int, list[str]]:
        """
        A whole transaction, one command at a time, with C{message} sent as
        is after DATA (already CRLF, already dot-stuffed, without the final
        dot).  Returns the reply to end of data; any other non-2xx/354
        reply raises C{AssertionError}.
        """
        for line in [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in recipients]:
            code, texts = self.command(line)
            if code != 250:
                raise AssertionError(f"{line} -> {code} {texts}")
        code, texts = self.command("DATA")
        if code != 354:
            raise AssertionError(f"DATA -> {code} {texts}")
        self.send(message + b".\r\n")
        return self.read_reply()


# -- fake peers -------------------------------------------------------------------


class ScriptedPeer(threading.Thread):
    """
    A loopback listener a test runs in a thread, taking one connection at a
    time: a subclass says in C{handle} what happens on each.  A handler that
    finds the node off its script raises AssertionError; that, and broken
    connections, are kept in C{errors}.  Start with C{start()}; C{close()}
    stops the thread and the listener.
    """

    def __init__(self, address: str, port: int = SMTP_PORT) -> None:
        super().__init__(daemon=True, name=f"{type(self).__name__}-{address}:{port}")
        self.address = address
        self.port = port
        self.errors: list[str] = []
        self._sock = socket.create_server((address, port), backlog=128)
        self._sock.settimeout(0.1)
        self._stopped = threading.Event()

    def handle(self, conn: socket.socket, source: tuple[str, int]) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, source = self._sock.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    self.handle(conn, source)
                except (OSError, AssertionError) as e:
                    self.errors.append(repr(e))

    def close(self) -> None:
        self._stopped.set()
        self.join(5)
        with contextlib.suppress(OSError):
            self._sock.close()


class ConnectionCounter(ScriptedPeer):
    """
    Counts (and records the source of) every connection, says nothing and
    closes it: a victim that must never be contacted.  A context manager,
    started at once; the thread stops at exit.
    """

    def __init__(self, address: str, port: int = SMTP_PORT) -> None:
        super().__init__(address, port)
        self.sources: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.start()

    def handle(self, conn: socket.socket, source: tuple[str, int]) -> None:
        with self._lock:
            self.sources.append(source)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.sources)

    def __enter__(self) -> "ConnectionCounter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SilentUDP:
    """
    A UDP socket bound on C{address} (a free port) that receives and never
    answers: a nameserver that times out.  C{nameserver} is "host:port".
    """

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.address, self.port = self.sock.getsockname()[:2]

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    def received(self) -> int:
        """How many datagrams arrived (and were dropped) so far."""
        count = 0
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError, OSError):
            while True:
                self.sock.recv(65536)
                count += 1
        return count

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> "SilentUDP":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# -- DNS --------------------------------------------------------------------------


class DNSServer:
    """
    C{tests/integration/dnsserver.py} as a subprocess on C{address:port},
    UDP and TCP, authoritative for every name, serving C{records}
    (see that module for the format).  C{update(records)} rewrites the zone
    file, sends SIGHUP and returns once the new records are served.
    """

    SCRIPT = Path(__file__).with_name("dnsserver.py")

    def __init__(
        self, workdir: Path, records: Mapping[str, Any], port: int,
        address: str = "127.0.0.1", ttl: int = 60,
    ) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = address
        self.port = port
        self.ttl = ttl
        self.zone_path = self.dir / f"zone-{port}.json"
        self.ready_path = self.dir / f"zone-{port}.ready"
        self.output_path = self.dir / f"dnsserver-{port}.log"
        self.serial = 0
        self.records: dict[str, Any] = dict(records)
        self.process: _Process | None = None
        self._write()

    @property
    def nameserver(self) -> str:
        """C{"127.0.0.1:PORT"}, for a node's C{[dns] nameservers}."""
        return f"{self.address}:{self.port}"

    def _write(self) -> None:
        document = dict(self.records)
        document["$serial"] = self.serial
        tmp = self.zone_path.with_name(self.zone_path.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=1), "utf-8")
        os.replace(tmp, self.zone_path)

    def _loaded_serial(self) -> int | None:
        try:
            return int(self.ready_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _wait_serial(self, serial: int, timeout: float) -> None:
        def check():
            if self.process is None or not self.process.running():
                raise NodeError(f"dnsserver exited\n{_tail(self.output_path)}")
            return self._loaded_serial() == serial

        try:
            wait_until(check, timeout, message=f"dnsserver to load serial {serial}")
        except AssertionError as e:
            raise NodeError(f"{e}\n{_tail(self.output_path)}") from None

    def start(self, timeout: float = 10.0) -> "DNSServer":
        if self.process is not None and self.process.running():
            raise NodeError("dnsserver already running")
        with contextlib.suppress(FileNotFoundError):
            self.ready_path.unlink()
        self.process = _Process(
            [
                PYTHON, str(self.SCRIPT),
                "--listen", f"{self.address}:{self.port}",
                "--zone-file", str(self.zone_path),
                "--ttl", str(self.ttl),
                "--ready-file", str(self.ready_path),
            ],
            REPO,
            self.output_path,
        )
        self._wait_serial(self.serial, timeout)
        return self

    def update(self, records: Mapping[str, Any], timeout: float = 10.0) -> None:
        """Serve C{records} instead: rewrite, SIGHUP, wait for the reload."""
        self.records = dict(records)
        self.serial += 1
        self._write()
        if self.process is not None and self.process.running():
            self.process.signal(signal.SIGHUP)
            self._wait_serial(self.serial, timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate(5.0)
            self.process.kill()

    close = stop

    def __enter__(self) -> "DNSServer":
        if self.process is None or not self.process.running():
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is not None:
            self.process.kill()


class NodeFactory:
    """Makes L{Node}s under one folder and kills them all at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[Node] = []

    def __call__(self, name: str, address: str, domains, hostname: str,
                 start: bool = True, **kwargs) -> Node:
        node = Node(self.workdir, name, address, domains, hostname, **kwargs)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.kill()

    def for_domain(self, name: str, address: str, domain: str, users: Iterable[str] = (),
                   password: str = "", base: Mapping | None = None,
                   dns: "DNSServer | None" = None, settings: Mapping | None = None,
                   start: bool = True) -> Node:
        """
        A node for one C{domain} (host name mx.<domain>) whose C{users}
        share C{password}, on C{base} settings plus C{settings}, resolving
        through C{dns}.
        """
        resolver = {"dns": {"nameservers": [dns.nameserver] if dns else [], "timeout": "2s"}}
        return self(name, address, [domain], f"mx.{domain}", start=start,
                    users={u: password for u in users},
                    settings=merge_settings(base, resolver, settings))

