"""
The built-in trust check (SPEC 6): allow list, deny list, DNSBL, SPF, in
that order.  ``decide_spf`` is the pure mapping of an SPF result to a
verdict; the checker only gathers facts.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pullmail import maillog
from pullmail.config import TrustConfig
from pullmail.interfaces import ITrustPolicy
from pullmail.logsafe import printable
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, Resolver
from pullmail.smtp import replies
from pullmail.smtp.address import literal_address
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.replies import Reply
from pullmail.trust.spf import SPFResult, check_host_async

__all__ = ["TrustChecker", "decide_spf", "listed"]

log = Logger(namespace="pullmail.trust.policy")

# How long an SPF result that refuses is reused for the same (peer, domain,
# HELO, sender): a burst of notifications from an SPF-failing sender costs
# one evaluation and one log line, not one each (issue 17: a flood).
REFUSAL_REUSE = 5.0
# And one that trusts: a stream of notifications from one origin costs one
# evaluation a second (issue 17: General Delivery near push), not one each.
# An evaluation reads DNS answers cached for their TTL, so a tightened
# record took effect at the end of its TTL already; now up to a second later.
TRUST_REUSE = 1.0


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

    def __init__(self, config: TrustConfig, resolver: Resolver, clock: IReactorTime,
                 timeout: float, plugins: Sequence[ITrustPolicy] = (),
                 spf_check: Callable = check_host_async) -> None:
        self.config = config
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self.plugins = tuple(plugins)
        # spf_check(resolver, ip, domain, sender, helo, timeout, clock) ->
        # awaitable (SPFResult, explanation); a seam for tests.
        self.spf_check = spf_check
        # The SPF results of recent checks, so that Authentication-Results
        # reuses the session's check instead of evaluating it again (trust
        # decisions check afresh, but for a refusal's REFUSAL_REUSE).
        self._spf_memo = SPFMemo(clock)

    def check(self, peer: str, domain: str, helo: str, sender: str | None) -> defer.Deferred:
        """The whole chain: allow, deny, DNSBL, SPF, then the plugins (SPEC 6)."""
        return defer.Deferred.fromCoroutine(self._check(peer, domain.lower(), helo, sender))

    async def _check(self, peer: str, domain: str, helo: str, sender: str | None):
        ip = ipaddress.ip_address(peer)
        if listed(self.config.allow, ip, domain):
            return None
        if listed(self.config.deny, ip, domain):
            return replies.S550_POLICY.with_text("Refused by policy (deny list)")
        for zone in self.config.dnsbl:
            if await self._dnsbl_listed(ip, zone):
                return replies.S550_POLICY.with_text(f"Refused: {peer} is listed in {zone}")
        verdict = await self._spf(peer, domain, helo, sender, self.config.spf_accept)
        if verdict is not None:
            return verdict
        if sender and await self._null_mx(domain):
            # RFC 7505 4.2: a domain with a null MX sends no mail either.
            # (After SPF: a silent origin costs one timeout, not two.)
            return replies.S550_NULL_MX_SENDER
        for plugin in self.plugins:
            verdict = await defer.maybeDeferred(plugin.check, peer, domain, helo, sender)
            if verdict is not None:
                maillog.POLICY_VETO(
                    log, name=plugin.name, domain=domain, peer=peer, verdict=str(verdict),
                )
                return verdict
        return None

    async def _dnsbl_listed(self, ip, zone: str) -> bool:
        try:
            records = await self.resolver.a_records(dnsbl_name(ip, zone))
        except (DNSTemporaryError, DNSPermanentError):
            return False
        # RFC 5782 2.3: listings are 127.0.0.0/8 answers; anything else is
        # the zone misbehaving, not a listing.
        return any(address.startswith("127.") for address in records)

    async def _null_mx(self, domain: str) -> bool:
        """Whether C{domain} publishes a null MX (RFC 7505 3); DNS trouble says no."""
        try:
            records = await self.resolver.mx(domain)
        except (DNSTemporaryError, DNSPermanentError):
            return False
        return bool(records) and all(host.rstrip(".") == "" for _, host in records)

    def spf_result(self, peer: str, domain: str, helo: str, sender: str | None
                   ) -> defer.Deferred:
        """
        Fire with (L{SPFResult}, explanation) for Authentication-Results:
        the result the session's trust check found, when it ran one.
        """
        if (found := self.spf_known(peer, domain, helo, sender)) is not None:
            return defer.succeed(found)
        return defer.Deferred.fromCoroutine(self._spf_result(peer, domain, helo, sender))

    def spf_known(self, peer: str, domain: str, helo: str, sender: str | None) -> tuple | None:
        """What L{spf_result} would fire with at once, or None when it must ask DNS."""
        return self._spf_memo.get(_memo_key(peer, domain, helo, sender))

    async def _spf_result(self, peer: str, domain: str, helo: str, sender: str | None):
        """A fresh check (answers as cached by DNS, never by the memo)."""
        domain = domain.lower()
        found = await self.spf_check(
            self.resolver, peer, domain, sender or "", helo, self.timeout, self.clock
        )
        self._spf_memo.put(_memo_key(peer, domain, helo, sender), found)
        return found

    async def _spf(self, peer: str, domain: str, helo: str, sender: str | None,
                   accepted: tuple[str, ...]) -> Reply | None:
        key = _memo_key(peer, domain, helo, sender)
        recent = self._spf_memo.get(key, REFUSAL_REUSE)
        if recent is not None:      # logged when it was evaluated
            verdict = decide_spf(recent[0], accepted)
            if verdict is not None:
                return verdict
            if self._spf_memo.get(key, TRUST_REUSE) is not None:
                return None
        result, explanation = await self._spf_result(peer, domain, helo, sender)
        verdict = decide_spf(result, accepted)
        maillog.SPF(
            log, result=result.value, domain=domain, peer=peer,
            verdict=str(verdict) if verdict else "trusted",
            explanation=printable(explanation or ""),
        )
        return verdict

    def spf_passes(self, peer: str, sender: str) -> defer.Deferred:
        """Whether SPF says C{peer} may send for C{sender}'s domain."""
        domain = sender.rpartition("@")[2]
        d = defer.Deferred.fromCoroutine(self._spf(peer, domain, "", sender, ("pass",)))
        return d.addCallback(lambda verdict: verdict is None)

    # -- classic push on the MX service ---------------------------------------------

    def check_own_domain(self, session: Session, envelope: Envelope) -> defer.Deferred:
        """
        A sender in our own domain from outside must be one SPF authorises
        (the seed paper's telnet forgery): only "pass" will do, whatever
        ``spf_accept`` says, unless the peer is on the allow list.
        """
        domain = envelope.sender.rpartition("@")[2]
        peer = ipaddress.ip_address(session.peer)
        if listed(self.config.allow, peer, domain):
            return defer.succeed(None)
        literal = literal_address(domain)
        if literal is not None:
            # Our own address literal (issue 18) has no SPF record: only
            # this host itself may claim it (RFC 5321 4.1.3).
            return defer.succeed(None if literal == peer else _OWN_LITERAL_REFUSED)
        return defer.Deferred.fromCoroutine(
            self._spf(session.peer, domain, session.helo, envelope.sender, ("pass",))
        )

    def check_push(self, session: Session, envelope: Envelope) -> defer.Deferred:
        """``[trust] push``: accept | spf-pass | allow-only | refuse (SPEC 6)."""
        push = self.config.push
        identity = envelope.sender.rpartition("@")[2] if envelope.sender else session.helo
        if push == "accept":
            return defer.succeed(None)
        if push == "refuse":
            return defer.succeed(_PUSH_REFUSED)
        if push == "allow-only":
            allowed = listed(self.config.allow, ipaddress.ip_address(session.peer), identity)
            return defer.succeed(None if allowed else _PUSH_REFUSED)
        return self.check(session.peer, identity, session.helo, envelope.sender or None)


