"""
Shared pieces of the fault suite: a network of nodes with its own DNS, load
clients that record what got a 250, and ledgers that count what arrived.

Addresses: everything here lives in 127.0.2.1 - 127.0.2.60 (DNS servers on
free ports of 127.0.2.1).
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import smtplib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Iterable

from integration.harness import (
    SMTP_PORT,
    SUBMISSION_PORT,
    DNSServer,
    Node,
    NodeFactory,
    ScriptedPeer,
    free_port,
    wait_until,
)

DNS_ADDRESS = "127.0.2.1"
PASSWORD = "fault-pw-" + "x" * 8

# Short timers: retries within seconds; a retrieval schedule long enough
# (about 30 s in all) to outlast a node's restart.
FAST = {
    "retrieval": {"schedule": ["0s", "1s", "2s", "4s", "8s", "16s"]},
    "delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "3s"},
    "limits": {"idle_timeout": "30s", "retr_tarpit_max": "1s"},
}

TOKEN_HEADER = re.compile(rb"^X-Fault-Token: (\S+)\r?$", re.MULTILINE)




def domain_records(domains: dict[str, str]) -> dict:
    """{domain: ip} -> records: MX mx.<domain>, A, SPF allowing only that ip."""
    records = {}
    for domain, ip in domains.items():
        records[domain] = {"A": [ip], "MX": [[10, f"mx.{domain}"]],
                           "TXT": [f"v=spf1 ip4:{ip} -all"]}
        records[f"mx.{domain}"] = {"A": [ip]}
    return records


def message(token: str, sender: str, recipient: str, lines: int = 12) -> bytes:
    """A message whose token is in a header and in its last line (a trailer)."""
    body = [f"line {n:02d} of {token} " + "y" * 50 for n in range(lines)]
    body.insert(3, ".a dot-led line")
    return (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: fault {token}\r\n"
        f"X-Fault-Token: {token}\r\nMessage-ID: <{token}@fault.test>\r\n\r\n"
        + "\r\n".join(body) + f"\r\nEND {token}\r\n"
    ).encode("ascii")


class Network:
    """Nodes and DNS servers of one test; all killed at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes = NodeFactory(workdir)
        self.dns_servers: list[DNSServer] = []

    def dns(self, records: dict, ttl: int = 60, name: str = "dns") -> DNSServer:
        server = DNSServer(self.workdir / name, records, free_port(DNS_ADDRESS),
                           address=DNS_ADDRESS, ttl=ttl)
        self.dns_servers.append(server)
        server.start()
        return server

    def node(self, name: str, address: str, domain: str, users: Iterable[str] = (),
             dns: DNSServer | None = None, settings: dict | None = None,
             start: bool = True) -> Node:
        return self.nodes.for_domain(name, address, domain, users, PASSWORD, FAST, dns,
                                     settings, start)

    def close(self) -> None:
        self.nodes.close()
        for server in self.dns_servers:
            server.stop()


# -- queues -----------------------------------------------------------------------


def queue_rows(node: Node) -> list[dict]:
    """`pullmail queue --json` of C{node}."""
    return json.loads(node.cli("queue", "--json").stdout)["messages"]


def unfinished(rows: list[dict]) -> list[dict]:
    """Rows that still await work: anything but a notification already retrieved."""
    return [r for r in rows if not (r["queue"] == "pending" and r["state"] == "retrieved")]


def wait_drained(nodes: Iterable[Node], timeout: float, extra=lambda: True) -> None:
    """Poll every node's queue until nothing is left to do (and C{extra()})."""
    nodes = list(nodes)
    last: dict[str, list] = {}

    def drained() -> bool:
        for node in nodes:
            last[node.name] = unfinished(queue_rows(node))
        return not any(last.values()) and extra()

    wait_until(drained, timeout, interval=0.3, message=lambda: (
        "queues to drain; left: " + json.dumps(last, indent=1)[:3000] + "\n"
        + "\n".join(n.diagnostics(25) for n in nodes)))


# -- what arrived -------------------------------------------------------------------


class Ledger:
    """Counts messages with a fault token in a maildir; notes DSNs and strays."""

    def __init__(self, node: Node, address: str, tag: str = "") -> None:
        # tag: count only tokens containing it (two loads may share a mailbox)
        self.node, self.address, self.tag = node, address, tag

    def scan(self) -> tuple[collections.Counter, list[str], list[str]]:
        counts: collections.Counter = collections.Counter()
        bounces, broken = [], []
        for path in self.node.delivered_paths(self.address):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
            if b"MAILER-DAEMON" in head or b"multipart/report" in head:
                bounces.append(path.name)
                continue
            match = TOKEN_HEADER.search(head)
            if not match:
                broken.append(f"{path.name}: no token: {data[:120]!r}")
                continue
            token = match.group(1).decode()
            if self.tag not in token:
                continue
            if not data.replace(b"\r\n", b"\n").endswith(f"\nEND {token}\n".encode()):
                broken.append(f"{path.name}: {token} incomplete: ...{data[-120:]!r}")
            counts[token] += 1
        return counts, bounces, broken


