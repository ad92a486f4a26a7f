"""
DMARC (pullmail.trust.dmarc, RFC 7489): alignment (relaxed, strict), p,
sp, pct; policy discovery at the From domain then the organisational
domain; garbled, duplicated and unreachable records give a result.
"""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from pullmail.net.dns import DNSPermanentError, DNSTemporaryError
from pullmail.testing import result_of
from pullmail.trust.dmarc import (
    DMARCChecker,
    OrganizationalDomains,
    evaluate,
    select_record,
)
from pullmail.trust.message import from_domains


@pytest.fixture(scope="module")
def domains():
    return OrganizationalDomains()


def test_organizational_domain_from_the_bundled_list(domains):
    """RFC 7489 3.2, with no download (these tests run without a network)."""
    assert domains.of("mail.example.co.uk") == "example.co.uk"
    assert domains.of("a.b.example.org") == "example.org"
    assert domains.of("example.org") == "example.org"
    assert domains.of("co.uk") == "co.uk"


def test_organizational_domain_is_the_same_asked_again(domains):
    """Remembered per domain (every message asks), whatever its case."""
    assert [domains.of(d) for d in ("News.Example.ORG", "news.example.org")] == \
        ["example.org", "example.org"]


def _parsed_in_full(value: str) -> list[str]:
    """from_domains' rule applied to what email.utils makes of C{value}."""
    domains = []
    for _name, address in email.utils.getaddresses([value]):
        domain = address.rpartition("@")[2].strip().rstrip(".").lower()
        if "@" not in address or not domain:
            return []
        domains.append(domain)
    return domains


@pytest.mark.parametrize("value, expected", [
    ("<load@source.bench>", ["source.bench"]),
    ("a.b@Example.ORG", ["example.org"]),
    ("Alice Doe <alice@mail.example.org>", ["mail.example.org"]),
    ('"Doe, Alice" <alice@example.org>', ["example.org"]),       # the full parser
    ("a@example.org, b@example.net", ["example.org", "example.net"]),
    ("undisclosed-recipients:;", []),
    ("alice@example.org.", ["example.org"]),
])
def test_from_domains(value, expected):
    """RFC 7489 6.6.1: the author domains, plain mailboxes and the rest alike."""
    message = f"From: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    assert from_domains(message) == expected == _parsed_in_full(value)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="aZ09.-_+@<> \"(),:;\\[]", max_size=30))
def test_from_domains_agree_with_the_full_parser(value):
    """The plain-mailbox shortcut never reads a From otherwise than email.utils does."""
    value = value.strip()
    if value:
        message = f"From: {value}\r\n\r\n".encode()
        assert from_domains(message) == _parsed_in_full(value)


PASS, FAIL = "pass", "fail"


@pytest.mark.parametrize("record, from_domain, spf, dkim, sample, expected", [
    # Aligned DKIM pass (relaxed: same organisational domain).
    ("v=DMARC1; p=reject", "example.org", None, [(PASS, "example.org")], 0,
     ("pass", "reject", "none")),
    ("v=DMARC1; p=reject", "news.example.org", None, [(PASS, "example.org")], 0,
     ("pass", "reject", "none")),
    ("v=DMARC1; p=reject", "example.org", None, [(PASS, "mail.example.org")], 0,
     ("pass", "reject", "none")),
    # Strict DKIM alignment wants the very domain (RFC 7489 3.1.1).
    ("v=DMARC1; p=reject; adkim=s", "example.org", None, [(PASS, "mail.example.org")], 0,
     ("fail", "reject", "reject")),
    # Aligned SPF pass; strict SPF alignment.
    ("v=DMARC1; p=quarantine", "example.org", (PASS, "bounce.example.org"), [], 0,
     ("pass", "quarantine", "none")),
    ("v=DMARC1; p=quarantine; aspf=s", "example.org", (PASS, "bounce.example.org"), [], 0,
     ("fail", "quarantine", "quarantine")),
    # Passing but unaligned identities do not count.
    ("v=DMARC1; p=reject", "example.org", (PASS, "example.net"), [(PASS, "example.net")], 0,
     ("fail", "reject", "reject")),
    # A failing aligned signature does not count.
    ("v=DMARC1; p=reject", "example.org", ("softfail", "example.org"), [(FAIL, "example.org")],
     0, ("fail", "reject", "reject")),
    # A public suffix is no organisational domain to align with.
    ("v=DMARC1; p=reject", "victim.co.uk", None, [(PASS, "attacker.co.uk")], 0,
     ("fail", "reject", "reject")),
    # p=none: the verdict only.
    ("v=DMARC1; p=none", "example.org", None, [], 0, ("fail", "none", "none")),
    # pct (RFC 7489 6.6.4): outside the sample, the next policy down.
    ("v=DMARC1; p=reject; pct=20", "example.org", None, [], 19.9, ("fail", "reject", "reject")),
    ("v=DMARC1; p=reject; pct=20", "example.org", None, [], 20, ("fail", "reject", "quarantine")),
    ("v=DMARC1; p=quarantine; pct=0", "example.org", None, [], 0,
     ("fail", "quarantine", "none")),
])
def test_evaluate(domains, record, from_domain, spf, dkim, sample, expected):
    verdict = evaluate(record, from_domain, False, spf, dkim, sample, domains)
    assert (verdict.result, verdict.policy, verdict.disposition) == expected
    assert verdict.domain == from_domain


