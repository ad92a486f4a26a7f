"""
Tests for L{pullmail.smtp.writes}: a reply goes on the socket at once when
nothing waits before it, with no write interest registered; otherwise it
goes through the transport's buffer, in order.  A real Twisted TCP
transport over a UNIX socket pair, on a L{MemoryReactor}: no reactor runs,
no network.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from pullmail.accounts.users import Accounts
from pullmail.smtp.protocol import ConnectionLimits, SMTPServerFactory
from pullmail.smtp.server import ServerPolicy
from pullmail.smtp.writes import write_now


@pytest.fixture
def pair():
    """(a tcp.Server over one end, the other end, the reactor)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("peer", 0), None, 1, reactor)
    yield transport, theirs, reactor
    ours.close()
    theirs.close()


def test_sent_at_once_without_write_interest(pair) -> None:
    transport, theirs, reactor = pair
    write_now(transport, b"250 2.0.0 Ok\r\n")
    assert theirs.recv(100) == b"250 2.0.0 Ok\r\n"
    assert transport not in reactor.getWriters()
    assert transport.dataBuffer == b"" and not transport._tempDataBuffer


def test_behind_buffered_data_it_waits_its_turn(pair) -> None:
    transport, theirs, reactor = pair
    transport.write(b"first\r\n")         # buffered: the reactor has not turned
    write_now(transport, b"second\r\n")
    with pytest.raises(BlockingIOError):
        theirs.recv(100)                  # nothing overtook the buffer
    transport.doWrite()
    assert theirs.recv(100) == b"first\r\nsecond\r\n"


def test_what_the_socket_does_not_take_is_buffered(pair) -> None:
    transport, theirs, reactor = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = b"x" * (4 << 20)
    write_now(transport, big)
    assert transport in reactor.getWriters()      # the rest waits for writability
    received = bytearray()
    while len(received) < len(big):
        try:
            received += theirs.recv(1 << 20)
        except BlockingIOError:
            transport.doWrite()
    assert bytes(received) == big


def test_other_transports_get_a_plain_write() -> None:
    transport = StringTransport()     # like a TLS transport: no TCP socket to send on
    write_now(transport, b"220 ready\r\n")
    assert transport.value() == b"220 ready\r\n"


class Recording(ProtocolWrapper):
    """A wrapper such as TLSMemoryBIOProtocol: it answers for its transport's attributes."""

    def __init__(self, transport) -> None:
        super().__init__(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        self.transport = transport
        self.connected = True             # as makeConnection leaves it
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_wrapped_transport_is_written_through_its_wrapper(pair) -> None:
    """Implicit TLS: nothing may reach the socket around the TLS layer."""
    transport, theirs, reactor = pair
    wrapper = Recording(transport)
    assert wrapper.TLS is False and wrapper.writeSomeData     # what a wrapper answers
    write_now(wrapper, b"220 ready\r\n")
    assert wrapper.written == [b"220 ready\r\n"]
    with pytest.raises(BlockingIOError):
        theirs.recv(100)


def test_a_closing_connection_sends_through_its_buffer(pair) -> None:
    transport, theirs, reactor = pair
    transport.disconnecting = True
    write_now(transport, b"221 Bye\r\n")
    assert transport._tempDataBuffer == [b"221 Bye\r\n"]


def test_the_server_replies_without_waiting_for_the_reactor(pair) -> None:
    """SMTPConnection's replies (greeting, EHLO) reach the peer at once."""
    transport, theirs, reactor = pair
    policy = ServerPolicy(hostname="mx.example.org", domains=("example.org",),
                          accounts=Accounts(frozenset({"example.org"}), users={}))
    factory = SMTPServerFactory(policy, Clock(), ConnectionLimits(10, 10), 300.0, {})
    transport.client = ("192.0.2.1", 40000)
    protocol = factory.buildProtocol(None)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    assert theirs.recv(100) == b"220 mx.example.org ESMTP pullmail\r\n"
    protocol.dataReceived(b"NOOP\r\n")
    assert theirs.recv(100) == b"250 2.0.0 Ok\r\n"
    assert transport not in reactor.getWriters()


def test_a_transport_without_twisteds_buffers_takes_writes_way() -> None:
    """Should Twisted rename its buffers, write() is used: never a wrong order."""

    class Renamed(tcp.Server):
        def __init__(self) -> None:          # a TCP transport whose buffers have other names
            self.TLS, self.connected, self.disconnecting = False, True, False
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def writeSomeData(self, data: bytes) -> int:
            raise AssertionError("sent past a buffer it could not see")

    transport = Renamed()
    write_now(transport, b"250 2.0.0 Ok\r\n")
    assert transport.written == [b"250 2.0.0 Ok\r\n"]
