"""
Retrieved mail over LMTP is delivered once even when the receiving node
is killed in the middle of the LMTP transaction (L{pullmail.pull.handover}):
a scripted LMTP store takes the message and, before it answers, the
receiver is SIGKILLed.  Restarted, the receiver retrieves the message
again (the sender never heard 250): the store must not get it a second
time; the copy is kept aside in ``in-doubt/`` and the log says so.

    sender 127.0.0.2 (sender.test)   receiver 127.0.0.3 (receiver.test)
    LMTP store 127.0.0.84:2424
"""

from __future__ import annotations

import socket
import threading

from .harness import submit, wait_until
from .world import ALICE, BOB, PASSWORD, Network, outbox_ids

STORE = ("127.0.0.84", 2424)
MESSAGE = b"From: alice@sender.test\r\nSubject: once over LMTP\r\n\r\nhello\r\n"


class ScriptedStore(threading.Thread):
    """An LMTP server (RFC 2033) that calls C{at_dot()} after each message, before its replies."""

    def __init__(self, at_dot) -> None:
        super().__init__(daemon=True)
        self.at_dot = at_dot
        self.messages: list[bytes] = []
        self.listener = socket.create_server(STORE)

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(client,), daemon=True).start()

    def _session(self, client: socket.socket) -> None:
        with client, client.makefile("rwb") as stream:
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
                    self.messages.append(data)   # committed, as far as the store goes
                    if not self.at_dot():
                        return                    # the reply never comes
                    for _ in range(recipients):
                        say("250 2.0.0 Ok: saved")
                elif verb == b"QUIT":
                    say("221 bye")
                    return
                else:
                    say("500 5.5.1 what?")

    def close(self) -> None:
        self.listener.close()


def test_a_receiver_killed_during_the_lmtp_transaction_delivers_once(tmp_path, world_dns):
    fast = {"retrieval": {"schedule": ["0s", "1s", "2s", "2s", "2s", "2s"]},
            "delivery": {"push_retry": ["1s"], "connect_timeout": "3s"}}
    network = Network(tmp_path, world_dns, fast)
    killed = []

    def at_dot() -> bool:
        if killed:
            return True
        killed.append(receiver.kill())
        return False

    store = ScriptedStore(at_dot)
    store.start()
    try:
        sender = network.sender()
        receiver = network.receiver({"delivery": {"local": "lmtp:tcp:{}:{}".format(*STORE)}})
        assert submit(sender, ALICE, PASSWORD, [BOB], MESSAGE) == {}
        wait_until(lambda: killed, 20, message="the receiver killed at the store's dot")
        assert len(store.messages) == 1
        receiver.start()
        receiver.wait_log(r"retrieved \S+ \(\w+\) again after its delivery to the mail store"
                          r" was cut off: kept aside in \S+in-doubt/\w+\.eml", 20)
        wait_until(lambda: not outbox_ids(sender), 20, message="the sender let go")
        assert len(store.messages) == 1
        [kept] = (receiver.state_dir / "in-doubt").iterdir()
        data = kept.read_bytes()
        assert b"X-Pullmail-Envelope-To: bob@receiver.test\r\n" in data
        assert b"Subject: once over LMTP" in data
    finally:
        store.close()
        network.close()
