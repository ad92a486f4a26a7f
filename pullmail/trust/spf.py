"""
SPF (RFC 7208) through pyspf, with its DNS answered by the node's own
resolver (``[dns] nameservers``) and never a thread waiting on the network.

pyspf asks its DNS questions through a module-global ``DNSLookup``.  We
install, once, a dispatcher that answers from the lookup function of the
check running in this thread, which only ever reads what is known: the
first answer missing ends the pass with L{NotCached}.  L{check_host_async}
then fetches that name on the reactor and runs the pass again, until the
check completes (issue 18: a silent nameserver delays only the check that
asks it, by its own timeout).  pyspf enforces the RFC 7208 4.6.4 limits
(10 DNS-querying terms, 2 void lookups) itself.
"""

from __future__ import annotations

import enum
import ipaddress
import threading
from dataclasses import dataclass
from typing import Callable

import spf as pyspf
from twisted.internet.interfaces import IReactorTime

from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, NotCached

__all__ = ["SPFIdentity", "SPFResult", "authorises_everyone", "check_host", "check_host_async"]


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


# Questions one check may fetch: RFC 7208 4.6.4 allows 10 terms, each "mx"
# up to 10 names of two address types, and the SPF records themselves.
MAX_FETCHES = 250

_thread = threading.local()
_install_lock = threading.Lock()
_original_lookup = pyspf.DNSLookup


def _lookup(name, qtype, strict=True, timeout=20):
    known = getattr(_thread, "lookup", None)
    if known is None:
        return _original_lookup(name, qtype, strict, timeout)
    try:
        answers = known(name, qtype)   # NotCached ends this pass
    except DNSPermanentError:
        return []
    except DNSTemporaryError as e:
        raise pyspf.TempError(f"DNS {e}") from None
    found = []
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


def check_host(lookup: Callable[[str, str], list], ip: str, domain: str, sender: str,
               helo: str, timeout: float) -> tuple[SPFResult, str]:
    """
    One pass of RFC 7208 check_host(ip, domain, sender), never waiting:
    every DNS answer comes from C{lookup(name, rdtype)}, which returns the
    records, or raises L{NotCached} (which ends the pass),
    L{DNSPermanentError} or L{DNSTemporaryError}.
    """
    _install()
    _thread.lookup = lookup
    try:
        # pyspf takes the domain from the sender; check the one asked for.
        if not sender or sender.rpartition("@")[2].lower() != domain.lower():
            sender = f"postmaster@{domain}"
        query = pyspf.query(i=ip, s=sender, h=helo or domain, timeout=timeout,
                            querytime=timeout)
        result, _code, explanation = query.check()
    finally:
        _thread.lookup = None
    try:
        return SPFResult(result), explanation
    except ValueError:
        return SPFResult.PERMERROR, f"unexpected SPF result {result!r}"


async def _check(resolver, ip: str, domain: str, sender: str, helo: str, timeout: float,
                 clock: IReactorTime) -> tuple[SPFResult, str]:
    """Passes over what is known, fetching each missing answer in between."""
    deadline = clock.seconds() + timeout
    fetched: dict[tuple[str, str], object] = {}

    def lookup(name: str, rdtype: str) -> list:
        # What this check fetched wins over the cache: an answer with a TTL
        # of 0 is used once and not asked again.
        outcome = fetched.get((name.lower().rstrip("."), rdtype))
        if outcome is None:
            return resolver.cached(name, rdtype)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    for _ in range(MAX_FETCHES):
        try:
            return check_host(lookup, ip, domain, sender, helo, timeout)
        except NotCached as missing:
            if clock.seconds() >= deadline:
                return SPFResult.TEMPERROR, "SPF check timed out"
            key = (missing.name.lower().rstrip("."), missing.rdtype)
            try:
                fetched[key] = await resolver.lookup(missing.name, missing.rdtype)
            except (DNSPermanentError, DNSTemporaryError) as e:
                fetched[key] = e
    return SPFResult.PERMERROR, "too many DNS lookups"


# RFC 1122 3.2.1.3 (a) and RFC 4291 2.5.2: the unspecified address is never
# the source of a packet, so no one can send mail from it.
_NOBODY = {4: "0.0.0.0", 6: "::"}


async def check_host_async(resolver, ip: str, domain: str, sender: str, helo: str,
                           timeout: float, clock: IReactorTime) -> tuple[SPFResult, str]:
    """
    RFC 7208 check_host(ip, domain, sender) over C{resolver}'s C{cached}
    and C{lookup}, bounded by C{timeout} in all.  A "pass" from a record
    that authorises everyone is "neutral" (L{authorises_everyone}).
    """
    result, explanation = await _check(resolver, ip, domain, sender, helo, timeout, clock)
    if result is SPFResult.PASS and await authorises_everyone(
        resolver, ip, domain, sender, helo, timeout, clock
    ):
        return SPFResult.NEUTRAL, (
            f"the SPF record of {domain} authorises every address; a pass proves nothing"
        )
    return result, explanation


async def authorises_everyone(resolver, ip: str, domain: str, sender: str, helo: str,
                              timeout: float, clock: IReactorTime) -> bool:
    """
    Whether C{domain}'s record also passes the unspecified address of
    C{ip}'s family, which never sends mail: then it passes every address
    (``+all`` or a bare ``all``, RFC 7208 5.1; ``ip4:0.0.0.0/0``,
    ``ip6:::/0``, RFC 7208 5.6; ``a/0`` or ``mx/0``, 5.3-5.4; halves such as
    ``ip4:0.0.0.0/1 ip4:128.0.0.0/1``).  Such a pass authorises nothing in
    particular, and is taken as the "neutral" it amounts to (RFC 7208 8.2:
    no assertion about this address; issue 18: one GDEL must not make us
    connect wherever its MX records point).
    """
    nobody = _NOBODY[ipaddress.ip_address(ip).version]
    result, _ = await _check(resolver, nobody, domain, sender, helo, timeout, clock)
    return result is SPFResult.PASS
