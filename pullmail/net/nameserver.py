"""
DNS questions on the wire, on the reactor: dnspython builds and checks the
messages, the reactor waits for the answers, so no thread is ever held by
a nameserver that does not answer (issue 18).

Each question goes over UDP from a fresh socket on a kernel-chosen
ephemeral port with a random id (RFC 5452 9.2, RFC 6056), to each server in
turn for its share of the timeout; a truncated answer is asked again over
TCP (RFC 7766 5).  Only a response that matches the question is taken
(dnspython's C{is_response}: id, question section); anything else that
arrives on the socket is ignored.
"""

from __future__ import annotations

import socket
import struct
from typing import Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from pullmail.net.dns import DNSTemporaryError

__all__ = ["NameserverQuery"]

MAX_UDP_ANSWER = 65535


@implementer(IReadDescriptor)
class _UDPExchange:
    """One question to one server over UDP; C{deferred} fires with the response."""

    def __init__(self, reactor, server: tuple[str, int], query: dns.message.Message,
                 timeout: float) -> None:
        self.reactor = reactor
        self.query = query
        self.deferred = defer.Deferred()
        host, port = server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        try:
            self.socket.connect((host, port))      # binds an ephemeral port
            self.socket.send(query.to_wire())
        except OSError as e:
            self.socket.close()
            self.deferred.errback(DNSTemporaryError(f"{host}:{port}: {e.strerror}"))
            return
        reactor.addReader(self)
        self._timer = reactor.callLater(timeout, self._finish,
                                        Failure(DNSTemporaryError(f"{host}:{port}: timeout")))

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "dns"

    def doRead(self) -> None:
        try:
            data = self.socket.recv(MAX_UDP_ANSWER)
        except BlockingIOError:
            return
        except OSError as e:   # ICMP port unreachable: nothing listens there
            self._finish(Failure(DNSTemporaryError(f"no nameserver: {e.strerror}")))
            return
        try:
            response = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return             # junk, perhaps spoofed: keep waiting for the answer
        if self.query.is_response(response):
            self._finish(response)

    def connectionLost(self, reason) -> None:
        self._finish(reason)

    def _finish(self, outcome) -> None:
        if self.deferred.called:
            return
        if self._timer.active():
            self._timer.cancel()
        self.reactor.removeReader(self)
        self.socket.close()
        if isinstance(outcome, Failure):
            self.deferred.errback(outcome)
        else:
            self.deferred.callback(outcome)


class _TCPExchange(Protocol):
    """One question over TCP, two-octet length prefixed (RFC 1035 4.2.2)."""

    def __init__(self, query: dns.message.Message, deferred: defer.Deferred) -> None:
        self.query, self.deferred, self.buffer = query, deferred, b""

    def connectionMade(self) -> None:
        wire = self.query.to_wire()
        self.transport.write(struct.pack("!H", len(wire)) + wire)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < 2:
            return
        (length,) = struct.unpack("!H", self.buffer[:2])
        if len(self.buffer) < 2 + length:
            return
        try:
            response = dns.message.from_wire(self.buffer[2:2 + length])
        except dns.exception.DNSException as e:
            response = Failure(DNSTemporaryError(f"bad answer over TCP: {e}"))
        self.transport.loseConnection()
        if not self.deferred.called:
            if isinstance(response, Failure):
                self.deferred.errback(response)
            else:
                self.deferred.callback(response)

    def connectionLost(self, reason) -> None:
        if not self.deferred.called:
            self.deferred.errback(DNSTemporaryError("TCP connection to nameserver lost"))


class _TCPFactory(ClientFactory):
    noisy = False

    def __init__(self, query: dns.message.Message, deferred: defer.Deferred) -> None:
        self.query, self.deferred = query, deferred

    def buildProtocol(self, addr) -> _TCPExchange:
        return _TCPExchange(self.query, self.deferred)

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.deferred.called:
            self.deferred.errback(DNSTemporaryError(f"nameserver: {reason.getErrorMessage()}"))


class NameserverQuery:
    """
    C{query(qname, rdtype)} for L{pullmail.net.dns.Resolver}: asks
    C{servers} [(host, port)] in turn, each for its share of C{timeout};
    fires with the dnspython response, or fails with L{DNSTemporaryError}.
    """

    def __init__(self, servers: Sequence[tuple[str, int]], reactor, timeout: float) -> None:
        self.servers = list(servers)
        self.reactor = reactor
        self.timeout = timeout

    @classmethod
    def of(cls, resolver, reactor) -> "NameserverQuery":
        """The nameservers and timeout of a dnspython C{resolver} (the system's on port 53)."""
        servers = []
        for nameserver in resolver.nameservers:
            if isinstance(nameserver, dns.nameserver.Do53Nameserver):
                servers.append((nameserver.address, nameserver.port))
            elif isinstance(nameserver, str):
                servers.append((nameserver, resolver.port))
        return cls(servers, reactor, resolver.lifetime)

    def __call__(self, qname: dns.name.Name, rdtype: int) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._ask(qname, rdtype))

    async def _ask(self, qname: dns.name.Name, rdtype: int) -> dns.message.Message:
        if not self.servers:
            raise DNSTemporaryError("no nameservers configured")
        share = self.timeout / len(self.servers)
        errors = []
        for server in self.servers:
            query = dns.message.make_query(qname, rdtype)   # a random id each time
            try:
                response = await _UDPExchange(self.reactor, server, query, share).deferred
                if response.flags & dns.flags.TC:
                    response = await self._tcp(server, query, share)
                return response
            except DNSTemporaryError as e:
                errors.append(str(e))
        raise DNSTemporaryError("; ".join(errors))

    def _tcp(self, server: tuple[str, int], query, timeout: float) -> defer.Deferred:
        d = defer.Deferred()
        host, port = server
        self.reactor.connectTCP(host, port, _TCPFactory(query, d), timeout=timeout)
        d.addTimeout(timeout, self.reactor,
                     onTimeoutCancel=lambda *_: Failure(DNSTemporaryError("TCP timeout")))
        return d
