"""
SPF (RFC 7208) through pyspf, with its DNS answered by the node's own
dnspython resolver (``[dns] nameservers``), never the system resolver when
nameservers are set.

pyspf looks up a module-global ``DNSLookup`` on every query.  We install,
once, a dispatcher that answers with the resolver of the calling thread's
check, so concurrent checks in the thread pool each use their own resolver;
a thread with none falls back to pyspf's own lookup.  pyspf enforces the
RFC 7208 4.6.4 limits (10 DNS-querying terms, 2 void lookups) itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
import threading
import time

import dns.exception
import dns.resolver
import spf as pyspf

from pullmail.net.dns import DNSPermanentError, NotCached, cached_answer

__all__ = ["SPFIdentity", "SPFResult", "check_host"]


@dataclass(frozen=True)
class SPFIdentity:
    """
    Whom SPF asks about (RFC 7208 2.4): the client's address, its HELO
    name and the MAIL FROM; for mail pulled by RETR, the notifying
    session's (SPEC 11.1).
    """

    peer: str
    helo: str
    sender: str


class SPFResult(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


_thread = threading.local()
_install_lock = threading.Lock()
_original_lookup = pyspf.DNSLookup


def _lookup(name, qtype, strict=True, timeout=20):
    resolver = getattr(_thread, "resolver", None)
    cache_only = getattr(_thread, "cache_only", False)
    if resolver is None:
        if cache_only:
            raise NotCached(name)
        return _original_lookup(name, qtype, strict, timeout)
    found = []
    try:
        if cache_only:
            answers = cached_answer(resolver, name, qtype)   # NotCached ends the check
        else:
            answers = resolver.resolve(name, qtype, lifetime=min(timeout, resolver.lifetime),
                                       search=False)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN, DNSPermanentError):
        return found
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
        raise pyspf.TempError(f"DNS {e}") from None
    except dns.exception.DNSException as e:
        raise pyspf.TempError(f"DNS {e}") from None
    for rdata in answers:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), rdata.strings))
    return found


def _install() -> None:
    with _install_lock:
        if pyspf.DNSLookup is not _lookup:
            pyspf.DNSLookup = _lookup


def check_host(resolver, ip: str, domain: str, sender: str, helo: str,
               timeout: float, cache_only: bool = False) -> tuple[SPFResult, str]:
    """
    Blocking: RFC 7208 check_host(ip, domain, sender); run it in a thread.
    C{timeout} bounds the whole check (RFC 7208 4.6.4 suggests 20 s).

    With C{cache_only} it never blocks: every DNS answer comes from the
    resolver's cache, and L{pullmail.net.dns.NotCached} is raised at the first
    that is not there (then run it again, in a thread).
    """
    _install()
    _thread.resolver = resolver
    _thread.cache_only = cache_only
    try:
        # pyspf takes the domain from the sender; check the one asked for.
        if not sender or sender.rpartition("@")[2].lower() != domain.lower():
            sender = f"postmaster@{domain}"
        query = pyspf.query(i=ip, s=sender, h=helo or domain, timeout=timeout,
                            querytime=timeout)
        started = time.monotonic()
        result, _code, explanation = query.check()
        if time.monotonic() - started > timeout and result == "temperror":
            explanation = explanation or "SPF check timed out"
    finally:
        _thread.resolver = None
        _thread.cache_only = False
    try:
        return SPFResult(result), explanation
    except ValueError:
        return SPFResult.PERMERROR, f"unexpected SPF result {result!r}"