def verdict(acked: Iterable[str], sent: Iterable[str], ledger: Ledger, what: str) -> list[str]:
    """Problems: acknowledged but missing, stored twice, broken files, DSNs."""
    acked, sent = set(acked), set(sent)
    counts, bounces, broken = ledger.scan()
    problems = []
    lost = sorted(acked - set(counts))
    if lost:
        problems.append(f"{what}: {len(lost)} acknowledged message(s) LOST: {lost[:10]}")
    duplicates = {t: n for t, n in counts.items() if n > 1}
    if duplicates:
        problems.append(f"{what}: {len(duplicates)} DUPLICATED "
                        f"({sum(duplicates.values()) - len(duplicates)} extra copies): "
                        f"{dict(sorted(duplicates.items())[:10])}")
    strays = sorted(set(counts) - sent)
    if strays:
        problems.append(f"{what}: tokens never sent: {strays[:10]}")
    if bounces:
        problems.append(f"{what}: {len(bounces)} DSN(s) in the mailbox: {bounces[:5]}")
    if broken:
        problems.append(f"{what}: broken files: {broken[:5]}")
    return problems


# -- clients ----------------------------------------------------------------------


def submit_as(address: str, user: str, recipients: list[str], data: bytes,
              source: str | None = None, timeout: float = 10.0) -> dict:
    """STARTTLS + AUTH on the submission port, from C{source}."""
    with smtplib.SMTP(address, SUBMISSION_PORT, local_hostname="client.submit.test",
                      timeout=timeout,
                      source_address=(source, 0) if source else None) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(user, PASSWORD)
        refused = client.sendmail(user, recipients, data)
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
    return refused


class LoadClient(threading.Thread):
    """
    Sends messages with fresh tokens until stopped, reconnecting after any
    error (the node may be dead for a while); C{acked} holds every token
    whose end of data got a 250, C{sent} every token whose DATA began.
    """

    def __init__(self, name: str, address: str, source: str, sender: str, recipient: str,
                 submission_user: str | None = None, per_connection: int = 20) -> None:
        super().__init__(daemon=True, name=name)
        self.label, self.address, self.source = name, address, source
        self.sender, self.recipient = sender, recipient
        self.user = submission_user
        self.per_connection = per_connection
        self.stop_event = threading.Event()
        self.acked: list[str] = []
        self.sent: list[str] = []
        self.errors: collections.Counter = collections.Counter()
        self._counter = 0
        self.prefix = name

    def next_token(self) -> str:
        self._counter += 1
        return f"{self.prefix}-{self._counter:05d}"

    def stop(self) -> None:
        self.stop_event.set()
        self.join(60)
        assert not self.is_alive(), f"{self.label} did not stop"

    def _connect(self) -> smtplib.SMTP:
        port = SUBMISSION_PORT if self.user else SMTP_PORT
        client = smtplib.SMTP(self.address, port, local_hostname="load.fault.test",
                              timeout=10, source_address=(self.source, 0))
        if self.user:
            client.starttls(context=ssl._create_unverified_context())
            client.login(self.user, PASSWORD)
        return client

    def run(self) -> None:
        while not self.stop_event.is_set():
            client = None
            try:
                client = self._connect()
                for _ in range(self.per_connection):
                    if self.stop_event.is_set():
                        break
                    token = self.next_token()
                    self.sent.append(token)
                    refused = client.sendmail(self.sender, [self.recipient],
                                              message(token, self.sender, self.recipient))
                    if refused:
                        self.errors[f"refused {refused}"] += 1
                        continue
                    self.acked.append(token)   # sendmail returned: 250 to end of data
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    client.quit()
            except (smtplib.SMTPException, OSError) as e:
                self.errors[type(e).__name__] += 1
                time.sleep(0.05)
            finally:
                if client is not None:
                    with contextlib.suppress(OSError):
                        client.close()


# -- processes --------------------------------------------------------------------


class NotifiedRMTA(ScriptedPeer):
    """
    A bare MX for a fake domain that accepts every GDEL and records its id;
    with C{hang_up_on_first_gdel} it drops the first connection right after
    reading a GDEL, before any reply (a reply lost on the way).
    """

    def __init__(self, address: str, port: int, hostname: str,
                 hang_up_on_first_gdel: bool = False) -> None:
        super().__init__(address, port)
        self.hostname = hostname.encode()
        self.hang_up_on_first_gdel = hang_up_on_first_gdel
        self.ids: list[str] = []

    def handle(self, conn: socket.socket, source) -> None:
        with conn.makefile("rwb") as f:
            self._serve(f)

    def _serve(self, f) -> None:
        f.write(b"220 " + self.hostname + b" ESMTP fake\r\n")
        f.flush()
        for line in f:
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb in (b"EHLO", b"HELO"):
                f.write(b"250-" + self.hostname + b"\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n"
                        b"250-8BITMIME\r\n250-GDEL\r\n250 RETR\r\n")
            elif verb == b"GDEL":
                self.ids.append(line.split()[1].decode())
                if self.hang_up_on_first_gdel and len(self.ids) == 1:
                    return
                f.write(b"250 2.0.0 notification accepted\r\n")
            elif verb == b"QUIT":
                f.write(b"221 bye\r\n")
                f.flush()
                return
            else:
                f.write(b"250 2.0.0 ok\r\n")
            f.flush()


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def log_problems(node: Node) -> list[str]:
    """Lines of the node's log and output that show an unhandled error."""
    bad = re.compile(r"Traceback|Unhandled|\bcritical\b|CRITICAL", re.IGNORECASE)
    text = node.log_text() + node.output_text()
    return [line for line in text.splitlines() if bad.search(line)]
