"""
The verdicts on recent unsigned messages, reused (issue 17).

For a message with no DKIM signature and no ARC set, the verdicts are a
function of few facts: the SPF result of its (client address, HELO, MAIL
FROM), which the trust check has just found, and its From field's
domains, whose DMARC records the DNS cache holds.  A busy origin sends the
same facts over and over, so the Authentication-Results field and the
disposition found for them serve again, while the SPF result the trust
check holds is still the same one and for no longer than the DMARC
records' TTLs (on the injected clock).  Only settled outcomes are kept:
an SPF or DMARC temperror asks again, and so does a DMARC ``fail`` (its
disposition may rest on ``pct`` sampling, RFC 7489 6.6.4).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from twisted.internet.interfaces import IReactorTime

from pullmail.scheduling.expiring import ExpiringCache
from pullmail.trust.message import Authors, authors
from pullmail.trust.spf import SPFIdentity, SPFResult

__all__ = ["RecentVerdicts", "dmarc_names", "from_fields"]

# DMARC outcomes that rest on nothing but the records and the SPF result.
_SETTLED_DMARC = frozenset({"none", "pass", "permerror"})

# A header that is fields and their continuation lines, all CRLF-ended, up
# to the blank line (RFC 5322 2.2): read as L{header_fields} reads it, so
# its From fields, as written, tell the DMARC check's authors; parsing
# those (L{authors}) cost a tenth of the node's time per message.
_PLAIN_HEADER = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*\r\n")
_FROM_FIELD = re.compile(rb"^from[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
                         re.IGNORECASE | re.MULTILINE)


def from_fields(header: bytes) -> tuple | Authors:
    """
    What the DMARC check's authors of C{header} are a function of: its
    From fields as written, for a plain header; else the parsed L{Authors}.
    """
    if _PLAIN_HEADER.fullmatch(header) is not None:
        return tuple(_FROM_FIELD.findall(header))
    return authors(header)


def dmarc_names(domains: Iterable[str], organizational: Callable[[str], str]) -> list[str]:
    """The names a DMARC check of C{domains} may look up (RFC 7489 6.6.3)."""
    names = []
    for domain in domains:
        names.append(f"_dmarc.{domain}")
        if (org := organizational(domain)) != domain:
            names.append(f"_dmarc.{org}")
    return names


class RecentVerdicts:
    """
    C{spf_known(peer, domain, helo, sender)} is the SPF result the trust
    check holds, or None (L{pullmail.trust.policy.TrustChecker.spf_known});
    C{dns_ttl(name)} how long the cached TXT answer for a name lives on, or
    None when none is cached.
    """

    SIZE = 4096

    def __init__(self, clock: IReactorTime, spf_known: Callable, dns_ttl: Callable) -> None:
        self._spf_known = spf_known
        self._dns_ttl = dns_ttl
        self._entries = ExpiringCache(clock, self.SIZE)

    def key(self, header: bytes, identity: SPFIdentity, domain: str) -> tuple | None:
        """
        What the verdicts on a message with this C{header} rest on, or
        None when they cannot be reused: a signature or an ARC set, or no
        SPF result known yet.  C{domain} is the SPF check's.
        """
        lowered = header.lower()
        if b"dkim-signature" in lowered or b"arc-" in lowered:
            return None
        spf = self._spf_known(identity.peer, domain, identity.helo, identity.sender or None)
        if spf is None:
            return None
        return (identity, spf[0], from_fields(header))

    def get(self, key: tuple) -> tuple | None:
        """(header, disposition, reason) found for C{key}, while it holds."""
        return self._entries.get(key)

    def put(self, key: tuple, spf: SPFResult, dmarc_result: str, names: list[str],
            found: tuple) -> None:
        """
        Keep C{found} for C{key} if the outcome is settled, for as long as
        the shortest-lived cached answer among C{names} (the DMARC
        lookups; at least one must be cached).
        """
        if spf is SPFResult.TEMPERROR or dmarc_result not in _SETTLED_DMARC:
            return
        lifetime = min((ttl for ttl in map(self._dns_ttl, names) if ttl is not None),
                       default=0.0)
        self._entries.put(key, found, lifetime)

