"""
Shared pieces of the benchmarks: process accounting from /proc, the servers
under test (pullmail via the integration harness, aiosmtpd, a private
Postfix, smtp-sink), load generators (smtp-source and a small asyncio SMTP
client) and a byte-counting TCP proxy.

Every address used here is in 127.0.1.1 .. 127.0.1.50.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from tests.integration.harness import DNSServer, Node, accepts, wait_until  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
SMTP_SOURCE = shutil.which("smtp-source", path="/usr/sbin:/usr/bin") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin") or "/usr/sbin/smtp-sink"
BENCH_VENV = Path(os.environ.get("PULLMAIL_BENCH_VENV", "/tmp/pullmail-bench-venv"))
PASSWORD = "bench-password-1"

# Addresses (all of ours are in 127.0.1.1 .. 127.0.1.50)
DNS_IP = "127.0.1.1"
GD_SENDER_IP = "127.0.1.2"
GD_RECEIVER_IP = "127.0.1.3"
NOTIFY_NODE_IP = "127.0.1.4"
NOTIFY_CLIENT_IP = "127.0.1.5"
WIRE_SENDER_IP = "127.0.1.6"
WIRE_RECEIVER_IP = "127.0.1.7"
STARTUP_IP = "127.0.1.8"
PULLMAIL_IP = "127.0.1.10"
AIOSMTPD_IP = "127.0.1.11"
POSTFIX_IP = "127.0.1.12"
SINK_IP = "127.0.1.13"
AIOSMTPD_INLINE_IP = "127.0.1.14"
FLOOR_IP = "127.0.1.15"
FEATURES_IP = "127.0.1.17"        # a second pullmail node, all features on
SPAM_MX_IP = "127.0.1.16"        # the MX of spam.bench (SPF -all): a listener that counts
SPAM_CLIENT_IPS = [f"127.0.4.{i}" for i in range(1, 21)]   # where its GDELs come from
IDLE_CLIENT_IPS = [f"127.0.1.{i}" for i in range(30, 40)]


# -- /proc --------------------------------------------------------------------------

def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime (and cutime+cstime with C{children}) of C{pid}, seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK


def status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (by /proc PPid)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = (entry / "stat").read_text()
                ppid = int(text[text.rindex(")") + 2:].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, []))
    return found


class RSSSampler:
    """Samples the summed VmRSS of C{server.pids()} every C{interval} s."""

    def __init__(self, server, interval: float = 0.25) -> None:
        self.server, self.interval = server, interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(pss_kb(p) for p in self.server.pids()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, sum(pss_kb(p) for p in self.server.pids()))


def pss_kb(pid: int) -> int:
    """Proportional set size (shared pages split between their users), else VmRSS."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return status_kb(pid, "VmRSS")


def count_files(folder: Path) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for _ in it)
    except OSError:
        return 0


# -- statistics ---------------------------------------------------------------------

