"""
General Delivery's wire economy with real nodes (issue 17): notifications
pipelined, each GDEL in one write with the next envelope (and never a GDEL
behind a MAIL whose reply is not in); one retrieval connection carrying
several RETRs, one after another, after each reversed turn ends (SPEC 4:
"RETR <next-id> or QUIT"); the connection cache closing idle connections.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time

from .test_general_delivery import FAST, FakeSMTA, message, notify, send

from .harness import ScriptedPeer, wait_until
from .world import BOB, RECEIVER_IP, network_fixture

net = network_fixture(FAST)


class WithholdingMX(ScriptedPeer):
    """
    A receiver on 127.0.0.3:2525 offering PIPELINING and GDEL that answers
    only once the sender has been quiet for a moment (so it reads whatever
    was pipelined), and holds the replies to the first transaction's MAIL
    and RCPT until C{release} is set.  C{behind[id]}: the commands read
    after ``GDEL id`` and before its reply went out.
    """

    QUIET = 0.3

    def __init__(self) -> None:
        super().__init__(RECEIVER_IP)
        self.commands: list[str] = []
        self.behind: dict[str, list[str]] = {}
        self.connections = 0
        self.release = threading.Event()

    def handle(self, conn: socket.socket, source) -> None:
        self.connections += 1
        conn.sendall(b"220 mx.receiver.test ESMTP fake\r\n")
        conn.settimeout(self.QUIET)
        buffer, answers, unanswered = b"", [], []
        while True:
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                if answers and (self.release.is_set() or "MAIL" not in self._verbs()):
                    conn.sendall(b"".join(answers))
                    answers, unanswered = [], []
                continue
            if not chunk:
                return
            *lines, buffer = (buffer + chunk).split(b"\r\n")
            for line in lines:
                text = line.decode("ascii", "replace")
                self.commands.append(text)
                for gdel_id in unanswered:
                    self.behind[gdel_id].append(text)
                verb, _, argument = text.partition(" ")
                verb = verb.upper()
                if verb == "QUIT":
                    conn.sendall(b"".join(answers) + b"221 2.0.0 Bye\r\n")
                    return
                if verb == "GDEL":
                    self.behind[argument], unanswered = [], unanswered + [argument]
                answers.append({
                    "EHLO": b"250-mx.receiver.test\r\n250-PIPELINING\r\n250 GDEL\r\n",
                    "MAIL": b"250 2.1.0 Ok\r\n", "RCPT": b"250 2.1.5 Ok\r\n",
                    "RSET": b"250 2.0.0 Ok\r\n",
                    "GDEL": f"250 2.0.0 {argument} notification accepted\r\n".encode(),
                }.get(verb, b"502 5.5.1 Not here\r\n"))

    def _verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c in self.commands]


def test_the_next_envelope_goes_with_each_gdel(net):
    """
    Two messages for one domain: the second is queued while the first
    notification waits for its MAIL/RCPT replies, so its MAIL and RCPT
    leave in the same write as the first GDEL -- before the first GDEL's
    reply -- and nothing but that transaction's envelope follows a GDEL.
    """
    sender = net.sender()
    fake = WithholdingMX()
    fake.start()
    try:
        send(sender, "row1-" + secrets.token_hex(4))
        wait_until(lambda: any(c.startswith("RCPT") for c in fake.commands), 10,
                   message=lambda: f"the first envelope; got {fake.commands}")
        send(sender, "row2-" + secrets.token_hex(4))
        time.sleep(0.5)                  # the second entry waits in its domain's line
        fake.release.set()
        wait_until(lambda: len(gdels(fake)) == 2, 10, message=lambda: f"two GDELs: {fake.commands}")
        first, second = gdels(fake)
        for gdel_id in (first, second):
            sender.wait_log(rf"pull attempt {gdel_id} .*accepted", 10)
    finally:
        fake.close()
    assert fake.errors == [], fake.errors
    assert fake.connections == 1
    verbs = [c.split(" ", 1)[0].upper() for c in fake.commands]
    assert verbs[verbs.index("MAIL"):verbs.index("MAIL") + 6] == [
        "MAIL", "RCPT", "GDEL", "MAIL", "RCPT", "GDEL"], fake.commands
    # What the sender had sent behind each GDEL before its reply came.
    assert [c.split(" ", 1)[0] for c in fake.behind[first]] == ["MAIL", "RCPT"], fake.behind
    assert fake.behind[second] == [], fake.behind


def gdels(fake: WithholdingMX) -> list[str]:
    return [c[5:] for c in fake.commands if c.startswith("GDEL ")]


class CountingSMTA(FakeSMTA):
    """L{FakeSMTA}, counting the RMTA's connections."""

    def __init__(self, messages: dict[str, bytes]) -> None:
        super().__init__(messages)
        self.connections = 0

    def handle(self, conn: socket.socket, source) -> None:
        self.connections += 1
        super().handle(conn, source)


def test_several_retrs_on_one_connection_one_after_another(net):
    """
    SPEC 4: after a turn ends (the reply to end of data) the RMTA is the
    client again and may say RETR for the next id.  A notification that
    comes while the last retrieval connection idles is retrieved over it;
    the connection closes once [delivery] connection_cache_time has passed.
    """
    receiver = net.receiver()
    tokens = ["multi1-" + secrets.token_hex(4), "multi2-" + secrets.token_hex(4)]
    ids = ["Multi_" + secrets.token_hex(12) for _ in tokens]
    fake = CountingSMTA({gdel_id: message(token) for gdel_id, token in zip(ids, tokens)})
    fake.start()
    try:
        assert notify(ids[0])[0] == 250
        wait_until(lambda: len(fake.final_replies) == 1, 10, message="the first retrieval")
        assert notify(ids[1])[0] == 250
        wait_until(lambda: len(fake.final_replies) == 2, 10,
                   message=lambda: f"the second retrieval\n{receiver.diagnostics()}")
        assert "QUIT" not in fake.commands
        wait_until(lambda: "QUIT" in fake.commands, 10, message="QUIT once idle")
    finally:
        fake.close()
    assert fake.errors == [], fake.errors
    assert fake.connections == 1, fake.commands
    assert [c for c in fake.commands if c.startswith(("RETR", "EHLO", "QUIT"))] == [
        "EHLO mx.receiver.test", f"RETR {ids[0]}", f"RETR {ids[1]}", "QUIT"]
    assert all(reply.startswith("250") for _, reply in fake.final_replies)
    receiver.wait_delivered(BOB, count=2, timeout=10)
    for token in tokens:
        assert sum(f"END {token}".encode() in m for m in receiver.delivered(BOB)) == 1
