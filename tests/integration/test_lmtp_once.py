"""
Mail over LMTP is delivered at most once, and never lost, when the LMTP
transaction is cut off after the data (L{pullmail.pull.handover},
L{pullmail.inbound.lmtp}, L{pullmail.storage.indoubt}):

- the receiver is SIGKILLed after the store took the message, before its
  reply: restarted, it retrieves the message again (the sender never heard
  250) and keeps the copy aside in ``in-doubt/`` instead of delivering it
  a second time;
- the store drops the connection after the data, the node running: the
  copy is kept aside at once, the sender (or the submitting client) hears
  250, and nothing is sent to the store again, however long one waits.

    sender 127.0.0.2 (sender.test)   receiver 127.0.0.3 (receiver.test)
    LMTP store 127.0.0.84:2424
"""

from __future__ import annotations

import json
import socket
import threading
import time

from .harness import ScriptedPeer, submit, wait_until
from .world import ALICE, BOB, PASSWORD, Network, outbox_ids

STORE = ("127.0.0.84", 2424)
MESSAGE = b"From: alice@sender.test\r\nSubject: once over LMTP\r\n\r\nhello\r\n"
FAST = {"retrieval": {"schedule": ["0s", "1s", "2s", "2s", "2s", "2s"]},
        "delivery": {"push_retry": ["1s"], "connect_timeout": "3s"}}


class ScriptedStore(ScriptedPeer):
    """
    An LMTP server (RFC 2033) that calls C{at_dot()} after each message,
    before its replies: False hangs up without them.  C{messages}: every
    message the store took (committed, as far as the store goes).
    """

    def __init__(self, at_dot) -> None:
        super().__init__(*STORE)
        self.at_dot = at_dot
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self.start()

    def taken(self) -> int:
        with self._lock:
            return len(self.messages)

    def handle(self, conn: socket.socket, source) -> None:
        with conn.makefile("rwb") as stream:
            def say(line: str) -> None:
                stream.write(line.encode() + b"\r\n")
                stream.flush()

            say("220 store.receiver.test LMTP")
            recipients = 0
            for line in stream:
                verb = line[:4].upper()
                if verb == b"LHLO":
                    say("250-store.receiver.test\r\n250 PIPELINING")
                elif verb in (b"MAIL", b"RSET"):
                    recipients = 0
                    say("250 2.1.0 Ok")
                elif verb == b"RCPT":
                    recipients += 1
                    say("250 2.1.5 Ok")
                elif verb == b"DATA":
                    say("354 go ahead")
                    data = b"".join(iter(stream.readline, b".\r\n"))
                    with self._lock:
                        self.messages.append(data)
                    if not self.at_dot():
                        return                    # the reply never comes
                    for _ in range(recipients):
                        say("250 2.0.0 Ok: saved")
                elif verb == b"QUIT":
                    say("221 bye")
                    return
                else:
                    say("500 5.5.1 what?")


def test_a_receiver_killed_during_the_lmtp_transaction_delivers_once(tmp_path, world_dns):
    network = Network(tmp_path, world_dns, FAST)
    killed = []

    def at_dot() -> bool:
        if killed:
            return True
        killed.append(receiver.kill())
        return False

    store = ScriptedStore(at_dot)
    try:
        sender = network.sender()
        receiver = network.receiver({"delivery": {"local": "lmtp:tcp:{}:{}".format(*STORE)}})
        assert submit(sender, ALICE, PASSWORD, [BOB], MESSAGE) == {}
        wait_until(lambda: killed, 20, message="the receiver killed at the store's dot")
        assert store.taken() == 1
        receiver.start()
        receiver.wait_log(r"retrieved \S+ \(\w+\) again after its delivery to the mail store"
                          r" was cut off: kept aside in \S+in-doubt/\w+\.eml", 20)
        wait_until(lambda: not outbox_ids(sender), 20, message="the sender let go")
        assert store.taken() == 1
        [kept] = (receiver.state_dir / "in-doubt").iterdir()
        data = kept.read_bytes()
        assert b"X-Pullmail-Envelope-To: bob@receiver.test\r\n" in data
        assert b"Subject: once over LMTP" in data
    finally:
        store.close()
        network.close()


def test_a_store_that_hangs_up_after_the_data_gets_each_message_once(tmp_path, world_dns):
    """
    The store takes each message and hangs up before its reply, the node
    running.  Retrieved mail: kept aside, the sender hears 250 and lets go.
    Submitted mail (the router's path): the client hears 250, kept aside.
    Past every retry interval the store has had each message once, and
    ``pullmail queue --json`` lists both copies for the operator.
    """
    network = Network(tmp_path, world_dns, FAST)
    store = ScriptedStore(at_dot=lambda: False)
    try:
        sender = network.sender()
        receiver = network.receiver({"delivery": {"local": "lmtp:tcp:{}:{}".format(*STORE)}})
        assert submit(sender, ALICE, PASSWORD, [BOB], MESSAGE) == {}
        receiver.wait_log(r"LMTP delivery of \w+ to LMTP server \S+ cut off after the data"
                          r" \(.*\): the store may have it or not for \['bob@receiver.test'\];"
                          r" kept aside in \S+in-doubt/\w+\.eml", 20)
        wait_until(lambda: not outbox_ids(sender), 20, message="the sender let go")
        assert submit(receiver, BOB, PASSWORD, [BOB], MESSAGE.replace(b"once", b"twice")) == {}
        assert store.taken() == 2
        time.sleep(5)    # past the retrieval schedule's and push_retry's intervals
        assert store.taken() == 2
        assert receiver.running() and store.errors == []
        kept = sorted(p.read_bytes() for p in (receiver.state_dir / "in-doubt").iterdir())
        assert len(kept) == 2
        assert all(b"X-Pullmail-Envelope-To: bob@receiver.test\r\n" in k for k in kept)
        assert [b"Subject: once" in k for k in kept].count(True) == 1
        listing = json.loads(receiver.cli("queue", "--json").stdout)
        assert [m["recipients"] for m in listing["messages"] if m["queue"] == "in-doubt"] == [
            [BOB]] * 2
    finally:
        store.close()
        network.close()