def summary(values: list[float]) -> tuple[float, float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return (float("nan"),) * 3
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], digits: int = 0) -> str:
    med, lo, hi = summary(values)
    if med != med:
        return "n/a"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    out = [f"\n### {title}\n", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def ratio_value(a: list[float], b: list[float]) -> float | None:
    """The ratio of the medians, None when either is missing."""
    ma, mb = summary(a)[0], summary(b)[0]
    if not mb or mb != mb or ma != ma:
        return None
    return ma / mb


def ratio(a: list[float], b: list[float]) -> str:
    value = ratio_value(a, b)
    return "n/a" if value is None else f"{value:.2f}×"


# -- servers ------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """C{pid} and its descendants (a pullmail node and its fsync helper)."""
    found = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            found.extend(process_tree(int(child)))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of C{pid} and its live descendants."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


class Server:
    name = "?"
    address = "?"
    port = 2525

    def pids(self) -> list[int]:
        raise NotImplementedError

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def delivered(self) -> int:
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def dns_server(workdir: Path, records: dict | None = None) -> DNSServer:
    return DNSServer(workdir / "dns", records or gd_records(), port=5353, address=DNS_IP, ttl=3600)


def gd_records() -> dict:
    def host(domain, ip):
        return {
            domain: {"A": [ip], "MX": [[10, f"mx.{domain}"]], "TXT": [f"v=spf1 ip4:{ip} -all"]},
            f"mx.{domain}": {"A": [ip]},
        }
    records = {}
    for domain, ip in [("s.bench", GD_SENDER_IP), ("r.bench", GD_RECEIVER_IP),
                       ("n.bench", NOTIFY_NODE_IP), ("spf.bench", NOTIFY_CLIENT_IP),
                       ("ws.bench", WIRE_SENDER_IP), ("wr.bench", WIRE_RECEIVER_IP),
                       ("bench.test", PULLMAIL_IP)]:
        records.update(host(domain, ip))
    # A sender whose SPF fails everywhere: the flood section's GDELs.
    records["spam.bench"] = {"MX": [[10, "mx.spam.bench"]], "TXT": ["v=spf1 -all"]}
    records["mx.spam.bench"] = {"A": [SPAM_MX_IP]}
    return records


def pullmail_node(workdir: Path, name: str, address: str, domain: str, users: list[str],
                  settings: dict | None = None, dns: DNSServer | None = None,
                  smtp_port: int = 2525) -> Node:
    base = {
        "limits": {"connections": 19000, "connections_per_ip": 19000, "idle_timeout": "10m",
                   "message_size": "50MB", "pending_per_origin": 10_000_000,
                   "retrievals_per_minute": 100_000},
        "delivery": {"connect_timeout": "5s", "push_retry": ["1s", "2s"]},
        "retrieval": {"schedule": ["0s", "1s", "2s", "5s"]},
    }
    if dns is not None:
        base["dns"] = {"nameservers": [dns.nameserver], "timeout": "3s"}
    # Twisted's default listen backlog (50) drops handshakes under connection
    # bursts (the client thinks it is connected and waits for a greeting that
    # never comes): ask for a real one, as Postfix and aiosmtpd have.
    base["listen"] = {
        "smtp": [f"tcp:{smtp_port}:interface={address}:backlog=1024"],
        "submission": [f"tcp:2587:interface={address}:backlog=1024"],
        "submissions": [f"tcp:2465:interface={address}:backlog=1024"],
    }
    for section, values in (settings or {}).items():
        base.setdefault(section, {}).update(values)
    node_dir = workdir / name
    if node_dir.exists():
        shutil.rmtree(node_dir)
    return Node(workdir, name, address, [domain], f"mx.{domain}",
                users={u: PASSWORD for u in users}, settings=base)


def gd_pair(workdir: Path, dns: DNSServer, prefix: str = "gd") -> tuple[Node, Node]:
    """
    The two nodes of General Delivery end to end: a sender (s.bench, alice)
    and a receiver (r.bench, bob), on GD_SENDER_IP and GD_RECEIVER_IP.
    """
    sender = pullmail_node(workdir, f"{prefix}-sender", GD_SENDER_IP, "s.bench", ["alice@s.bench"],
                           dns=dns)
    receiver = pullmail_node(workdir, f"{prefix}-receiver", GD_RECEIVER_IP, "r.bench",
                             ["bob@r.bench"], dns=dns)
    return sender, receiver


def restart_as(receiver: Node, mode: str) -> None:
    """(Re)start C{receiver} offering General Delivery ("pull") or not ("push")."""
    receiver.configure({"trust": {"gdel": mode == "pull"}})
    if receiver.running():
        receiver.stop()
    receiver.start()


class PullmailServer(Server):
    name = "pullmail"

    def __init__(self, workdir: Path, dns: DNSServer | None, env: dict | None = None,
                 name: str = "pullmail", address: str = PULLMAIL_IP,
                 settings: dict | None = None) -> None:
        self.name, self.address = name, address
        self.node = pullmail_node(workdir, name, address, "bench.test", ["sink@bench.test"],
                                  dns=dns, settings=settings)
        if env:
            self.node.extra_env.update(env)
        self.rcpt = "sink@bench.test"

    def start(self):
        self.node.start(timeout=60)

    def stop(self):
        self.node.stop()

    def pids(self):
        return process_tree(self.node.pid) if self.node.pid else []

    def delivered(self):
        return count_files(self.node.maildir(self.rcpt) / "new")


class ScriptServer(Server):
    """
    A peer script from bench/peers/ run as its own process (its CPU is that
    process's), storing into C{<workdir>/<name>/Maildir}; it prints "ready".
    """

    script = "?"

    def __init__(self, workdir: Path, python: Path, flags: tuple[str, ...] = ()) -> None:
        self.dir = workdir / self.name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.maildir = self.dir / "Maildir"
        self.rcpt = f"sink@{self.name}.bench"
        self.python, self.flags = python, flags
        self.proc = None

    def start(self):
        if not self.python.exists():
            raise RuntimeError(f"{self.python} missing: run bench/setup")
        self.proc = subprocess.Popen(
            [str(self.python), str(BENCH / "peers" / self.script),
             "--listen", f"{self.address}:{self.port}", "--maildir", str(self.maildir),
             *self.flags],
            stdout=subprocess.PIPE, stderr=open(self.dir / "stderr.log", "ab"),
            start_new_session=True,
        )
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"{self.name} did not start: {(self.dir / 'stderr.log').read_text()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()        # nothing to save: its maildir is thrown away
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def pids(self):
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def delivered(self):
        return count_files(self.maildir / "new")


class AiosmtpdServer(ScriptServer):
    """aiosmtpd, its disk work in a 4-thread pool (bench/peers/aiosmtpd_maildir.py)."""
    name = "aiosmtpd-pool"
    address = AIOSMTPD_IP
    script = "aiosmtpd_maildir.py"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, BENCH_VENV / "bin" / "python")


