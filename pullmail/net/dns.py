"""
One DNS seam for MX lookups, the RETR destined-host check, SPF and DNSBL:
dnspython aimed at ``[dns] nameservers`` (the system resolver when empty),
run in a thread so the reactor never waits on the network.

Answers are L{DNSResult}s; failures are L{DNSTemporaryError} (timeout,
SERVFAIL: try later) or L{DNSPermanentError} (the name does not exist).
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

__all__ = ["Resolver", "DNSTemporaryError", "DNSPermanentError", "NotCached", "cached_answer",
           "mail_hosts"]


DNS_CACHE_ENTRIES = 50_000
log = Logger(namespace="pullmail.net.dns")


class DNSTemporaryError(Exception):
    """No answer now (timeout, SERVFAIL); the question may be asked again."""


class DNSPermanentError(Exception):
    """The name does not exist (NXDOMAIN)."""


class NotCached(Exception):
    """The answer is not in the cache: finding it would block."""


def cached_answer(resolver, name: str, rdtype: str) -> list:
    """
    The answer C{resolver} holds in its cache for (C{name}, C{rdtype}),
    never asking the network: its records ([] for a cached no-answer),
    L{DNSPermanentError} for a cached NXDOMAIN, L{NotCached} otherwise.
    The same cache keys dnspython's own resolve() consults, so the reactor
    thread can answer a busy origin's repeated questions without the hop
    to a thread and back.
    """
    cache = getattr(resolver, "cache", None)
    if cache is None:
        raise NotCached(name)
    try:
        qname = dns.name.from_text(name)
    except dns.exception.DNSException:
        raise NotCached(name) from None
    answer = cache.get((qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN))
    if answer is not None:
        return [] if answer.rrset is None else list(answer)
    negative = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
    if negative is not None and negative.response.rcode() == dns.rcode.NXDOMAIN:
        raise DNSPermanentError(f"{name}: no such domain")
    raise NotCached(name)


def make_dnspython_resolver(nameservers: Sequence[tuple[str, int]], timeout: float):
    """A dnspython Resolver for the configured nameservers."""
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
    """Asynchronous lookups over a blocking dnspython resolver."""

    def __init__(self, resolver, reactor, pool) -> None:
        self._resolver = resolver
        self._reactor = reactor
        self._pool = pool

    @property
    def dnspython(self):
        """The blocking resolver, for code already in a thread (pyspf)."""
        return self._resolver

    def _query(self, name: str, rdtype: str) -> list:
        try:
            answer = self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise DNSPermanentError(f"{name}: no such domain") from None
        except dns.resolver.NoAnswer:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise DNSTemporaryError(f"{name} {rdtype}: {e.__class__.__name__}") from None
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(f"{name} {rdtype}: {e}") from None
        return list(answer)

    def _lookup(self, name: str, rdtype: str) -> Deferred:
        try:
            return succeed(cached_answer(self._resolver, name, rdtype))
        except DNSPermanentError as e:
            return fail(e)
        except NotCached:
            d = deferToThreadPool(self._reactor, self._pool, self._query, name, rdtype)
            return d.addErrback(_log_temporary, rdtype)

    @inlineCallbacks
    def mx(self, domain: str):
        """[(preference, host)] sorted; [] when the domain has no MX."""
        records = yield self._lookup(domain, "MX")
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
                records = yield self._lookup(host, rdtype)
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
        d = self._lookup(name, "A")
        d.addCallback(lambda records: [r.to_text() for r in records])
        return d

    def txt(self, name: str) -> Deferred:
        d = self._lookup(name, "TXT")
        d.addCallback(lambda records: [b"".join(r.strings).decode("utf-8", "replace")
                                       for r in records])
        return d


def _log_temporary(failure, rdtype: str):
    """One event per lookup that failed for now (the metrics count them)."""
    if failure.check(DNSTemporaryError):
        log.info("DNS lookup failed: {error}", error=str(failure.value), rdtype=rdtype,
                 event="dns-temperror")
    return failure


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
