"""
Hostile peers against real nodes: what outside testing tried, case by case
(the "hostile peers, round two" issue).

    sender.test    127.0.0.2  mx.sender.test   alice (the node under test)
    other.test     127.0.0.4  mx.other.test    a scripted peer, push only
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time

import pytest

from .harness import DNSServer, NodeFactory, ScriptedPeer, free_port, submit, wait_until

SENDER_IP = "127.0.0.2"
PEER_IP = "127.0.0.4"
ALICE = "alice@sender.test"
CAROL = "carol@other.test"
PASSWORD = "pw-" + "x" * 8

RECORDS = {
    "sender.test": {"A": [SENDER_IP], "MX": [[10, "mx.sender.test"]],
                    "TXT": [f"v=spf1 ip4:{SENDER_IP} -all"]},
    "mx.sender.test": {"A": [SENDER_IP]},
    "other.test": {"A": [PEER_IP], "MX": [[10, "mx.other.test"]],
                   "TXT": [f"v=spf1 ip4:{PEER_IP} -all"]},
    "mx.other.test": {"A": [PEER_IP]},
}

FAST = {"delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "3s"}}


@pytest.fixture(scope="module")
def hostile_dns(tmp_path_factory):
    server = DNSServer(tmp_path_factory.mktemp("hostile-dns"), RECORDS, free_port("127.0.0.1"))
    with server:
        yield server


@pytest.fixture
def sender(tmp_path, hostile_dns):
    factory = NodeFactory(tmp_path)
    try:
        yield factory.for_domain("sender", SENDER_IP, "sender.test", [ALICE], PASSWORD,
                                 FAST, hostile_dns)
    finally:
        factory.close()


def outbox_ids(node) -> set[str]:
    ids = set()
    for folder in ("entries", "claimed"):
        path = node.state_dir / "outbox" / folder
        if path.is_dir():
            ids |= {p.stem for p in path.glob("*.json")}
    return ids


class STARTTLSInjector(ScriptedPeer):
    """
    A push-only MX that offers STARTTLS and answers it with C{220} and, in
    the same write, a forged EHLO reply; then it really does TLS (with the
    sender node's own certificate) and plays an honest server.  It records
    every command it reads under TLS, and whether any message text came.
    """

    INJECTED = b"220 2.0.0 go ahead\r\n250-mx.fake\r\n250 PIPELINING\r\n"

    def __init__(self, certificate, key) -> None:
        super().__init__(PEER_IP)
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
