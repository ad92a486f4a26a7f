"""
Hostile peers at the protocol level, against a real node (issue 18 items 2,
5, 7, 8, 9 and 14): TLS handshakes that never come, bare line ends in
commands, slowloris commands and data, improper pipelining and pre-greet
talkers, error and junk budgets, HTTP verbs, and escape sequences meant
for the operator's terminal.  Each attack must cost the attacker its
connection, within the configured limit, and leave the node serving.
"""

from __future__ import annotations

import socket
import time

import pytest

from .harness import SMTP_PORT, SUBMISSIONS_PORT, RawSMTP

ALICE = "alice@example.org"
SENDER = "sender@outside.test"
# Short limits, so that each deadline is seen passing in a second or two.
LIMITS = {
    "tls_handshake_timeout": "2s", "command_timeout": "2s", "data_timeout": "2s",
    "min_data_rate": 100, "max_errors": 6, "max_junk_commands": 8, "idle_timeout": "30s",
}


@pytest.fixture(scope="module")
def guarded(make_module_node):
    """mx.example.org on 127.0.0.82 with short [limits] against hostile peers."""
    return make_module_node(
        "guarded", "127.0.0.82", ["example.org"], "mx.example.org",
        users={ALICE: "alice-password"}, settings={"limits": LIMITS},
    )


@pytest.fixture(scope="module")
def pregreet(make_module_node):
    """A node with pregreet_wait = 1s on 127.0.0.83."""
    return make_module_node(
        "pregreet", "127.0.0.83", ["example.org"], "mx.example.org",
        users={ALICE: "alice-password"}, settings={"limits": {"pregreet_wait": "1s"}},
    )


@pytest.fixture(scope="module")
def tolerant(make_module_node):
    """A node with improper_pipelining = "allow" on 127.0.0.84."""
    return make_module_node(
        "tolerant", "127.0.0.84", ["example.org"], "mx.example.org",
        users={ALICE: "alice-password"},
        settings={"limits": {"improper_pipelining": "allow"}},
    )


def greeted(node, **kwargs) -> RawSMTP:
    client = RawSMTP(node.address, **kwargs)
    assert client.greeting[0] == 220, client.greeting
    return client


def raw(node, **kwargs) -> RawSMTP:
    client = greeted(node, **kwargs)
    client.ehlo()
    return client


def closed_within(client: RawSMTP, seconds: float) -> float:
    """Wait for the node to close; how long it took (AssertionError if it did not)."""
    started = time.monotonic()
    deadline = started + seconds
    while not client.closed:
        try:
            client._fill(deadline)
        except TimeoutError:
            raise AssertionError(f"still open after {seconds}s: {client.transcript[-4:]!r}")
        except OSError:
            break
    return time.monotonic() - started


def assert_still_serving(node) -> None:
    with raw(node) as client:
        code, texts = client.sendmail(SENDER, [ALICE], b"Subject: still here\r\n\r\nok\r\n")
        assert code == 250, (code, texts)


# -- item 2: TLS handshakes that never come --------------------------------------


def test_starttls_without_handshake_is_aborted(guarded):
    with raw(guarded) as client:
        assert client.command("STARTTLS")[0] == 220
        took = closed_within(client, 6.0)
    assert took < 5.0, took
    guarded.wait_log(r"TLS handshake timeout", 2)


def test_implicit_tls_port_without_handshake_is_aborted(guarded):
    """A bare TCP connect to the implicit-TLS port holds no slot for long."""
    with socket.create_connection((guarded.address, SUBMISSIONS_PORT), timeout=8) as sock:
        started = time.monotonic()
        try:
            data = sock.recv(4096)     # a timeout (still open after 8 s) raises
        except ConnectionResetError:
            data = b""
    assert data == b""
    assert time.monotonic() - started < 5.0


def test_completed_handshakes_outlive_the_deadline(guarded):
    """A handshake that completes stops its clock: the session goes on past it."""
    import ssl

    with raw(guarded) as client:
        assert client.starttls()[0] == 220
        time.sleep(3)
        client.ehlo()
        assert client.command("NOOP")[0] == 250
    context = ssl._create_unverified_context()
    with socket.create_connection((guarded.address, SUBMISSIONS_PORT), timeout=8) as sock:
        with context.wrap_socket(sock) as tls:
            time.sleep(3)
            greeting = tls.recv(4096)
            assert greeting.startswith(b"220 "), greeting
            tls.sendall(b"NOOP\r\n")
            assert tls.recv(4096).startswith(b"250 "), "no reply after the deadline"


# -- item 5: bare CR or LF in a command line --------------------------------------


def test_bare_lf_in_command_line(guarded):
    with raw(guarded) as client:
        code, texts = client.command(b"MAIL FROM:<a@outside.test>\nRCPT TO:<alice@example.org>")
        assert (code, texts[0][:6]) == (500, "5.5.2 "), (code, texts)
        client.assert_silent(0.2)
        # Neither half ran: there is no transaction.
        assert client.command(f"RCPT TO:<{ALICE}>")[0] == 503


# -- item 7: slowloris ---------------------------------------------------------


