"""
Public fakes for testing pullmail and code built on it: no sockets, no DNS,
no threads, no global reactor.

  - L{FakeResolver}: the L{pullmail.net.dns.Resolver} seam (C{mx}, C{addresses},
    C{txt}) answered from dicts, failing on demand.
  - L{MemoryOutbox}: an L{IOutbox} in memory, with a "disk" that survives a
    simulated restart (L{MemoryOutbox.restarted}).
  - L{run_blocking}: runs the "blocking" call at once, as a Deferred.
  - L{FakeTrust}: an L{ITrustPolicy} with fixed verdicts.
  - L{FakeDeliveryAgent}: an L{IDeliveryAgent} that refuses chosen
    addresses with chosen replies (an LMTP store's per-recipient answers).
  - L{cache_dns_answer}, L{cache_dns_nxdomain}: fill a real dnspython
    resolver's cache, as lookups would have.
  - L{FakeNameserver}: the network behind a real L{pullmail.net.dns.Resolver},
    answering from a zone dict, or never (C{silent} names).
  - L{result_of}, L{failure_of}, L{assert_no_result}: what trial's
    C{successResultOf} and friends do, for plain pytest tests.
  - L{FakeNetwork}: a C{connect(address, port, performers={})} that pairs a
    L{ClientConnection} with an in-memory server through
    L{twisted.test.iosim}; C{flush()} moves the bytes.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Callable, Iterable, Mapping, Sequence

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from pullmail.interfaces import DeliveryOutcome, IDeliveryAgent, IOutbox, ITrustPolicy
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, NotCached, TXTAnswer
from pullmail.smtp.protocol import ClientConnection
from pullmail.smtp.replies import Reply
from pullmail.storage.outbox import OneNode, OutboxEntry

__all__ = [
    "FakeResolver",
    "HeldRunner",
    "MemoryOutbox",
    "run_blocking",
    "result_of",
    "failure_of",
    "assert_no_result",
    "not_refused",
    "FakeTrust",
    "FakeDeliveryAgent",
    "FakeNetwork",
    "make_entry",
    "cache_dns_answer",
    "cache_dns_nxdomain",
    "FakeNameserver",
]


def _outcome(d: defer.Deferred) -> object:
    """Take the result C{d} already has (it is consumed, as trial's are)."""
    outcome: list = []
    d.addBoth(outcome.append)
    if not outcome:
        raise AssertionError(f"{d!r} has no result yet")
    return outcome[0]


def result_of(d: defer.Deferred) -> object:
    """The result C{d} already has; AssertionError if it has none or failed."""
    result = _outcome(d)
    if isinstance(result, Failure):
        raise AssertionError(f"{d!r} failed: {result.getTraceback()}")
    return result


def failure_of(d: defer.Deferred, *expected: type[BaseException]) -> Failure:
    """
    The failure C{d} already has (of one of the C{expected} types, when
    given); AssertionError if it has none or succeeded.
    """
    result = _outcome(d)
    if not isinstance(result, Failure):
        raise AssertionError(f"{d!r} succeeded with {result!r}")
    if expected and not result.check(*expected):
        raise AssertionError(f"{d!r} failed with {result.type}, not {expected}")
    return result


def assert_no_result(d: defer.Deferred) -> None:
    """AssertionError if C{d} already has a result."""
    seen: list = []
    d.addBoth(lambda result: seen.append(result) or result)
    if seen:
        raise AssertionError(f"{d!r} already has a result: {seen[0]!r}")


def not_refused(function: Callable, values: Iterable, error: type[Exception] = ValueError
                ) -> list:
    """
    The values C{function} takes without raising C{error}: a test asserts
    the list is empty, so that a failure names the values let through.
    """
    accepted = []
    for value in values:
        try:
            function(value)
        except error:
            continue
        accepted.append(value)
    return accepted


def run_blocking(f: Callable, *args, **kwargs) -> defer.Deferred:
    """A synchronous stand-in for C{deferToThreadPool(reactor, pool, ...)}."""
    return defer.maybeDeferred(f, *args, **kwargs)


class HeldRunner:
    """A run_blocking whose work waits until the test runs it, in order."""

    def __init__(self) -> None:
        self.work: list = []

    def __call__(self, function, *args) -> defer.Deferred:
        d = defer.Deferred()
        self.work.append((function, args, d))
        return d

    def run_all(self) -> None:
        while self.work:
            function, args, d = self.work.pop(0)
            d.callback(function(*args))


class FakeResolver:
    """
    The L{pullmail.net.dns.Resolver} seam, answered from dicts (also as
    records through C{cached}/C{lookup}, so the real SPF check runs on it).  A name in
    C{temporary} fails with L{DNSTemporaryError}, one in C{permanent} with
    L{DNSPermanentError}, for every record type.  Names not in a dict have no records of that type.
    Every question is recorded in C{queries} as C{(rdtype, name)}.
    C{txt_answer} gives every answer, NXDOMAIN included, the TTL C{ttl}.

    @ivar mx_records: domain -> [(preference, host)]
    @ivar hosts: host -> [address]
    @ivar texts: name -> [text]
    """

    ttl = 300.0

    def __init__(
        self,
        mx: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        addresses: Mapping[str, Sequence[str]] | None = None,
        txt: Mapping[str, Sequence[str]] | None = None,
        temporary: Iterable[str] = (),
        permanent: Iterable[str] = (),
    ) -> None:
        self.mx_records = dict(mx or {})
        self.hosts = dict(addresses or {})
        self.texts = dict(txt or {})
        self.temporary = set(temporary)
        self.permanent = set(permanent)
        self.queries: list[tuple[str, str]] = []

    def _answer(self, rdtype: str, name: str, table: Mapping) -> defer.Deferred:
        self.queries.append((rdtype, name))
        if name in self.temporary:
            return defer.fail(DNSTemporaryError(f"{name} {rdtype}: timeout"))
        if name in self.permanent:
            return defer.fail(DNSPermanentError(f"{name}: no such domain"))
        return defer.succeed(list(table.get(name, [])))

    def mx(self, domain: str) -> defer.Deferred:
        """[(preference, host)] sorted; [] when the domain has no MX."""
        d = self._answer("MX", domain, self.mx_records)
        return d.addCallback(sorted)

    def addresses(self, host: str) -> defer.Deferred:
        """The A and AAAA addresses of C{host}; an IP address is itself."""
        try:
            return defer.succeed([str(ipaddress.ip_address(host))])
        except ValueError:
            pass
        return self._answer("A", host, self.hosts)

    def a_records(self, name: str) -> defer.Deferred:
        """Only A records (the DNSBL lookups): the IPv4 entries of C{hosts}."""
        d = self._answer("A", name, self.hosts)
        return d.addCallback(lambda found: [a for a in found if ":" not in a])

    def txt(self, name: str) -> defer.Deferred:
        return self._answer("TXT", name, self.texts)

    def txt_answer(self, name: str) -> defer.Deferred:
        """L{txt} as a L{TXTAnswer} of TTL C{ttl}."""
        d = self._answer("TXT", name, self.texts)
        return d.addCallbacks(lambda found: TXTAnswer(found, self.ttl), self._timed_failure)

    def _timed_failure(self, failure):
        if failure.check(DNSPermanentError):
            raise DNSPermanentError(*failure.value.args, ttl=self.ttl)
        return failure

    def cached(self, name: str, rdtype: str) -> list:
        """Nothing is ever cached: every question goes to L{lookup}."""
        raise NotCached(name, rdtype)

    def lookup(self, name: str, rdtype: str) -> defer.Deferred:
        """The records of C{name} as dnspython rdata (what SPF reads), from the dicts."""
        if rdtype == "MX":
            d, texts = self._answer(rdtype, name, self.mx_records), lambda found: [
                f"{preference} {host}." for preference, host in found]
        elif rdtype in ("A", "AAAA"):
            d, texts = self._answer(rdtype, name, self.hosts), lambda found: [
                a for a in found if (":" in a) == (rdtype == "AAAA")]
        elif rdtype == "TXT":
            d, texts = self._answer(rdtype, name, self.texts), lambda found: [
                '"' + t.replace('"', '\\"') + '"' for t in found]
        else:
            d, texts = self._answer(rdtype, name, {}), list
        return d.addCallback(lambda found: [
            dns.rdata.from_text("IN", rdtype, text) for text in texts(found)])


@implementer(IOutbox)
class MemoryOutbox(OneNode):
    """
    An outbox in memory.  Like L{pullmail.storage.outbox.MaildirOutbox}, it keeps a
    "disk" (entries as JSON, claims, messages) apart from its index, so a
    restart can be simulated: L{restarted} gives a new outbox over the same
    disk, whose L{load} releases the stale claims.
    """

    def __init__(self, disk: dict | None = None) -> None:
        self.disk = disk if disk is not None else {"entries": {}, "claimed": set(), "data": {}}
        self._index: dict[str, OutboxEntry] = {}

    def restarted(self) -> "MemoryOutbox":
        return MemoryOutbox(self.disk)

    def load(self) -> list[str]:
        released = sorted(self.disk["claimed"])
        self.disk["claimed"] = set()
        self._index = {
            entry_id: OutboxEntry.from_json(record)
            for entry_id, record in self.disk["entries"].items()
            if entry_id in self.disk["data"]
        }
        return released

    def add(self, entries: Sequence[OutboxEntry], chunks: Sequence[bytes]) -> None:
        message = b"".join(chunks)
        for entry in entries:
            self.disk["data"][entry.id] = message
            self.update(entry)

    def add_sibling(self, existing_id: str, entry: OutboxEntry) -> None:
        self.disk["data"][entry.id] = self.disk["data"][existing_id]
        self.update(entry)

    def update(self, entry: OutboxEntry) -> None:
        self.disk["entries"][entry.id] = entry.to_json()
        self._index[entry.id] = entry

    def flushed(self, entry_id: str) -> defer.Deferred:
        return defer.succeed(None)

    def claim(self, entry_id: str) -> OutboxEntry | None:
        entry = self._index.get(entry_id)
        if entry is None or entry.claimed or entry_id in self.disk["claimed"]:
            return None
        self.disk["claimed"].add(entry_id)
        entry.claimed = True
        return entry

    def release(self, entry_id: str) -> None:
        entry = self._index.get(entry_id)
        if entry is None or not entry.claimed:
            return
        self.disk["claimed"].discard(entry_id)
        entry.claimed = False

    def remove(self, entry_id: str, after: defer.Deferred | None = None) -> None:
        if self._index.pop(entry_id, None) is None:
            return
        if after is None:
            self._forget_on_disk(entry_id)
            return

        def forget(result):
            self._forget_on_disk(entry_id)
            return result

        after.addCallbacks(forget, lambda failure: None)

    def _forget_on_disk(self, entry_id: str) -> None:
        self.disk["entries"].pop(entry_id, None)
        self.disk["claimed"].discard(entry_id)
        self.disk["data"].pop(entry_id, None)

    def read_message(self, entry_id: str) -> bytes:
        try:
            return self.disk["data"][entry_id]
        except KeyError:
            raise FileNotFoundError(entry_id) from None


@implementer(ITrustPolicy)
class FakeTrust:
    """
    Trusts everyone, except the domains in C{verdicts} (domain -> L{Reply}).
    C{default} is the verdict for the others.  Calls are recorded in
    C{calls} as C{(peer, domain, helo, sender)}.
    """

    name = "fake"

    def __init__(self, verdicts: Mapping[str, Reply] | None = None,
                 default: Reply | None = None) -> None:
        self.verdicts = dict(verdicts or {})
        self.default = default
        self.calls: list[tuple[str, str, str, str | None]] = []

    def check(self, peer: str, domain: str, helo: str, sender: str | None) -> defer.Deferred:
        self.calls.append((peer, domain, helo, sender))
        return defer.succeed(self.verdicts.get(domain.lower(), self.default))


@implementer(IDeliveryAgent)
class FakeDeliveryAgent:
    """
    Delivers every address except those in C{refusals} (address -> L{Reply}),
    which it refuses with their reply; fails with C{error} (an OSError)
    when set.  Calls are recorded in C{calls} as C{(queue_id, sender,
    addresses, chunks)} (the Maildir++ folder of each in C{folders}), and
    the messages delivered per address in C{mailboxes}.
    """

    root = None

    def __init__(self, refusals: Mapping[str, Reply] | None = None) -> None:
        self.refusals = dict(refusals or {})
        self.error: OSError | None = None
        self.calls: list[tuple[str, str, list[str], list[bytes]]] = []
        self.folders: list[str | None] = []
        self.mailboxes: dict[str, list[bytes]] = {}

    def deliver(self, queue_id: str, sender: str, addresses: Sequence[str],
                chunks: Sequence[bytes], folder: str | None = None) -> defer.Deferred:
        if self.error is not None:
            return defer.fail(self.error)
        self.calls.append((queue_id, sender, list(addresses), list(chunks)))
        self.folders.append(folder)
        delivered = [a for a in addresses if a not in self.refusals]
        for address in delivered:
            self.mailboxes.setdefault(address, []).append(b"".join(chunks))
        return defer.succeed(DeliveryOutcome(
            delivered=tuple(delivered),
            refused={a: self.refusals[a] for a in addresses if a in self.refusals},
        ))


def _address(host: str, port: int):
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


class FakeNetwork:
    """
    A network of in-memory servers.  C{listen(address, port, factory)} puts a
    server there; calling the network as C{connect(address, port,
    performers={})} builds the server's protocol and a L{ClientConnection},
    joins them with L{iosim.connect}, and fires with the client at once.
    Nothing moves until L{flush}.  Connecting where nothing listens fails
    with C{ConnectionRefusedError}.

    @ivar source: the address outbound connections come from (what the
        server sees as its peer).
    @ivar attempts: every C{(address, port)} connected to, in order.
    @ivar clients: every L{ClientConnection} made, in order.
    """

    def __init__(self, clock: IReactorTime, source: str = "192.0.2.10",
                 client_timeout: float = 300.0) -> None:
        self.clock = clock
        self.source = source
        self.client_timeout = client_timeout
        self.listeners: dict[tuple[str, int], object] = {}
        self.attempts: list[tuple[str, int]] = []
        self.clients: list[ClientConnection] = []
        self.pumps: list[iosim.IOPump] = []
        self._ports = itertools.count(40000)

    def listen(self, address: str, port: int, factory) -> None:
        self.listeners[(address, port)] = factory

    def stop_listening(self, address: str, port: int) -> None:
        del self.listeners[(address, port)]

    def __call__(self, address: str, port: int, performers: Mapping = {}) -> defer.Deferred:
        self.attempts.append((address, port))
        factory = self.listeners.get((address, port))
        if factory is None:
            return defer.fail(error.ConnectionRefusedError(f"{address}:{port}"))
        local = _address(self.source, next(self._ports))
        remote = _address(address, port)
        server = factory.buildProtocol(local)
        client = ClientConnection(self.clock, self.client_timeout, performers)
        server_transport = iosim.FakeTransport(server, True, hostAddress=remote,
                                               peerAddress=local)
        client_transport = iosim.FakeTransport(client, False, hostAddress=local,
                                               peerAddress=remote)
        pump = iosim.connect(server, server_transport, client, client_transport,
                             greet=False, clock=self.clock)
        self.pumps.append(pump)
        self.clients.append(client)
        return defer.succeed(client)

    def flush(self) -> bool:
        """Move bytes on every connection until all are quiet."""
        moved_any = False
        for _ in range(1000):
            moved = False
            for pump in list(self.pumps):
                if pump.flush():
                    moved = True
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self.pumps.remove(pump)
            if not moved:
                return moved_any
            moved_any = True
        raise AssertionError("the network never went quiet")


    def settle(self) -> None:
        """Run the clock's due calls and move bytes until nothing happens."""
        for _ in range(100):
            self.clock.advance(0)
            if not self.flush():
                return
        raise AssertionError("never settled")

    def advance(self, seconds: float) -> None:
        """Let C{seconds} pass on the clock, then settle."""
        self.clock.advance(seconds)
        self.settle()
    def open_connections(self) -> int:
        return len(self.pumps)


def make_entry(**fields) -> OutboxEntry:
    """An L{OutboxEntry} with test defaults, overridden by C{fields}."""
    defaults = dict(
        id="A" * 20, queue_id="Q1", sender="alice@sender.example", domain="receiver.example",
        recipients=["bob@receiver.example"], created=0.0, size=10,
    )
    defaults.update(fields)
    return OutboxEntry(**defaults)


def cache_dns_answer(resolver, name: str, rdtype: str, *texts: str) -> None:
    """Put an answer into C{resolver}'s cache as a lookup would (none: no-answer)."""
    response = dns.message.make_response(dns.message.make_query(name, rdtype))
    if texts:
        response.answer.append(dns.rrset.from_text(name + ".", 300, "IN", rdtype, *texts))
    _cache_response(resolver, name, dns.rdatatype.from_text(rdtype), response)


def cache_dns_nxdomain(resolver, name: str) -> None:
    """Put a NXDOMAIN for C{name} into C{resolver}'s cache (dnspython keys it under ANY)."""
    response = dns.message.make_response(dns.message.make_query(name, "A"))
    response.set_rcode(dns.rcode.NXDOMAIN)
    _cache_response(resolver, name, dns.rdatatype.ANY, response)


def _cache_response(resolver, name: str, rdtype, response) -> None:
    response = dns.message.from_wire(response.to_wire())   # as received off the wire
    qname = dns.name.from_text(name)
    answer = dns.resolver.Answer(qname, rdtype, dns.rdataclass.IN, response)
    resolver.cache.put((qname, rdtype, dns.rdataclass.IN), answer)


class FakeNameserver:
    """
    The C{query(qname, rdtype)} of a real L{pullmail.net.dns.Resolver},
    answered at once from C{zone} {(name, rdtype): [record texts]}: a name
    with no entry of any type is NXDOMAIN, one without that type a
    no-answer.  A name in C{silent} (or under one) never answers; its
    Deferreds wait in C{waiting}.  Every question is kept in C{asked}.
    """

    def __init__(self, zone: Mapping[tuple[str, str], Sequence[str]],
                 silent: Iterable[str] = ()) -> None:
        self.zone = {(name.lower(), rdtype): list(texts) for (name, rdtype), texts in zone.items()}
        self.silent = tuple(silent)
        self.asked: list[tuple[str, str]] = []
        self.waiting: list[defer.Deferred] = []

    def __call__(self, qname, rdtype) -> defer.Deferred:
        name = qname.to_text(omit_final_dot=True).lower()
        type_text = dns.rdatatype.to_text(rdtype)
        self.asked.append((name, type_text))
        if any(name == s or name.endswith("." + s) for s in self.silent):
            waiting = defer.Deferred()
            self.waiting.append(waiting)
            return waiting
        response = dns.message.make_response(dns.message.make_query(qname, rdtype))
        texts = self.zone.get((name, type_text))
        if texts:
            response.answer.append(dns.rrset.from_text(qname, 300, "IN", rdtype, *texts))
        elif not any(known == name for known, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return defer.succeed(dns.message.from_wire(response.to_wire()))
