"""
One DNS seam for MX lookups, the RETR destined-host check, SPF and DNSBL:
questions asked on the reactor (L{pullmail.net.nameserver}) to
``[dns] nameservers`` (the system's when empty),
answers kept in a dnspython cache for their TTL.  No thread waits on the
network, so a nameserver that never answers one origin's names delays no
one else's check (issue 18): each question waits its own timeout.

Answers are lists of records (L{TXTAnswer} adds how long they may be
reused); failures are L{DNSTemporaryError} (timeout, SERVFAIL: try later)
or L{DNSPermanentError} (the name does not exist).
A failure is remembered for L{FAILED_LOOKUP_TTL}, and one question in
flight is shared by everyone who asks it meanwhile.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pullmail import maillog

__all__ = ["Resolver", "DNSTemporaryError", "DNSPermanentError", "NotCached", "cached_answer",
           "mail_hosts", "TXTAnswer", "answer_ttl"]


DNS_CACHE_ENTRIES = 50_000
log = Logger(namespace="pullmail.net.dns")

# How long a timeout or SERVFAIL is remembered, so that a flood of questions
# for an attacker's silent names costs one wait, not one each.  RFC 2308 7
# allows up to five minutes; a short time lets a real outage heal quickly.
FAILED_LOOKUP_TTL = 10.0
FAILED_LOOKUP_ENTRIES = 10_000


class DNSTemporaryError(Exception):
    """No answer now (timeout, SERVFAIL); the question may be asked again."""


class DNSPermanentError(Exception):
    """
    The name does not exist (NXDOMAIN); C{ttl}, how many seconds that
    may be believed (RFC 2308 5; 0: not to be kept).
    """

    def __init__(self, *args, ttl: float = 0.0) -> None:
        super().__init__(*args)
        self.ttl = ttl


@dataclass(frozen=True)
class TXTAnswer:
    """A name's TXT records, and how many seconds they may be reused."""

    records: list[str]
    ttl: float


class NotCached(Exception):
    """The answer is not in the cache: finding it means waiting."""

    def __init__(self, name: str, rdtype: str = "") -> None:
        super().__init__(name)
        self.name, self.rdtype = name, rdtype


def cached_answer(resolver, name: str, rdtype: str) -> list:
    """
    The answer C{resolver} holds in its cache for (C{name}, C{rdtype}),
    never asking the network: its records ([] for a cached no-answer),
    L{DNSPermanentError} for a cached NXDOMAIN, L{NotCached} otherwise.
    The same cache keys dnspython's own resolve() consults, so the reactor
    thread can answer a busy origin's repeated questions without the hop
    to a thread and back.
    """
    return _records(_cached(resolver, name, rdtype))


def _cached(resolver, name: str, rdtype: str):
    """L{cached_answer}'s dnspython Answer, before its records are read."""
    answer, negative = _held(resolver, name, rdtype)
    if answer is not None and not negative:
        return answer
    if answer is not None and answer.response.rcode() == dns.rcode.NXDOMAIN:
        raise DNSPermanentError(f"{name}: no such domain", ttl=answer_ttl(answer))
    raise NotCached(name, rdtype)


def _held(resolver, name: str, rdtype: str) -> tuple:
    """
    What C{resolver}'s cache holds for the question, under the keys
    dnspython's resolve() uses: (its Answer, False), else (the negative
    Answer kept for the name, True), else (None, False).
    """
    cache = getattr(resolver, "cache", None)
    if cache is None:
        return None, False
    try:
        key, negative_key = _cache_keys(name, rdtype)
    except dns.exception.DNSException:
        return None, False
    answer = cache.get(key)
    if answer is not None:      # (an Answer with no records is false: not "or")
        return answer, False
    negative = cache.get(negative_key)
    return negative, negative is not None


def _records(answer) -> list:
    """The records of a dnspython Answer ([] for a no-answer)."""
    return [] if answer.rrset is None else list(answer)


def _txt_strings(answer) -> list[str]:
    """Each TXT record of C{answer} as one string (RFC 7208 3.3: its strings joined)."""
    return [b"".join(r.strings).decode("utf-8", "replace") for r in _records(answer)]


def _timed_txt(answer) -> TXTAnswer:
    return TXTAnswer(_txt_strings(answer), answer_ttl(answer))


