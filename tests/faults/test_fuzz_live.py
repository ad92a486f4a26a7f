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

from .faultlib import (
    PASSWORD,
    SMTP_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    Ledger,
    RawSMTP,
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


def one_connection(n: int, seed: int) -> str | None:
    """Fuzz one connection; a problem description, or None."""
    rng = random.Random(seed * 100003 + n)
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
                   "idle_timeout": "5s", "connections_per_ip": 50},
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