_OWN_LITERAL_REFUSED = replies.S550_POLICY.with_text(
    "Sender address literal of this host used from elsewhere"
)


def _memo_key(peer: str, domain: str, helo: str, sender: str | None) -> tuple:
    """What an SPF check depends on (RFC 7208 4.1), as the memo keys it."""
    return (peer, domain.lower(), helo, sender or "")


class SPFMemo:
    """
    The last L{SIZE} SPF results, each kept L{LIFETIME} seconds: long
    enough for one session's end of data to find its MAIL FROM's check.
    """

    SIZE = 4096
    LIFETIME = 60.0

    def __init__(self, clock) -> None:
        self._clock = clock
        self._entries: OrderedDict[tuple, tuple[float, tuple]] = OrderedDict()

    def get(self, key: tuple, max_age: float = LIFETIME):
        """The result stored for C{key} at most C{max_age} seconds ago, or None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] + max_age < self._clock.seconds():
            return None
        return entry[1]

    def put(self, key: tuple, value: tuple) -> None:
        self._entries[key] = (self._clock.seconds(), value)
        self._entries.move_to_end(key)
        if len(self._entries) > self.SIZE:
            self._entries.popitem(last=False)


_PUSH_REFUSED = replies.S550_POLICY.with_text(
    "Push not accepted here; offer the message by General Delivery (GDEL)"
)
