"""
Hostile peers against real nodes: what outside testing tried, case by case
(the "hostile peers, round two" issue).

In the world of L{world}: the node under test is sender.test's, and the
MX of other.test (127.0.0.4) is a scripted peer.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time

import pytest

from .harness import ScriptedPeer, submit, wait_until
from .world import ALICE, CAROL, OTHER_IP, PASSWORD, Network, outbox_ids

FAST = {"delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "3s"}}


@pytest.fixture
def sender(tmp_path, world_dns):
    network = Network(tmp_path, world_dns, FAST)
    try:
        yield network.sender()
    finally:
        network.close()


class STARTTLSInjector(ScriptedPeer):
    """
    A push-only MX that offers STARTTLS and answers it with C{220} and, in
    the same write, a forged EHLO reply; then it really does TLS (with the
    sender node's own certificate) and plays an honest server.  It records
    every command it reads under TLS, and whether any message text came.
    """

    INJECTED = b"220 2.0.0 go ahead\r\n250-mx.fake\r\n250 PIPELINING\r\n"

    def __init__(self, certificate, key) -> None:
        super().__init__(OTHER_IP)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate, key)
        self.connections = 0
        self.commands: list[str] = []
        self.received_data = threading.Event()

    @staticmethod
    def _lines(conn):
        buffer = b""
        while True:
            while b"\r\n" not in buffer:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\r\n")
            yield line.decode("ascii", "replace")

    def handle(self, conn: socket.socket, source) -> None:
        self.connections += 1
        conn.sendall(b"220 mx.other.test ESMTP\r\n")
        lines = self._lines(conn)
        for line in lines:
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                conn.sendall(b"250-mx.other.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif verb == "STARTTLS":
                conn.sendall(self.INJECTED)
                break
            else:
                conn.sendall(b"502 5.5.1 not here\r\n")
        else:
            return
        tls = self.context.wrap_socket(conn, server_side=True)
        for line in self._lines(tls):
            self.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                tls.sendall(b"250-mx.other.test\r\n250 PIPELINING\r\n")
            elif verb == "DATA":
                tls.sendall(b"354 go\r\n")
                self.received_data.set()
                return
            else:
                tls.sendall(b"250 2.0.0 Ok\r\n")


def test_starttls_response_injection_keeps_the_mail(sender):
    """
    Issue 18 item 1: plaintext injected behind the 220 to STARTTLS breaks
    the session off; the message is not taken as delivered, stays queued
    and is tried again, and no bounce is written.
    """
    peer = STARTTLSInjector(sender.tls_certificate, sender.state_dir / "tls" / "key.pem")
    peer.start()
    try:
        refused = submit(sender, ALICE, PASSWORD, [CAROL],
                         b"From: alice@sender.test\r\nTo: carol@other.test\r\n"
                         b"Subject: injected\r\n\r\nbody\r\n")
        assert refused == {}
        sender.wait_log(r"behind its 220 to STARTTLS", 10)
        # push_retry 1s: a second attempt meets the same injection.
        wait_until(lambda: peer.connections >= 2, 10,
                   message=lambda: "a second attempt\n" + sender.diagnostics())
        assert len(outbox_ids(sender)) == 1, sender.diagnostics()
    finally:
        peer.close()
    assert not peer.received_data.is_set(), peer.commands
    assert not re.search(r"delivered \S+ to ", sender.log_text()), sender.diagnostics()
    time.sleep(0.5)
    assert sender.delivered(ALICE) == [], "a bounce for mail that was only deferred"