class AiosmtpdInlineServer(AiosmtpdServer):
    """The same, fsync inline in the event loop (--inline)."""
    name = "aiosmtpd-inline"
    address = AIOSMTPD_INLINE_IP

    def __init__(self, workdir: Path) -> None:
        ScriptServer.__init__(self, workdir, BENCH_VENV / "bin" / "python", ("--inline",))


class FloorServer(ScriptServer):
    """The floor: a minimal Twisted ESMTP server (bench/peers/floor_twisted.py)."""
    name = "floor"
    address = FLOOR_IP
    script = "floor_twisted.py"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, Path(sys.executable))


class SinkServer(Server):
    name = "smtp-sink"

    def __init__(self, workdir: Path) -> None:
        self.address = SINK_IP
        self.dir = workdir / "sink"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rcpt = "sink@sink.bench"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", f"{self.address}:{self.port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "ab"),
            start_new_session=True,
        )
        wait_until(lambda: accepts(self.address, self.port), 10, message="smtp-sink to listen")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pids(self):
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def delivered(self):
        return None  # stores nothing


class PostfixServer(Server):
    """Postfix from Debian, a private instance with virtual(8) maildir delivery."""
    name = "postfix"

    def __init__(self, workdir: Path) -> None:
        from tests.integration.postfix import (
            PostfixInstance,
            make_workdir,
            postfix_unavailable,
        )

        why = postfix_unavailable()
        if why:
            raise RuntimeError(why)
        self.address = POSTFIX_IP
        self.rcpt = "sink@postfix.bench"
        self.instance = PostfixInstance(
            make_workdir("pullmail-bench-postfix-"), self.address, self.port, "postfix.bench",
            mailboxes=[self.rcpt], tls=False,
            extra_main={
                "default_process_limit": "200",
                "smtpd_client_connection_count_limit": "0",
                "smtpd_client_connection_rate_limit": "0",
                "smtpd_client_message_rate_limit": "0",
                "virtual_destination_concurrency_limit": "20",
                "smtpd_tls_security_level": "none",
                "message_size_limit": "60000000",
                "virtual_mailbox_limit": "0",
                "smtpd_recipient_restrictions": "permit",
            },
        )

    def start(self):
        self.instance.start()

    def stop(self):
        self.instance.stop()
        shutil.rmtree(self.instance.workdir, ignore_errors=True)

    def pids(self):
        return self.instance.processes()

    def cpu(self):
        master = self.instance.master_pid()
        total = sum(cpu_seconds(p) for p in self.pids() if p != master)
        if master:
            total += cpu_seconds(master, children=True)  # reaped children included
        return total

    def delivered(self):
        return count_files(self.instance.maildir(self.rcpt) / "new")


