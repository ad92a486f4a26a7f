"""
The verdicts on one received message (SPEC 11.1): SPF (the session's
result, reused), DKIM, DMARC, folded into one Authentication-Results field
and a disposition: deliver, quarantine into ``.Junk``, or reject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from pullmail.inbound.authresults import Results, authentication_results, strip_ours
from pullmail.inbound.recent_verdicts import RecentVerdicts, dmarc_names
from pullmail.trust.arc import ARCVerifier
from pullmail.trust.dkim import Verifier
from pullmail.trust.dmarc import DMARCChecker
from pullmail.trust.message import authors, header_end
from pullmail.trust.spf import SPFIdentity, SPFResult

__all__ = ["Verdict", "MessageChecker"]

log = Logger(namespace="pullmail.inbound.verdicts")


@dataclass(frozen=True)
class Verdict:
    message: bytes           # the message, our forged results removed
    header: bytes            # the Authentication-Results field to put on top
    disposition: str         # "deliver" | "quarantine" | "reject"
    reason: str = ""
    chain: str = "none"      # the ARC chain's status, for the set a forward adds


class MessageChecker:
    """
    Gathers the facts and decides.  C{spf} is the trust checker's
    C{spf_result}; C{dmarc} None or C{mode} "off" skips DMARC; C{arc} None
    skips ARC validation; C{recent} (with DMARC) reuses the verdicts on
    unsigned mail from a busy origin.
    """

    def __init__(self, authserv_id: str, spf: Callable, verifier: Verifier,
                 dmarc: DMARCChecker | None, mode: str = "enforce",
                 arc: ARCVerifier | None = None, recent: RecentVerdicts | None = None) -> None:
        self.authserv_id = authserv_id
        self.spf = spf
        self.verifier = verifier
        self.dmarc = dmarc if mode != "off" else None
        self.mode = mode
        self.arc = arc
        self.recent = recent if self.dmarc is not None else None

    def submitted(self, message: bytes, user: str | None) -> Verdict:
        """Mail from an authenticated client: ``auth=pass smtp.auth=<user>``."""
        header = authentication_results(self.authserv_id, Results(auth_user=user))
        return Verdict(strip_ours(message, self.authserv_id), header, "deliver")

    def local(self, message: bytes) -> Verdict:
        """Mail this node made (a bounce): no method ran (RFC 8601 2.2 "none")."""
        header = authentication_results(self.authserv_id, Results())
        return Verdict(strip_ours(message, self.authserv_id), header, "deliver")

    def check(self, message: bytes, identity: SPFIdentity) -> defer.Deferred:
        """Fire with the L{Verdict} on received mail; never fails."""
        message = strip_ours(message, self.authserv_id)
        key = None
        if self.recent is not None:
            key = self.recent.key(message[:header_end(message)], identity, _spf_domain(identity))
            if key is not None and (found := self.recent.get(key)) is not None:
                return defer.succeed(Verdict(message, *found))
        return defer.Deferred.fromCoroutine(self._check(message, identity, key))

    async def _check(self, message: bytes, identity: SPFIdentity, key: tuple | None) -> Verdict:
        sender = identity.sender
        domain = _spf_domain(identity)
        kind, checked = ("mailfrom", sender) if sender else ("helo", identity.helo)
        spf_call = defer.maybeDeferred(self.spf, identity.peer, domain, identity.helo,
                                       sender or None).addErrback(self._spf_failed)
        arc_call = self.arc.verify(message) if self.arc is not None else defer.succeed(None)
        # All run at once; each is awaited in turn (a gatherResults would
        # cost more than any of them, when they answer from their caches).
        dkim_call = self.verifier.verify(message)
        spf_outcome = await spf_call
        dkim_results = await dkim_call
        arc_result = await arc_call
        spf_result = spf_outcome[0].value
        results = Results(spf=(spf_result, kind, checked), dkim=tuple(dkim_results),
                          arc=arc_result)
        disposition, reason = "deliver", ""
        if self.dmarc is not None:
            author = authors(message[:header_end(message)])
            verdict = await self.dmarc.check(
                author, (spf_result, domain.lower()), [(r.result, r.domain) for r in dkim_results])
            results = Results(spf=results.spf, dkim=results.dkim, dmarc=verdict,
                              arc=arc_result)
            if self.mode == "enforce" and verdict.disposition in ("reject", "quarantine"):
                disposition = verdict.disposition
                reason = (f"DMARC policy of {verdict.domain}" if verdict.domain
                          else f"DMARC check: {verdict.reason}")
        # Not logged: the verdicts are in the message's Authentication-Results
        # (one log event per message, issue 17); rejections log their own.
        header = authentication_results(self.authserv_id, results)
        if key is not None:
            self.recent.put(key, spf_outcome[0], verdict.result,
                            dmarc_names(author.domains, self.dmarc.domains.of),
                            (header, disposition, reason))
        return Verdict(message, header, disposition, reason,
                       arc_result.result if arc_result is not None else "none")

    @staticmethod
    def _spf_failed(failure) -> tuple:
        log.failure("SPF check failed", failure)
        return SPFResult.TEMPERROR, "SPF check failed"


def _spf_domain(identity: SPFIdentity) -> str:
    """RFC 7208 2.4: the MAIL FROM domain; with the null reverse-path, the HELO identity."""
    return identity.sender.rpartition("@")[2] if identity.sender else identity.helo