def trickle(client: RawSMTP, data: bytes, pause: float) -> bytes:
    """Send C{data} a byte at a time until the node says something; what it said."""
    for byte in data:
        client.send(bytes([byte]))
        said = client.pending(pause)
        if said or client.closed:
            return said
    return b""


def test_slow_command_line_cut_off(guarded):
    """One byte every 0.4 s keeps the idle timer fed but not the command deadline."""
    with raw(guarded) as client:
        started = time.monotonic()
        said = trickle(client, b"NOOP" * 20, 0.4)
        took = time.monotonic() - started
    assert said.startswith(b"421 4.4.2 "), said
    assert took < 5.0, took


def test_data_trickle_cut_off(guarded):
    with raw(guarded) as client:
        client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n")
        assert [c for c, _ in client.read_replies(3)] == [250, 250, 354]
        started = time.monotonic()
        said = trickle(client, b"x" * 40, 0.25)
        took = time.monotonic() - started
    assert said.startswith(b"421 4.4.2 "), said
    assert took < 5.0, took
    assert_still_serving(guarded)


# -- item 8: improper pipelining and pre-greet talkers ----------------------------


def test_commands_behind_ehlo(guarded):
    with greeted(guarded) as client:
        client.send(f"EHLO bot.test\r\nMAIL FROM:<{SENDER}>\r\n")
        assert client.read_reply()[0] == 250
        code, texts = client.read_reply()
        assert (code, texts[0][:6]) == (554, "5.5.0 "), (code, texts)
        client.expect_closed(2)
    guarded.wait_log(r"pipelined behind EHLO", 2)


def test_message_before_354(guarded):
    with raw(guarded) as client:
        client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n"
                    "Subject: spam\r\n\r\nbuy\r\n.\r\n")
        replies = client.read_replies(3)
        assert [c for c, _ in replies] == [250, 250, 554], replies
        client.expect_closed(2)


def test_allowed_when_configured(tolerant):
    with greeted(tolerant) as client:
        client.send(f"EHLO bot.test\r\nMAIL FROM:<{SENDER}>\r\n")
        assert [c for c, _ in client.read_replies(2)] == [250, 250]


def test_pregreet_talker_refused(pregreet):
    with socket.create_connection((pregreet.address, SMTP_PORT), timeout=5) as sock:
        first = sock.recv(4096)
        assert first.startswith(b"220-"), first
        sock.sendall(b"EHLO bot.test\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"554 5.5.0 "), received
    pregreet.wait_log(r"spoke before the greeting ended", 2)


def test_pregreet_patient_client_served(pregreet):
    """A client that waits for the whole greeting (RFC 5321 4.3.1) is served."""
    with RawSMTP(pregreet.address) as client:
        code, texts = client.greeting
        assert code == 220 and len(texts) == 2, client.greeting
        client.ehlo()
        code, _ = client.sendmail(SENDER, [ALICE], b"Subject: patient\r\n\r\nok\r\n")
        assert code == 250


# -- item 9: error and junk budgets, foreign protocols ----------------------------


def test_error_budget(guarded):
    """6 errors: the 4th and 5th come 1 s and 2 s late, the 6th brings 421."""
    with raw(guarded) as client:
        times = []
        for n in range(6):
            started = time.monotonic()
            code, texts = client.command(f"XYZZY{n}")
            times.append(time.monotonic() - started)
            assert code == 500, (code, texts)
        code, texts = client.read_reply()
        assert (code, texts[0][:6]) == (421, "4.7.0 "), (code, texts)
        client.expect_closed(2)
    assert times[3] >= 0.9 and times[4] >= 1.9, times
    assert max(times[:3]) < 0.5, times


def test_junk_budget(guarded):
    with raw(guarded) as client:
        for _ in range(8):
            assert client.command("NOOP")[0] == 250
        code, texts = client.command("RSET")
        assert code == 250
        code, texts = client.read_reply()
        assert (code, texts[0][:6]) == (421, "4.7.0 "), (code, texts)
        client.expect_closed(2)


@pytest.mark.parametrize("request_line", [
    b"GET / HTTP/1.1", b"POST /submit HTTP/1.1", b"CONNECT 10.0.0.1:25 HTTP/1.1",
])
def test_http_closes_at_once(guarded, request_line):
    with greeted(guarded) as client:
        client.send(request_line + b"\r\nHost: mx.example.org\r\n\r\n")
        code, texts = client.read_reply()
        assert (code, texts[0][:6]) == (554, "5.5.0 "), (code, texts)
        client.expect_closed(2)


# -- item 14: log injection -----------------------------------------------------


def test_escape_sequences_never_reach_the_log(guarded):
    with raw(guarded) as client:
        client.command(b"\x1b[2J\x1b]0;pwned\x07EVIL\x08\x08 x")
        client.command(b"EHLO \x1b[31mred")
    guarded.wait_log(r"\\x1b\[2J\\x1b\]0;PWNED\\x07", 3)
    text = guarded.log_text()
    assert "\x1b" not in text and "\x08" not in text and "\x07" not in text


def test_node_healthy_after_all(guarded):
    assert guarded.running()
    assert_still_serving(guarded)