# -- load -----------------------------------------------------------------------------

def smtp_source(server: Server, sessions: int, size: int, count: int, timeout: float = 600,
                path: Path | None = None, options: tuple[str, ...] = ()):
    """
    Run smtp-source (a message of C{size} octets, or the file C{path};
    with C{options}, e.g. ``-d``); returns wall seconds.  Raises on failure.
    """
    message = ["-F", str(path)] if path else ["-l", str(size)]
    argv = [SMTP_SOURCE, *options, "-s", str(sessions), *message, "-m", str(count),
            "-f", "load@source.bench", "-t", server.rcpt, "-M", "source.bench",
            f"{server.address}:{server.port}"]
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, timeout=timeout)
    elapsed = time.monotonic() - start
    if result.returncode != 0 or result.stderr.strip():
        raise RuntimeError(f"smtp-source against {server.name}: rc={result.returncode} "
                           f"{result.stderr.decode(errors='replace')[-800:]}")
    return elapsed


def measure_push(server, sessions: int, size: int, count: int, path: Path | None = None) -> dict:
    """One smtp-source run against C{server}, drained: msgs/s, MB/s, CPU ms/msg, peak PSS."""
    before = server.delivered()
    cpu0 = server.cpu()
    with RSSSampler(server) as rss:
        elapsed = smtp_source(server, sessions, size, count, path=path)
        if before is not None:  # drain (Postfix delivers after its 250)
            wait_until(lambda: server.delivered() >= before + count, 120,
                       message=f"{server.name} to store {count}")
    cpu = server.cpu() - cpu0
    return {"msgs": count / elapsed, "mb": count * size / elapsed / 1e6,
            "cpu": cpu / count * 1000, "rss": rss.peak_kb / 1024}


class SMTPClient:
    """A tiny asyncio SMTP client: enough for submission, GDEL and idle sessions."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.keywords: set[str] = set()

    @classmethod
    async def connect(cls, host, port, source=None, greeting=True):
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None, limit=1 << 20)
        client = cls(reader, writer)
        if greeting:
            await client.reply()
        return client

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines).decode(errors="replace")

    async def command(self, line: str, expect: int | tuple = None) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n")
        code, text = await self.reply()
        if expect is not None and code not in ((expect,) if isinstance(expect, int) else expect):
            raise RuntimeError(f"{line!r} -> {text!r}")
        return code, text

    @classmethod
    async def submission(cls, node: Node, user: str) -> "SMTPClient":
        """A session on C{node}'s submission port, after STARTTLS and AUTH as C{user}."""
        client = await cls.connect(node.address, 2587)
        await client.ehlo("client.submit.bench")
        await client.starttls()
        await client.ehlo("client.submit.bench")
        await client.login(user, PASSWORD)
        return client

    async def ehlo(self, name="client.bench"):
        code, text = await self.command(f"EHLO {name}", 250)
        self.keywords = {l[4:].split()[0].upper() for l in text.splitlines() if len(l) > 4}

    async def starttls(self):
        await self.command("STARTTLS", 220)
        context = ssl._create_unverified_context()
        await self.writer.start_tls(context)

    async def login(self, user, password):
        import base64
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.command(f"AUTH PLAIN {token}", 235)

    async def sendmail(self, sender, rcpt, data: bytes):
        await self.command(f"MAIL FROM:<{sender}>", 250)
        await self.command(f"RCPT TO:<{rcpt}>", 250)
        await self.command("DATA", 354)
        self.writer.write(data + b".\r\n")
        code, text = await self.reply()
        if code != 250:
            raise RuntimeError(f"end of data -> {text!r}")

    async def quit(self):
        with contextlib.suppress(Exception):
            await self.command("QUIT")
        self.writer.close()


