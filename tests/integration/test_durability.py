"""
A C{250} to end of data means the message is on disk (SPEC 8): a node
killed with SIGKILL at a random moment under load loses no message it
acknowledged, duplicates none, and shows no partial file in a maildir.

The seed of the random kill time is printed; set C{PULLMAIL_DURABILITY_SEED}
to replay a run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import threading
import time

from .harness import RawSMTP, smtp, wait_until

ALICE = "alice@example.org"
MESSAGES = 500
PER_CONNECTION = 50
TOKEN = re.compile(rb"^Message-ID: <(tok-\d+-\d{4})@outside\.test>\r?$", re.MULTILINE)


def message(token: str) -> bytes:
    """A small message whose every line names its token, ending with a trailer."""
    lines = [f"line {n:02d} of {token} " + "x" * 40 for n in range(20)]
    return (
        f"From: load@outside.test\r\nTo: {ALICE}\r\nSubject: {token}\r\n"
        f"Message-ID: <{token}@outside.test>\r\n\r\n"
        + "\r\n".join(lines)
        + f"\r\nEND OF MESSAGE {token}\r\n"
    ).encode("ascii")


class Client(threading.Thread):
    """Sends MESSAGES transactions, recording each token that got a 250."""

    def __init__(self, node, seed: int) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.tokens = [f"tok-{seed}-{i:04d}" for i in range(MESSAGES)]
        self.acknowledged: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        client = None
        try:
            for i, token in enumerate(self.tokens):
                if i % PER_CONNECTION == 0:
                    if client is not None:
                        client.quit()
                    client = smtp(self.node, timeout=5)
                refused = client.sendmail("load@outside.test", [ALICE], message(token))
                assert refused == {}, refused
                self.acknowledged.append(token)  # sendmail returned: 250 to DATA
            client.quit()
        except (smtplib.SMTPException, OSError) as e:
            self.error = e
        finally:
            if client is not None:
                client.close()


def test_sigkill_loses_no_acknowledged_message(make_node):
    seed = int(os.environ.get("PULLMAIL_DURABILITY_SEED", time.time_ns() % 10**9))
    rng = random.Random(seed)
    # A random moment of the run, wherever the disk's speed puts it: after a
    # random number of acknowledgements, plus a random part of a transaction.
    # (A fixed 0.3-2.0 s often falls after the end: 500 messages can take
    # under a second.)
    kill_after_acks = rng.randint(10, MESSAGES - 10)
    kill_jitter = rng.uniform(0.0, 0.004)
    print(f"durability seed {seed}: SIGKILL after {kill_after_acks} acks + {kill_jitter * 1000:.1f} ms")

    node = make_node("durable", "127.0.0.6", ["example.org"], "durable.example.org",
                     users={ALICE: "alice-password"})
    client = Client(node, seed)
    client.start()
    wait_until(
        lambda: len(client.acknowledged) >= kill_after_acks or not client.is_alive(),
        25, interval=0.0005, message=f"{kill_after_acks} acknowledgements",
    )
    assert client.is_alive(), f"the client ended early: {client.error!r}"
    time.sleep(kill_jitter)
    node.kill()
    client.join(30)
    assert not client.is_alive(), "the client did not stop after the node died"
    acknowledged = set(client.acknowledged)
    print(f"{len(acknowledged)} of {MESSAGES} acknowledged; client stopped on {client.error!r}")

    node.start()  # a node must restart cleanly after a crash
    found: dict[str, int] = {}
    for path in node.delivered_paths(ALICE):
        data = path.read_bytes()
        match = TOKEN.search(data)
        assert match, f"{path.name}: partial or foreign file: {data[:200]!r}...{data[-200:]!r}"
        token = match.group(1).decode()
        # Line ends are not this test's business (test_mx_service checks them).
        assert data.replace(b"\r\n", b"\n").endswith(message(token).replace(b"\r\n", b"\n")), (
            f"{path.name} is not the complete message {token}: ...{data[-200:]!r}"
        )
        found[token] = found.get(token, 0) + 1

    lost = sorted(acknowledged - set(found))
    assert not lost, f"{len(lost)} acknowledged message(s) lost, e.g. {lost[:5]} (seed {seed})"
    duplicated = sorted(t for t, n in found.items() if n > 1)
    assert not duplicated, f"stored more than once: {duplicated[:5]} (seed {seed})"
    unknown = sorted(set(found) - set(client.tokens))
    assert not unknown, unknown
    # At most the one transaction in flight at the kill may be stored unacknowledged.
    assert len(set(found) - acknowledged) <= 1, sorted(set(found) - acknowledged)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def test_fsync_helper_dies_with_the_node(make_node):
    """
    The node's fsync helper (pullmail.storage.fsync_process) runs while the node runs and
    dies with it, even by SIGKILL: nothing can land in a maildir after the
    node that would have acknowledged it is gone.
    """
    node = make_node("helper", "127.0.0.95", ["example.org"], "helper.example.org",
                     users={ALICE: "alice-password"})
    with smtp(node) as client:      # a delivery: the helper is up and serving
        assert client.sendmail("load@outside.test", [ALICE], message("tok-1-0001")) == {}
    [helper] = _children(node.pid)
    with open(f"/proc/{helper}/cmdline", "rb") as f:
        assert b"pullmail.storage.fsync_process" in f.read()
    # Stopped, the helper cannot notice the socket closing: only the
    # kernel's parent-death signal can end it now.
    os.kill(helper, signal.SIGSTOP)
    try:
        node.kill()
        wait_until(lambda: _gone(helper), 10, message="the helper to die with the node")
    finally:
        if not _gone(helper):
            os.kill(helper, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith(("Z", "X"))
    except FileNotFoundError:
        return True


def test_sigterm_after_the_dot_answers_250_then_closes(make_node):
    """
    A graceful stop (SIGTERM) lets a message already past its final dot
    finish its durable write and get its 250 before the connection and the
    node close (L{pullmail.smtp.drain}).  The write is held up by stopping
    the fsync helper (SIGSTOP) until after the SIGTERM.  The client hears
    250, then 421, then a clean close; the node exits as twistd does on
    SIGTERM (by that signal, once stopped); the message is in the maildir
    once.
    """
    node = make_node("graceful", "127.0.0.96", ["example.org"], "graceful.example.org",
                     users={ALICE: "alice-password"})
    [helper] = _children(node.pid)
    with RawSMTP(node.address) as client:
        for command, code in (("EHLO client.outside.test", 250),
                              ("MAIL FROM:<load@outside.test>", 250),
                              (f"RCPT TO:<{ALICE}>", 250), ("DATA", 354)):
            client.send(command + "\r\n")
            assert client.read_reply()[0] == code, command
        os.kill(helper, signal.SIGSTOP)
        try:
            client.send(message("tok-7-0001") + b".\r\n")
            time.sleep(0.5)       # the node has handed the write to the helper
            node.signal(signal.SIGTERM)
            time.sleep(1.0)       # stopping, it waits for the write
            assert node.running(), "the node did not wait for the write in flight"
        finally:
            os.kill(helper, signal.SIGCONT)
        assert client.read_reply()[0] == 250
        assert client.read_reply() == (421, ["4.3.2 Service shutting down, closing connection"])
        assert client.buffer == b""
        client.sock.settimeout(10)
        assert client.sock.recv(100) == b""      # FIN, not a reset
    assert node.process.popen.wait(10) == -signal.SIGTERM
    [path] = node.delivered_paths(ALICE)
    assert TOKEN.search(path.read_bytes()).group(1) == b"tok-7-0001"
    assert "stop-cut-off" not in node.log_text()
