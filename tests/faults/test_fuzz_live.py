"""
Byte-level fuzz of a live node: seeded random streams and mutations of the
valid dialogues (EHLO/HELO, MAIL/RCPT/DATA, GDEL in both forms, RETR,
STARTTLS, AUTH, pipelining) with bare CR and LF, NULs, long lines and 8-bit
bytes, sent over C{PULLMAIL_FUZZ_CONNECTIONS} connections (300 in CI) to
the MX, submission and submissions services.

Every connection must be greeted with 220 (the node keeps answering); every
line the node sends must be a well-formed reply line; at the end the node
is alive, still accepts a valid message, and its log holds no traceback, no
"Unhandled" error and nothing critical.

Some connections are hostile in the ways of issue 18 rather than random:
slowloris commands and data (cut off by ``command_timeout`` and
``data_timeout`` with 421 4.4.2), error floods (421 4.7.0 at
``max_errors``) and commands pipelined behind EHLO (554 5.5.0).  Each must
lose its connection within its limit.  Half of the dialogues wait for the
reply to EHLO before going on, so that the fuzz reaches past it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import random
import re
import socket
import time

from integration.harness import (
    SMTP_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    RawSMTP,
)

from .faultlib import (
    PASSWORD,
    Ledger,
    domain_records,
    log_problems,
    message,
)

NODE_IP = "127.0.2.35"
SOURCES = [f"127.0.2.{n}" for n in range(41, 49)]
ALICE = "alice@fuzz.test"
CONNECTIONS = int(os.environ.get("PULLMAIL_FUZZ_CONNECTIONS", "300"))
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9]([ -].*)?")
GDEL_ID = "FuzzId0123456789abcdefXYZ_-"

DIALOGS = [
    [b"EHLO fuzz.example", b"MAIL FROM:<a@outside.test>", f"RCPT TO:<{ALICE}>".encode(),
     b"DATA", b"Subject: x", b"", b"body", b"..dot", b".", b"QUIT"],
    [b"EHLO fuzz.example", b"MAIL FROM:<x@fuzz.test> SIZE=100 BODY=8BITMIME",
     f"RCPT TO:<{ALICE}>".encode(), f"GDEL {GDEL_ID}".encode(), b"QUIT"],
    [b"EHLO mx.outside.test", f"GDEL {GDEL_ID}".encode(), b"RSET", b"QUIT"],
    [b"EHLO mx.outside.test", f"RETR {GDEL_ID}".encode(), b"RETR short", b"QUIT"],
    [b"EHLO fuzz.example", b"STARTTLS", b"EHLO again", b"QUIT"],
    [b"EHLO fuzz.example", b"AUTH PLAIN " + base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()),
     b"AUTH LOGIN", base64.b64encode(ALICE.encode()), b"*", b"QUIT"],
    [b"HELO fuzz.example", b"VRFY alice", b"HELP", b"NOOP", b"RSET",
     b"MAIL FROM:<>", b"RCPT TO:<Postmaster>", b"DATA", b".", b"QUIT"],
    [b"EHLO fuzz.example", b"MAIL FROM:<@route,@x:a@b> AUTH=<>",
     b'RCPT TO:<"a@b"@fuzz.test>', b"RCPT TO:<a%b@fuzz.test>", b"RCPT TO:<a@[127.0.0.1]>",
     b"DATA", b"QUIT"],
]
NASTY = [b"\r", b"\n", b"\0", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\xff", b"\xc3\xa9", b"\x80",
         b" ", b":", b"<", b">", b"=", b"\x1b[2J", b"\t"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(8)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:                       # flip a byte
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op == 1:                              # insert something nasty
            data[at:at] = rng.choice(NASTY)
        elif op == 2 and data:                     # delete a range
            del data[at:at + rng.randint(1, 20)]
        elif op == 3:                              # duplicate a range
            data[at:at] = data[at:at + rng.randint(1, 80)]
        elif op == 4:                              # a long line
            data[at:at] = bytes([rng.choice(b"aZ9 .")]) * rng.choice([511, 512, 513, 1000, 5000])
        elif op == 5:                              # random bytes
            data[at:at] = rng.randbytes(rng.randint(1, 40))
        elif op == 6:                              # truncate
            del data[at:]
        else:                                      # change case
            data[at:at + 10] = bytes(data[at:at + 10]).swapcase()
    return bytes(data)


def stream(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.randint(1, 3000))
    lines = list(rng.choice(DIALOGS))
    if rng.random() < 0.3:
        rng.shuffle(lines)
    ending = rng.choice([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n"])
    data = ending.join(lines) + ending
    return mutate(rng, data) if kind < 0.9 else data


# The fuzz node's limits against hostile peers: short, so that each attack
# below is seen cut off within a few seconds.
HOSTILE_LIMITS = {"command_timeout": "2s", "data_timeout": "2s", "min_data_rate": 1000,
                  "max_errors": 8}
# How long each hostile case may hold its connection: the limit plus slack.
CUT_OFF_WITHIN = {"slow-command": 5.0, "slow-data": 5.0, "error-flood": 12.0,
                  "improper-pipelining": 3.0}


def _read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """Everything the node sends for up to C{seconds}; and whether it closed."""
    deadline = time.monotonic() + seconds
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return received, False
        except OSError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def hostile_connection(n: int, rng: random.Random, kind: str) -> str | None:
    """One issue-18 attack on the MX port; a problem description, or None."""
    with socket.create_connection((NODE_IP, SMTP_PORT), timeout=10,
                                  source_address=(SOURCES[n % len(SOURCES)], 0)) as sock:
        greeting, _ = _read_until_closed_line(sock)
        if not greeting.startswith(b"220 "):
            return f"#{n} {kind}: greeting {greeting[:100]!r}"
        started = time.monotonic()
        if kind == "improper-pipelining":
            sock.sendall(b"EHLO bot.example\r\nMAIL FROM:<a@outside.test>\r\n")
            expected = b"554 5.5.0 "
        elif kind == "error-flood":
            sock.sendall(b"EHLO bot.example\r\n")
            _read_until_closed_line(sock)
            sock.sendall(b"".join(b"XYZZY%d\r\n" % i for i in range(30)))
            expected = b"421 4.7.0 "
        else:
            sock.sendall(b"EHLO slow.example\r\n")
            _read_until_closed_line(sock)
            if kind == "slow-data":
                sock.sendall(f"MAIL FROM:<a@outside.test>\r\nRCPT TO:<{ALICE}>\r\n"
                             "DATA\r\n".encode())
            trickle = rng.randbytes(200).replace(b"\r", b"").replace(b"\n", b"")
            received = b""
            for byte in trickle:
                with contextlib.suppress(OSError):
                    sock.sendall(bytes([byte]))
                more, closed = _read_until_closed(sock, 0.25)
                received += more
                if closed:
                    break
            else:
                return f"#{n} {kind}: still open after {time.monotonic() - started:.1f}s"
            last = received.rstrip(b"\r\n").split(b"\r\n")[-1]
            if not last.startswith(b"421 4.4.2 "):
                return f"#{n} {kind}: last reply {last[:100]!r}"
            expected = None
        if expected is not None:
            received, closed = _read_until_closed(sock, CUT_OFF_WITHIN[kind])
            if not closed:
                return f"#{n} {kind}: still open after {CUT_OFF_WITHIN[kind]}s"
            last = received.rstrip(b"\r\n").split(b"\r\n")[-1]
            if not last.startswith(expected):
                return f"#{n} {kind}: last reply {last[:100]!r}, wanted {expected!r}"
    took = time.monotonic() - started
    if took > CUT_OFF_WITHIN[kind]:
        return f"#{n} {kind}: held its connection {took:.1f}s"
    return None


def _read_until_closed_line(sock: socket.socket) -> tuple[bytes, bool]:
    """One reply's worth (up to a final reply line), or what came before a close."""
    received = b""
    sock.settimeout(10)
    while not re.search(rb"(^|\r\n)[2-5][0-9][0-9] [^\r\n]*\r\n$", received):
        chunk = sock.recv(4096)
        if not chunk:
            return received, True
        received += chunk
    return received, False


