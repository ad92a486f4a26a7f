"""
Peers that vanish mid-dialogue, 200 times each: mid-DATA, mid-TLS handshake
(STARTTLS on the MX and submission services, implicit TLS on submissions),
and in the middle of a reversed RETR turn (a fake RMTA, bound to the MX
address of the recipient domain, says EHLO, RETR <id>, reads ``250 ...
follows`` and some of the SMTA's transaction, and hangs up).

After each batch the node keeps serving -- a new connection from the same
address still gets 220, so no per-address connection slot leaked -- its
count of open file descriptors is back where it was (a small slack), no
partial file is in the maildir, and the outbox entry is not left claimed:
``pullmail queue --json`` shows it ``notified`` again, and a complete RETR
afterwards still gets the message.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import time

import pytest

from integration.harness import (
    SMTP_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    RawSMTP,
    wait_until,
)

from .faultlib import (
    NotifiedRMTA,
    domain_records,
    log_problems,
    message,
    open_fds,
    queue_rows,
    submit_as,
)

NODE_IP, FAKE_RMTA_IP, CLIENT_IP = "127.0.2.31", "127.0.2.32", "127.0.2.56"
ALICE, CAROL = "alice@gdsrc.test", "carol@fake.test"
ROUNDS = 200
FD_SLACK = 8


@pytest.fixture
def setup(net):
    dns = net.dns(domain_records({"gdsrc.test": NODE_IP, "fake.test": FAKE_RMTA_IP}))
    node = net.node("node", NODE_IP, "gdsrc.test", [ALICE], dns)
    return node


def greets(source: str = CLIENT_IP, port: int = SMTP_PORT) -> bool:
    with RawSMTP(NODE_IP, port, source=source, timeout=5) as client:
        return client.greeting[0] == 220


def settle(node, before: int) -> int:
    """Wait for the fd count to come back near C{before}; the last count."""
    counts = []

    def back() -> bool:
        counts.append(open_fds(node.pid))
        return counts[-1] <= before + FD_SLACK

    with contextlib.suppress(AssertionError):
        wait_until(back, 10, interval=0.2)
    return counts[-1]


def baseline(node) -> int:
    # Warm up the thread pools and lazy imports first.
    for _ in range(3):
        assert greets()
    time.sleep(0.3)
    return open_fds(node.pid)


def check_healthy(node, before: int, what: str) -> None:
    after = settle(node, before)
    assert node.running(), node.diagnostics()
    assert after <= before + FD_SLACK, f"fd leak after {ROUNDS} {what}: {before} -> {after}"
    for _ in range(3):   # still serving, and no connection slot leaked for our address
        assert greets(), f"no 220 after {ROUNDS} {what}\n{node.diagnostics()}"
    bad = log_problems(node)
    assert not bad, f"unhandled errors after {what}: {bad[:10]}"


def test_disconnect_mid_data(setup, seed):
    node = setup
    rng = random.Random(seed)
    before = baseline(node)
    body = message("mid-data", "load@outside.test", ALICE, lines=40)
    for _ in range(ROUNDS):
        with RawSMTP(NODE_IP, source=CLIENT_IP, timeout=10) as client:
            client.ehlo("mid.data.test")
            client.send(f"MAIL FROM:<load@outside.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n")
            codes = [client.read_reply()[0] for _ in range(3)]
            assert codes == [250, 250, 354], codes
            cut = rng.randrange(0, len(body))
            client.send(body[:cut])
            if rng.random() < 0.5:
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       b"\1\0\0\0\0\0\0\0")  # RST instead of FIN
    check_healthy(node, before, "disconnects mid-DATA")
    maildir = node.maildir(ALICE)
    leftovers = [p.name for sub in ("tmp", "new", "cur") if (maildir / sub).is_dir()
                 for p in (maildir / sub).iterdir()]
    assert leftovers == [], f"files from interrupted DATA: {leftovers[:5]}"


def client_hello(server_hostname: str = "mx.gdsrc.test") -> bytes:
    context = ssl._create_unverified_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_disconnect_mid_tls_handshake(setup, seed):
    node = setup
    rng = random.Random(seed)
    before = baseline(node)
    hello = client_hello()
    assert hello[:1] == b"\x16", hello[:10]
    for n in range(ROUNDS):
        kind = n % 4
        cut = rng.choice([0, 1, 5, len(hello) // 2, len(hello)])
        if kind in (0, 1):  # STARTTLS on the MX (0) or submission (1) service
            port = SMTP_PORT if kind == 0 else SUBMISSION_PORT
            with RawSMTP(NODE_IP, port, source=CLIENT_IP, timeout=10) as client:
                client.ehlo()
                client.expect("STARTTLS", 220)
                client.sock.sendall(hello[:cut])
        elif kind == 2:     # implicit TLS on submissions
            with socket.create_connection((NODE_IP, SUBMISSIONS_PORT), timeout=10,
                                          source_address=(CLIENT_IP, 0)) as sock:
                sock.sendall(hello[:cut])
        else:               # a full ClientHello, read the server's flight, then vanish
            with socket.create_connection((NODE_IP, SUBMISSIONS_PORT), timeout=10,
                                          source_address=(CLIENT_IP, 0)) as sock:
                sock.sendall(hello)
                with contextlib.suppress(OSError):
                    sock.recv(100)
    check_healthy(node, before, "disconnects mid-TLS handshake")
    # TLS itself still works on every service.
    assert submit_as(NODE_IP, ALICE, [ALICE], message("after-tls", ALICE, ALICE),
                     source=CLIENT_IP) == {}
    with socket.create_connection((NODE_IP, SUBMISSIONS_PORT), timeout=10,
                                  source_address=(CLIENT_IP, 0)) as sock:
        with ssl._create_unverified_context().wrap_socket(sock) as tls:
            assert tls.recv(100).startswith(b"220"), "no greeting over implicit TLS"


def entry_state(node, gdel_id: str) -> str | None:
    for row in queue_rows(node):
        if row["id"] == gdel_id and row["queue"] in ("outbox", "push"):
            return row["state"]
    return None


def test_disconnect_mid_retr_turn(setup, seed):
    node = setup
    rng = random.Random(seed)
    fake = NotifiedRMTA(FAKE_RMTA_IP, SMTP_PORT, "mx.fake.test")
    fake.start()
    try:
        assert submit_as(NODE_IP, ALICE, [CAROL], message("mid-retr", ALICE, CAROL),
                         source=CLIENT_IP) == {}
        wait_until(lambda: fake.ids, 15, message=lambda: "the notification\n" + node.diagnostics())
        gdel_id = fake.ids[0]
        wait_until(lambda: entry_state(node, gdel_id) == "notified", 10)
        before = baseline(node)
        busy = 0
        for _ in range(ROUNDS):
            with RawSMTP(NODE_IP, source=FAKE_RMTA_IP, timeout=10) as client:
                client.ehlo("mx.fake.test")
                for _attempt in range(100):
                    code, texts = client.command(f"RETR {gdel_id}")
                    if code != 451:
                        break
                    busy += 1  # the last claim is still being released
                    time.sleep(0.02)
                assert code == 250 and texts[0].endswith("follows"), (code, texts)
                line = client.read_line()
                assert line.upper().startswith(b"MAIL FROM:<" + ALICE.encode().upper()), line
                stage = rng.randrange(4)
                if stage >= 1:
                    client.send(b"250 2.1.0 Ok\r\n")
                    assert client.read_line().upper().startswith(b"RCPT TO:")
                if stage >= 2:
                    client.send(b"250 2.1.5 Ok\r\n")
                    assert client.read_line().upper() == b"DATA"
                if stage >= 3:
                    client.send(b"354 go ahead\r\n")
                    client.read_line()
                if rng.random() < 0.3:
                    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           b"\1\0\0\0\0\0\0\0")
        wait_until(lambda: entry_state(node, gdel_id) == "notified", 10,
                   message=lambda: f"entry {gdel_id} released; queue {queue_rows(node)}")
        check_healthy(node, before, "disconnects mid-RETR turn")
        assert busy < ROUNDS, f"451 in progress {busy} times: claims linger"

        # A complete retrieval still gets the whole message, and the entry goes.
        with RawSMTP(NODE_IP, source=FAKE_RMTA_IP, timeout=10) as client:
            client.ehlo("mx.fake.test")
            assert client.command(f"RETR {gdel_id}")[0] == 250
            assert client.read_line().upper().startswith(b"MAIL FROM:")
            client.send(b"250 2.1.0 Ok\r\n")
            assert client.read_line().upper() == f"RCPT TO:<{CAROL}>".upper().encode()
            client.send(b"250 2.1.5 Ok\r\n")
            assert client.read_line().upper() == b"DATA"
            client.send(b"354 go ahead\r\n")
            lines = []
            while (line := client.read_line()) != b".":
                lines.append(line)
            assert lines[-1] == b"END mid-retr", lines[-3:]
            client.send(b"250 2.0.0 Ok: stored\r\n")
            client.send(b"QUIT\r\n")
        wait_until(lambda: entry_state(node, gdel_id) is None, 10,
                   message=lambda: f"entry {gdel_id} gone; queue {queue_rows(node)}")
    finally:
        fake.close()