def test_sp_applies_to_a_subdomain_found_by_the_organizational_record(domains):
    record = "v=DMARC1; p=reject; sp=quarantine"
    assert evaluate(record, "news.example.org", True, None, [], 0, domains).disposition == \
        "quarantine"
    assert evaluate("v=DMARC1; p=reject", "news.example.org", True, None, [], 0,
                    domains).disposition == "reject"


@pytest.mark.parametrize("record", [
    "v=DMARC1; p=sometimes",           # bad p
    "v=DMARC1; pct=50",                # no p
    "v=DMARC1; p=reject; pct=lots",    # bad pct
    "v=DMARC1 p=reject",               # no separator
])
def test_garbled_record_is_permerror(domains, record):
    verdict = evaluate(record, "example.org", False, None, [], 0, domains)
    assert (verdict.result, verdict.disposition) == ("permerror", "none")


def test_select_record():
    """RFC 7489 6.6.3: other TXT records are ignored; two DMARC records are an error."""
    assert select_record(["v=spf1 -all", "v=DMARC1; p=none"]) == "v=DMARC1; p=none"
    assert select_record(["v=spf1 -all", "v=DMARC10; p=none"]) is None
    with pytest.raises(ValueError):
        select_record(["v=DMARC1; p=none", "v=DMARC1; p=reject"])


class TXT:
    def __init__(self, records) -> None:
        self.records = records
        self.asked = []

    def __call__(self, name):
        self.asked.append(name)
        answer = self.records.get(name, DNSPermanentError(name))
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def check(records, from_domains, spf=None, dkim=(), sample=0.0, domains=None):
    txt = TXT(records)
    checker = DMARCChecker(txt, domains or OrganizationalDomains(), lambda: sample)
    return result_of(checker.check(from_domains, spf, list(dkim))), txt.asked


def test_discovery_falls_back_to_the_organizational_domain(domains):
    verdict, asked = check({"_dmarc.example.org": ["v=DMARC1; p=reject; sp=quarantine"]},
                           ["news.example.org"], domains=domains)
    assert asked == ["_dmarc.news.example.org", "_dmarc.example.org"]
    assert (verdict.result, verdict.policy, verdict.disposition) == (
        "fail", "quarantine", "quarantine")


def test_no_record_anywhere_is_none(domains):
    verdict, asked = check({"_dmarc.example.org": []}, ["example.org"], domains=domains)
    assert (verdict.result, verdict.disposition) == ("none", "none")
    assert asked == ["_dmarc.example.org"]


def test_duplicated_record_is_permerror(domains):
    verdict, _ = check({"_dmarc.example.org": ["v=DMARC1; p=none", "v=DMARC1; p=reject"]},
                       ["example.org"], domains=domains)
    assert (verdict.result, verdict.disposition) == ("permerror", "none")


def test_dns_failure_is_temperror(domains):
    verdict, _ = check({"_dmarc.example.org": DNSTemporaryError("timeout")}, ["example.org"],
                       domains=domains)
    assert (verdict.result, verdict.disposition) == ("temperror", "none")


@pytest.mark.parametrize("authors", [[], ["example.org", "example.net"]])
def test_no_single_author_domain_is_permerror(domains, authors):
    verdict, asked = check({}, authors, domains=domains)
    assert verdict.result == "permerror" and asked == []