def answer_ttl(answer) -> float:
    """
    How many seconds a dnspython Answer may still be used: the least TTL
    along its CNAME chain; for a no-answer or NXDOMAIN the negative TTL of
    RFC 2308 5 (the lesser of the SOA's TTL and MINIMUM), or 0 when the
    response had no SOA ("SHOULD NOT be cached"); never past the expiry
    dnspython's cache gave it (wall clock).
    """
    if answer.rrset is None and not any(
            rrset.rdtype == dns.rdatatype.SOA for rrset in answer.response.authority):
        return 0.0
    return max(0.0, min(answer.chaining_result.minimum_ttl, answer.expiration - time.time()))


@functools.lru_cache(maxsize=4096)
def _cache_keys(name: str, rdtype: str) -> tuple[tuple, tuple]:
    """
    dnspython's cache keys for the answer and for a cached NXDOMAIN: made
    once per name, as every message from a busy origin asks the same
    questions (parsing the name cost more than the cache lookup).
    """
    qname = dns.name.from_text(name)
    return ((qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN),
            (qname, dns.rdatatype.ANY, dns.rdataclass.IN))


def make_dnspython_resolver(nameservers: Sequence[tuple[str, int]], timeout: float):
    """A dnspython Resolver for the configured nameservers: the cache, and their list."""
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
        ]
    else:
        resolver = dns.resolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    # Answers, NXDOMAIN included, are kept for their TTL: SPF, DNSBL and MX
    # lookups of a busy origin hit the cache, not the network.
    resolver.cache = dns.resolver.LRUCache(DNS_CACHE_ENTRIES)
    return resolver


