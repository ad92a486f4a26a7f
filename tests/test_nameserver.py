"""
Tests for L{pullmail.net.nameserver}: one DNS question over UDP on the
reactor, against a plain UDP socket on loopback playing the nameserver.
The reactor is a L{Clock} that also keeps readers; C{pump} hands them
whatever has arrived (select with no wait), so nothing sleeps.
"""

from __future__ import annotations

import select
import socket

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
from twisted.internet.task import Clock

from pullmail.net.dns import DNSTemporaryError
from pullmail.net.nameserver import NameserverQuery
from pullmail.testing import assert_no_result, failure_of, result_of

NAME = dns.name.from_text("mx.example.")


class ReadingClock(Clock):
    """A Clock with IReactorFDSet's addReader/removeReader."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: set = set()

    def addReader(self, reader) -> None:
        self.readers.add(reader)

    def removeReader(self, reader) -> None:
        self.readers.discard(reader)

    def pump(self) -> None:
        for _ in range(10):
            ready, _, _ = select.select(list(self.readers), [], [], 0.2)
            if not ready:
                return
            for reader in ready:
                reader.doRead()


@pytest.fixture
def server():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


def _answer(server, *, wrong_id_first=False) -> None:
    data, client = server.recvfrom(65535)
    query = dns.message.from_wire(data)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(NAME, 60, "IN", "A", "192.0.2.7"))
    if wrong_id_first:
        spoofed = dns.message.make_response(query)
        spoofed.id = (query.id + 1) % 65536
        server.sendto(spoofed.to_wire(), client)
        server.sendto(b"junk", client)
    server.sendto(response.to_wire(), client)


def test_udp_answer(server) -> None:
    """The answer to our question is taken; spoofed ids and junk are ignored."""
    reactor = ReadingClock()
    d = NameserverQuery([server.getsockname()], reactor, 2.0)(NAME, dns.rdatatype.A)
    _answer(server, wrong_id_first=True)
    reactor.pump()
    response = result_of(d)
    assert [r.to_text() for r in response.answer[0]] == ["192.0.2.7"]
    assert reactor.readers == set() and reactor.getDelayedCalls() == []


def test_silent_server_times_out_then_next(server) -> None:
    """Each server gets its share of the timeout; the next one is asked."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    reactor = ReadingClock()
    try:
        query = NameserverQuery([silent.getsockname(), server.getsockname()], reactor, 2.0)
        d = query(NAME, dns.rdatatype.A)
        assert_no_result(d)
        reactor.advance(1.0)
        _answer(server)
        reactor.pump()
        assert result_of(d).answer
    finally:
        silent.close()


def test_nothing_listening_fails_fast() -> None:
    """ICMP port unreachable ends the wait at once: a temporary failure."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()
    probe.close()
    reactor = ReadingClock()
    d = NameserverQuery([closed], reactor, 5.0)(NAME, dns.rdatatype.A)
    reactor.pump()
    failure_of(d, DNSTemporaryError)
    assert reactor.readers == set()


def test_no_nameservers() -> None:
    failure_of(NameserverQuery([], ReadingClock(), 1.0)(NAME, dns.rdatatype.A), DNSTemporaryError)
