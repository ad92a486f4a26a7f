"""
DMARC (RFC 7489): policy discovery through the node's resolver, then the
``dmarc`` library's record parser and identifier alignment, with the
organisational domain from the bundled public suffix list
(``publicsuffixlist``: no download at run time), and ``pct`` sampling.

L{evaluate} is pure (records, results, a sample in [0, 100) in; a
L{DMARCVerdict} out); L{DMARCChecker} only gathers the records.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import dmarc
from publicsuffixlist import PublicSuffixList
from twisted.internet import defer

from pullmail.net.dns import DNSPermanentError, DNSTemporaryError

__all__ = ["DMARCChecker", "DMARCVerdict", "OrganizationalDomains", "evaluate", "select_record"]

# RFC 7489 6.6.3 step 2: only records that start with the version tag count.
_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|\Z)")
# RFC 7489 6.6.4: a message outside pct gets the next policy down.
_DOWNGRADE = {"reject": "quarantine", "quarantine": "none", "none": "none"}


class OrganizationalDomains:
    """RFC 7489 3.2 over the bundled public suffix list; load it once."""

    def __init__(self) -> None:
        self._list = PublicSuffixList()
        # Every message asks for its From domain's: walking the list cost
        # more than the rest of the DMARC check.
        self._known = functools.lru_cache(maxsize=4096)(self._look_up)

    def of(self, domain: str) -> str:
        """``mail.example.co.uk`` -> ``example.co.uk`` (a public suffix: itself)."""
        return self._known(domain.lower())

    def _look_up(self, domain: str) -> str:
        return self._list.privatesuffix(domain) or domain

    # The name the dmarc library's relaxed alignment calls.
    get_public_suffix = of


@dataclass(frozen=True)
class DMARCVerdict:
    """RFC 7489 11.2's result, the published policy and what to do."""

    result: str                  # none | pass | fail | temperror | permerror
    domain: str = ""             # header.from
    policy: str = ""             # the p= (or sp=) that applied
    disposition: str = "none"    # none | quarantine | reject, after pct
    reason: str = ""


def select_record(records: Sequence[str]) -> str | None:
    """
    RFC 7489 6.6.3: the one DMARC record among a name's TXT records; None
    when there is none.  @raise ValueError: there are several.
    """
    chosen = [r for r in records if _VERSION.match(r)]
    if len(chosen) > 1:
        raise ValueError("several DMARC records")
    return chosen[0] if chosen else None


def evaluate(record: str, from_domain: str, org_record: bool, spf: tuple[str, str] | None,
             dkim: Sequence[tuple[str, str]], sample: float,
             domains: OrganizationalDomains) -> DMARCVerdict:
    """
    One message against its policy record.  C{org_record}: the record was
    found at the organisational domain, so ``sp`` applies (RFC 7489 6.6.3).
    C{spf} is (result, domain checked), C{dkim} a (result, d=) per
    signature; C{sample} is uniform in [0, 100).
    """
    try:
        policy = dmarc.DMARC(domains).parse_record(
            record, from_domain, org_domain=domains.of(from_domain) if org_record else None)
    except dmarc.Error as e:
        return DMARCVerdict("permerror", from_domain, reason=f"bad DMARC record: {e}")
    results = dmarc.AuthResults(
        spf=dmarc.SPFAuthResult(spf[1], dmarc.SPFResult(spf[0])) if spf and spf[1] else None,
        dkim=[dmarc.DKIMAuthResult(d, dmarc.DKIMResult(r)) for r, d in dkim if d] or None,
    )
    outcome = dmarc.DMARC(domains).get_result(policy, auth_results=results)
    # RFC 7489 6.3: sp= is the policy of subdomains found by the
    # organisational domain's record; p= otherwise.
    subdomain = org_record and policy.sp is not dmarc.DMARCDisposition.UNSPECIFIED
    published = (policy.sp if subdomain else policy.p).value
    if outcome.result is dmarc.DMARCResult.PASS:
        return DMARCVerdict("pass", from_domain, published)
    disposition = published
    if sample >= policy.pct:
        disposition = _DOWNGRADE[published]
    return DMARCVerdict("fail", from_domain, published, disposition,
                        "no aligned SPF or DKIM pass")


class DMARCChecker:
    """Finds the policy record of a From domain and evaluates it."""

    def __init__(self, txt: Callable[[str], defer.Deferred], domains: OrganizationalDomains,
                 sample: Callable[[], float] | None = None) -> None:
        self.txt = txt
        self.domains = domains
        self.sample = sample or (lambda: random.random() * 100)

    def check(self, from_domains: Sequence[str], spf: tuple[str, str] | None,
              dkim: Sequence[tuple[str, str]]) -> defer.Deferred:
        """Fire with the L{DMARCVerdict} of a message (never fails)."""
        return defer.Deferred.fromCoroutine(self._check(from_domains, spf, dkim))

    async def _check(self, from_domains, spf, dkim) -> DMARCVerdict:
        if len(set(from_domains)) != 1:
            # RFC 7489 6.6.1: no single author domain, nothing to evaluate.
            return DMARCVerdict("permerror", reason="no single RFC5322.From domain")
        domain = from_domains[0]
        organizational = self.domains.of(domain)
        for name, org_record in ((domain, False), (organizational, True)):
            if org_record and organizational == domain:
                break
            try:
                record = select_record(await self.txt(f"_dmarc.{name}"))
            except DNSPermanentError:
                continue
            except DNSTemporaryError:
                return DMARCVerdict("temperror", domain, reason="DMARC record lookup failed")
            except ValueError as e:
                return DMARCVerdict("permerror", domain, reason=str(e))
            if record is not None:
                return evaluate(record, domain, org_record, spf, dkim, self.sample(),
                                self.domains)
        return DMARCVerdict("none", domain)
