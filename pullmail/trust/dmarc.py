"""
DMARC (RFC 7489): policy discovery through the node's resolver, then the
``dmarc`` library's record parser and identifier alignment, with the
organisational domain from the bundled public suffix list
(``publicsuffixlist``: no download at run time), and ``pct`` sampling.

L{evaluate} is pure (records, results, a sample in [0, 100) in; a
L{DMARCVerdict} out); L{DMARCChecker} only gathers the records.

Reporting tags (``rua``, ``ruf``, ``fo``, ``rf``, ``ri``) are ignored,
whatever their values: pullmail sends no aggregate or failure reports.  ``t=y`` (the
DMARCbis testing flag, unknown to RFC 7489) is honoured as the domain
owner means it -- the next policy down, as ``pct=0`` -- and any other
``t=`` is ignored (RFC 7489 6.3: unknown tags are ignored).
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
from pullmail.trust.message import Authors

__all__ = ["DMARCChecker", "DMARCVerdict", "OrganizationalDomains", "evaluate", "select_record",
           "strictest", "MAX_AUTHOR_DOMAINS"]

# RFC 7489 6.6.3 step 2: only records that start with the version tag count.
_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|\Z)")
# RFC 7489 6.6.4: a message outside pct gets the next policy down.
_DOWNGRADE = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_SEVERITY = {"none": 0, "quarantine": 1, "reject": 2}
# The t= tag, which the dmarc library would let override pct; we read it.
_TESTING = re.compile(r";\s*t\s*=\s*([^;]*)", re.IGNORECASE)
# Tags this node has no use for, taken out before the library parses the
# record: a bad ri= must not void the policy (RFC 7489 6.3: syntax errors
# in the rest of the record are discarded in favour of defaults).
_UNUSED = re.compile(r";\s*(?:rua|ruf|fo|rf|ri|t)\s*=[^;]*", re.IGNORECASE)
# RFC 7489 6.6.1: the author domains of one From field that are checked;
# a From naming more cannot be checked, and is refused under enforce.
MAX_AUTHOR_DOMAINS = 5


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
    testing = [m.group(1).strip().lower() for m in _TESTING.finditer(record)]
    try:
        policy = dmarc.DMARC(domains).parse_record(
            _UNUSED.sub("", record), from_domain,
            org_domain=domains.of(from_domain) if org_record else None)
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
    if sample >= policy.pct or testing == ["y"]:
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

    def check(self, authors: Authors, spf: tuple[str, str] | None,
              dkim: Sequence[tuple[str, str]]) -> defer.Deferred:
        """Fire with the L{DMARCVerdict} of a message (never fails)."""
        return defer.Deferred.fromCoroutine(self._check(authors, spf, dkim))

    async def _check(self, authors: Authors, spf, dkim) -> DMARCVerdict:
        """
        RFC 7489 6.6.1, as this node applies it: several From fields (RFC
        5322 3.6 allows one; a reader sees one while a checker may evaluate
        another) are a permerror refused under ``enforce``, as is a From
        naming more than L{MAX_AUTHOR_DOMAINS} domains; a From with several
        author domains has each checked, and the strictest failing policy
        applies; a From with no domain (none, or only ``undisclosed:;``)
        claims nobody: permerror, delivered.
        """
        if authors.fields > 1:
            return DMARCVerdict("permerror", disposition="reject",
                                reason=f"{authors.fields} From fields")
        if len(authors.domains) > MAX_AUTHOR_DOMAINS:
            return DMARCVerdict("permerror", disposition="reject",
                                reason=f"{len(authors.domains)} author domains")
        if not authors.domains:
            return DMARCVerdict("permerror", reason="no RFC5322.From domain")
        verdicts = [await self._check_domain(domain, spf, dkim) for domain in authors.domains]
        return strictest(verdicts)

    async def _check_domain(self, domain: str, spf, dkim) -> DMARCVerdict:
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


def strictest(verdicts: Sequence[DMARCVerdict]) -> DMARCVerdict:
    """
    The verdict on a From of several author domains (RFC 7489 6.6.1): the
    failing one whose disposition is strictest; else a temperror, a
    permerror, a pass, in that order; else (no policy anywhere) none.
    """
    failing = [v for v in verdicts if v.result == "fail"]
    if failing:
        return max(failing, key=lambda v: _SEVERITY[v.disposition])
    for result in ("temperror", "permerror", "pass"):
        for verdict in verdicts:
            if verdict.result == result:
                return verdict
    return verdicts[0]
