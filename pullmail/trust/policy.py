"""
The built-in trust check (SPEC 6): allow list, deny list, DNSBL, SPF, in
that order.  ``decide_spf`` is the pure mapping of an SPF result to a
verdict; the checker only gathers facts.
"""

from __future__ import annotations

import ipaddress
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pullmail import replies
from pullmail.config import TrustConfig
from pullmail.dns import DNSPermanentError, DNSTemporaryError, Resolver
from pullmail.interfaces import ITrustPolicy
from pullmail.replies import Reply
from pullmail.trust.spf import SPFResult, check_host

__all__ = ["TrustChecker", "decide_spf", "listed"]

log = Logger(namespace="pullmail.trust")


def decide_spf(result: SPFResult, accepted: tuple[str, ...]) -> Reply | None:
    """RFC 7208 8 results -> None (trusted) or the refusal (RFC 7372 codes)."""
    if result.value in accepted:
        return None
    if result is SPFResult.FAIL:
        return replies.S550_SPF_FAIL
    if result is SPFResult.TEMPERROR:
        return replies.S451_SPF_TEMPERROR
    if result is SPFResult.PERMERROR:
        return replies.S550_SPF_PERMERROR
    return replies.S550_POLICY.with_text(f"SPF result {result.value} not accepted")


def listed(entries, ip, domain: str) -> bool:
    """Whether an allow/deny list names the address or the domain."""
    for entry in entries:
        if isinstance(entry, str):
            if domain == entry or domain.endswith("." + entry):
                return True
        elif ip.version == entry.version and ip in entry:
            return True
    return False


def dnsbl_name(ip, zone: str) -> str:
    """RFC 5782 2.1: the reversed address under the zone."""
    if ip.version == 4:
        reversed_ip = ".".join(reversed(str(ip).split(".")))
    else:
        reversed_ip = ".".join(reversed(ip.exploded.replace(":", "")))
    return f"{reversed_ip}.{zone}"


@implementer(ITrustPolicy)
class TrustChecker:
    name = "builtin"

    def __init__(self, config: TrustConfig, resolver: Resolver, run_blocking: Callable,
                 timeout: float) -> None:
        self.config = config
        self.resolver = resolver
        self.run_blocking = run_blocking
        self.timeout = timeout

    def check(self, peer: str, domain: str, helo: str, sender: str | None) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._check(peer, domain.lower(), helo, sender))

    async def _check(self, peer: str, domain: str, helo: str, sender: str | None):
        ip = ipaddress.ip_address(peer)
        if listed(self.config.allow, ip, domain):
            return None
        if listed(self.config.deny, ip, domain):
            return replies.S550_POLICY.with_text("Refused by policy (deny list)")
        for zone in self.config.dnsbl:
            try:
                found = await self.resolver.addresses(dnsbl_name(ip, zone))
            except (DNSTemporaryError, DNSPermanentError):
                found = []
            if found:
                return replies.S550_POLICY.with_text(f"Refused: {peer} is listed in {zone}")
        result, explanation = await self.run_blocking(
            check_host, self.resolver.dnspython, peer, domain, sender or "", helo, self.timeout
        )
        verdict = decide_spf(result, self.config.spf_accept)
        log.info("SPF {result} for {domain} from {peer}: {verdict}", result=result.value,
                 domain=domain, peer=peer, verdict=str(verdict) if verdict else "trusted",
                 explanation=explanation, event="spf")
        return verdict