def one_connection(n: int, seed: int) -> str | None:
    """Fuzz one connection; a problem description, or None."""
    rng = random.Random(seed * 100003 + n)
    if rng.random() < 0.04:
        kind = rng.choice(sorted(CUT_OFF_WITHIN))
        try:
            return hostile_connection(n, rng, kind)
        except OSError as e:
            return f"#{n} {kind}: {e}"
    port = rng.choice([SMTP_PORT] * 6 + [SUBMISSION_PORT] * 2 + [SUBMISSIONS_PORT])
    data = stream(rng)
    source = SOURCES[n % len(SOURCES)]
    try:
        sock = socket.create_connection((NODE_IP, port), timeout=10,
                                        source_address=(source, 0))
    except OSError as e:
        return f"#{n}: connect to {port} failed: {e}"
    with sock:
        received = b""
        try:
            if port == SUBMISSIONS_PORT:
                # Implicit TLS: the "greeting" is the server's handshake flight.
                sock.sendall(data)
            else:
                while b"\r\n" not in received:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return f"#{n}: closed before greeting on {port}"
                    received += chunk
                if not received.startswith(b"220 "):
                    return f"#{n}: greeting on {port}: {received[:100]!r}"
                if rng.random() < 0.5 and b"\n" in data[:100]:
                    # A client that waits for the reply to its first line
                    # (RFC 2920 3.1: EHLO ends a group) gets past it.
                    first = data.index(b"\n") + 1
                    sock.sendall(data[:first])
                    data = data[first:]
                    sock.settimeout(0.5)
                    with contextlib.suppress(OSError):
                        received += sock.recv(65536)
                pieces = sorted(rng.sample(range(len(data) + 1), min(2, len(data) + 1)))
                for a, b in zip([0] + pieces, pieces + [len(data)]):
                    sock.sendall(data[a:b])
                    time.sleep(rng.choice([0, 0, 0.01]))
            sock.settimeout(0.3)
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    received += chunk
        except OSError:
            pass  # the node may close on us (QUIT, idle, TLS failure): fine
    if port != SUBMISSIONS_PORT:
        text = received
        # STARTTLS: after the 220 to it, what follows is TLS records, not lines.
        tls_start = re.search(rb"220 2\.0\.0 Ready to start TLS\r\n", text)
        if tls_start:
            text = text[:tls_start.end()]
        lines = text.split(b"\r\n")
        for line in lines[:-1]:
            if not REPLY_LINE.fullmatch(line):
                return f"#{n}: malformed reply line {line[:120]!r} to {data[:200]!r}"
    return None