class Resolver:
    """
    Asynchronous lookups into a dnspython cache.  C{query(qname, rdtype)}
    asks the network and fires with a dnspython response or fails (a
    L{pullmail.net.nameserver.NameserverQuery} in a node); C{clock} times
    the remembered failures.
    """

    def __init__(self, resolver, clock, query: Callable[..., Deferred]) -> None:
        self._resolver = resolver
        self._clock = clock
        self._query = query
        self._in_flight: dict[tuple, list[Deferred]] = {}
        self._failed: OrderedDict[tuple, tuple[float, DNSTemporaryError]] = OrderedDict()

    def _cached(self, name: str, rdtype: str):
        """L{cached}, as the dnspython Answer."""
        remembered = self._failed.get((name.lower().rstrip("."), rdtype))
        if remembered is not None:
            until, error = remembered
            if self._clock.seconds() < until:
                raise error
            del self._failed[(name.lower().rstrip("."), rdtype)]
        return _cached(self._resolver, name, rdtype)

    def cached(self, name: str, rdtype: str) -> list:
        """
        The records for (C{name}, C{rdtype}) that are known now, never
        waiting: [] for a known no-answer; L{DNSPermanentError} for a known
        NXDOMAIN, L{DNSTemporaryError} for a failure remembered,
        L{NotCached} when only the network can tell.
        """
        return _records(self._cached(name, rdtype))

    def ttl(self, name: str, rdtype: str = "TXT") -> float | None:
        """
        Seconds the cached answer for (C{name}, C{rdtype}) lives on (records,
        a no-answer or an NXDOMAIN), on the cache's own clock; None when
        none is cached or a failure is remembered.
        """
        if (name.lower().rstrip("."), rdtype) in self._failed:
            return None
        answer, _ = _held(self._resolver, name, rdtype)
        return None if answer is None else max(0.0, answer.expiration - time.time())

    def lookup(self, name: str, rdtype: str) -> Deferred:
        """The records for (C{name}, C{rdtype}), from the cache or the network."""
        return self._lookup(name, rdtype, _records)

    def _lookup(self, name: str, rdtype: str, read: Callable) -> Deferred:
        """What C{read} makes of the dnspython Answer, from the cache or the network."""
        try:
            return succeed(read(self._cached(name, rdtype)))
        except (DNSPermanentError, DNSTemporaryError) as e:
            return fail(e)
        except NotCached:
            pass
        key = (name.lower().rstrip("."), rdtype)
        waiter = Deferred()
        if key in self._in_flight:
            self._in_flight[key].append(waiter)
        else:
            self._in_flight[key] = [waiter]
            self._ask(key, name, rdtype)
        return waiter.addCallback(read)

    def _ask(self, key: tuple, name: str, rdtype: str) -> None:
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            self._answered(key, DNSPermanentError(f"{name}: bad name ({e})"))
            return
        d = defer.maybeDeferred(self._query, qname, dns.rdatatype.from_text(rdtype))
        d.addCallback(self._remember, qname, name, rdtype)
        d.addErrback(self._failure, key, name, rdtype)
        d.addBoth(lambda outcome: self._answered(key, outcome))

    def _remember(self, response, qname, name: str, rdtype: str):
        """Cache a response as dnspython's own resolve() would; the Answer."""
        rcode = response.rcode()
        cache = self._resolver.cache
        if rcode == dns.rcode.NXDOMAIN:
            answer = dns.resolver.Answer(qname, dns.rdatatype.ANY, dns.rdataclass.IN, response)
            cache.put((qname, dns.rdatatype.ANY, dns.rdataclass.IN), answer)
            raise DNSPermanentError(f"{name}: no such domain", ttl=answer_ttl(answer))
        if rcode != dns.rcode.NOERROR:
            raise DNSTemporaryError(f"{name} {rdtype}: {dns.rcode.to_text(rcode)}")
        rdtype_value = dns.rdatatype.from_text(rdtype)
        answer = dns.resolver.Answer(qname, rdtype_value, dns.rdataclass.IN, response)
        cache.put((qname, rdtype_value, dns.rdataclass.IN), answer)
        return answer

    def _failure(self, failure, key: tuple, name: str, rdtype: str):
        """Timeouts and server failures are remembered for FAILED_LOOKUP_TTL."""
        if failure.check(DNSPermanentError):
            return failure
        error = failure.value if failure.check(DNSTemporaryError) else DNSTemporaryError(
            f"{name} {rdtype}: {failure.type.__name__}")
        maillog.DNS_TEMPERROR(log, error=str(error), rdtype=rdtype)       # the metrics count these
        self._failed[key] = (self._clock.seconds() + FAILED_LOOKUP_TTL, error)
        if len(self._failed) > FAILED_LOOKUP_ENTRIES:
            self._failed.popitem(last=False)
        return fail(error)

    def _answered(self, key: tuple, outcome) -> None:
        """Hand the Answer, or the failure, to everyone who asked meanwhile."""
        for waiter in self._in_flight.pop(key, ()):
            if isinstance(outcome, (Failure, Exception)):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    @inlineCallbacks
    def mx(self, domain: str):
        """[(preference, host)] sorted; [] when the domain has no MX."""
        records = yield self.lookup(domain, "MX")
        return sorted(
            (r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in records
        )

    @inlineCallbacks
    def addresses(self, host: str):
        """The A and AAAA addresses of C{host}, as text."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [str(ip)]
        found = []
        failure = None
        for rdtype in ("A", "AAAA"):
            try:
                records = yield self.lookup(host, rdtype)
            except DNSPermanentError:
                return []
            except DNSTemporaryError as e:
                failure = e
                continue
            found.extend(r.to_text() for r in records)
        if not found and failure is not None:
            raise failure
        return found

    def a_records(self, name: str) -> Deferred:
        """Only the A records (DNSBL answers, RFC 5782 2.1)."""
        d = self.lookup(name, "A")
        d.addCallback(lambda records: [r.to_text() for r in records])
        return d

    def txt(self, name: str) -> Deferred:
        """Each TXT record of C{name} as one string."""
        return self._lookup(name, "TXT", _txt_strings)

    def txt_answer(self, name: str) -> Deferred:
        """The TXT records of C{name} as a L{TXTAnswer}: with how long they may be kept."""
        return self._lookup(name, "TXT", _timed_txt)




@inlineCallbacks
def mail_hosts(resolver: Resolver, domain: str):
    """
    The hosts that receive mail for C{domain} in preference order: its MX
    hosts, or the domain itself when it has none (RFC 5321 5.1, implicit
    MX).  A null MX (RFC 7505, ``0 .``) gives [].
    """
    records = yield resolver.mx(domain)
    if not records:
        return [domain]
    hosts = [host for _, host in records if host not in ("", ".")]
    return hosts


@inlineCallbacks
def mail_host_addresses(resolver: Resolver, domain: str):
    """
    Every address of every mail host of C{domain} (the destined hosts), in
    preference order, each mapped to its host's name (the first host that
    has it): the name a DSN gives as Remote-MTA.
    """
    hosts = yield mail_hosts(resolver, domain)
    found: dict[str, str] = {}
    for host in hosts:
        for address in (yield resolver.addresses(host)):
            found.setdefault(address, host)
    return found