def make_message(size: int, tag: str = "") -> bytes:
    """A message of about C{size} bytes, CRLF lines of 76 characters."""
    head = (f"From: alice@s.bench\r\nTo: bob@r.bench\r\nSubject: bench {tag}\r\n"
            f"Message-ID: <{secrets.token_hex(8)}@bench>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def dkim_messages(workdir: Path, dns: DNSServer):
    """
    A 2 KB message from dkim.bench, plain and signed (both algorithms) by
    its keys, as files for smtp-source -F; the key and DMARC (p=none)
    records go into C{dns}.  (files by name, the signer, the plain message,
    the keys.)
    """
    from twisted.internet.task import Clock

    from pullmail.config import DKIMConfig
    from pullmail.trust.dkim import Signer
    from pullmail.trust.dkim_keys import ensure_keys, load_keys

    config = DKIMConfig(key_dir=workdir / "dkim-keys")
    ensure_keys(config, ["dkim.bench"])
    keys = load_keys(config, ["dkim.bench"])
    records = dict(dns.records)
    records.update({k.record_name.rstrip("."): {"TXT": [k.record_value]} for k in keys["dkim.bench"]})
    records["_dmarc.dkim.bench"] = {"TXT": ["v=DMARC1; p=none"]}   # unsigned passes too
    dns.update(records)
    plain = make_message(2048).replace(b"alice@s.bench", b"alice@dkim.bench")
    signer = Signer(keys, Clock())
    files = {}
    for name, data in (("unsigned", plain), ("signed", b"".join(signer.sign([plain])))):
        files[name] = workdir / f"dkim-{name}.eml"
        files[name].write_bytes(data.replace(b"\r\n", b"\n"))     # smtp-source adds CR
    return files, signer, plain, keys


# -- a byte-counting proxy ---------------------------------------------------------------

class CountingProxy:
    """
    Listens on C{listen} and forwards to C{target}, connecting out *from the
    client's own source address* so the server still sees the real peer
    (SPF, destined-host checks).  Counts bytes both ways, connections, and
    round trips: how often the flow turns from client->server to
    server->client (a reply after a request).
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self.reset()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def reset(self):
        self.up = self.down = self.connections = self.turns = 0
        self.open = getattr(self, "open", 0)   # connections not closed yet (not reset)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, *self.listen, reuse_address=True))
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        source = writer.get_extra_info("peername")[0]
        try:
            r2, w2 = await asyncio.open_connection(*self.target, local_addr=(source, 0))
        except OSError:
            writer.close()
            return
        self.connections += 1
        self.open += 1
        state = {"last": None}

        async def pipe(src, dst, up: bool):
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                        if state["last"] == "up":
                            self.turns += 1
                    state["last"] = "up" if up else "down"
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        try:
            await asyncio.gather(pipe(reader, w2, True), pipe(r2, writer, False))
        finally:
            self.open -= 1

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def private_postgres(log, section: str):
    """
    A private, durable PostgreSQL cluster for a section (SPEC 11.3), made
    and started; None (the section skipped, said in the log) without the
    binaries.
    """
    from tests.integration.harness import free_port
    from tests.pg import PostgresCluster, find_binaries

    binaries = find_binaries()
    if binaries is None:
        log(f"{section}: no PostgreSQL binaries (apt-get install postgresql); section skipped")
        return None
    cluster = PostgresCluster(binaries, free_port("127.0.0.1"), durable=True)
    cluster.create()
    return cluster