def test_fuzz_live_node(net, seed):
    dns = net.dns(domain_records({"fuzz.test": NODE_IP}))
    node = net.node("fuzz", NODE_IP, "fuzz.test", [ALICE], dns, settings={
        # Fuzzed RETRs and AUTHs fail by the hundred: keep the node from
        # tarpitting and blocking the fuzzer's addresses, which is not under test.
        "limits": {"retr_fail_limit": 1000000, "retr_tarpit_max": "0s",
                   "auth_fail_limit": 1000000, "auth_tarpit_max": "0s",
                   "idle_timeout": "5s", "connections_per_ip": 50, **HOSTILE_LIMITS},
    })
    problems = []
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for problem in pool.map(lambda n: one_connection(n, seed), range(CONNECTIONS)):
            if problem:
                problems.append(problem)
    elapsed = time.monotonic() - started
    assert node.running(), f"seed {seed}: the node died\n{node.diagnostics()}"
    assert not problems, f"seed {seed}: {len(problems)} problems, e.g.\n" + "\n".join(problems[:10])
    # Still serving, properly.
    with RawSMTP(NODE_IP, source=SOURCES[0]) as client:
        client.ehlo()
        code, texts = client.sendmail("after@outside.test", [ALICE],
                                      message("after-fuzz", "after@outside.test", ALICE))
        assert code == 250, (code, texts)
    assert Ledger(node, ALICE).scan()[0].get("after-fuzz") == 1
    bad = log_problems(node)
    assert not bad, f"seed {seed}: the node logged unhandled errors: {bad[:15]}"
    print(f"seed {seed}: {CONNECTIONS} fuzz connections in {elapsed:.1f}s, node fine")
