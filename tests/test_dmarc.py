"""
DMARC (pullmail.trust.dmarc, RFC 7489): alignment (relaxed, strict), p,
sp, pct; policy discovery at the From domain then the organisational
domain; garbled, duplicated and unreachable records give a result; a
header without exactly one From field and one author (RFC 7489 6.6.1);
reporting and testing tags.
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
    MAX_AUTHOR_DOMAINS,
    DMARCChecker,
    OrganizationalDomains,
    evaluate,
    select_record,
)
from pullmail.trust.message import Authors, authors


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


def _parsed_in_full(value: str) -> Authors:
    """What authors() makes of one From field C{value} through email.utils alone."""
    domains: dict[str, None] = {}
    mailboxes = 0
    for _name, address in email.utils.getaddresses([value]):
        mailboxes += bool(address)
        domain = address.rpartition("@")[2].strip().rstrip(".").lower()
        if "@" in address and domain:
            domains[domain] = None
    return Authors(1, tuple(domains), mailboxes)


@pytest.mark.parametrize("value, expected", [
    ("<load@source.bench>", ("source.bench",)),
    ("a.b@Example.ORG", ("example.org",)),
    ("Alice Doe <alice@mail.example.org>", ("mail.example.org",)),
    ('"Doe, Alice" <alice@example.org>', ("example.org",)),       # the full parser
    ("a@example.org, b@example.net", ("example.org", "example.net")),
    ("undisclosed-recipients:;", ()),
    ("alice@example.org.", ("example.org",)),
])
def test_authors_of_plain_and_other_from_fields(value, expected):
    """RFC 7489 6.6.1: the author domains, plain mailboxes and the rest alike."""
    header = f"From: {value}\r\nSubject: x\r\n\r\n".encode()
    assert authors(header).domains == expected
    assert authors(header) == _parsed_in_full(value)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="aZ09.-_+@<> \"(),:;\\[]", max_size=30))
def test_authors_agree_with_the_full_parser(value):
    """The plain-mailbox shortcut never reads a From otherwise than email.utils does."""
    value = value.strip()
    if value:
        assert authors(f"From: {value}\r\n\r\n".encode()) == _parsed_in_full(value)


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
    """C{from_domains}: the author domains of one From field, or an L{Authors}."""
    if not isinstance(from_domains, Authors):
        from_domains = Authors(1, tuple(from_domains), len(from_domains))
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


# -- RFC 7489 6.6.1: not exactly one From field with one author ------------------------

POLICIES = {"_dmarc.example.org": ["v=DMARC1; p=reject"],
            "_dmarc.example.net": ["v=DMARC1; p=quarantine"],
            "_dmarc.example.com": ["v=DMARC1; p=none"]}


@pytest.mark.parametrize("header, author", [
    (b"From: a@example.org\r\n", "example.org"),
    (b'From: "Bank, Inc." <a@Example.ORG.>\r\n', "example.org"),
    (b"From: a@example.org\r\nFrom: b@example.org\r\n", None),
    (b"From: a@example.org, b@example.net\r\n", None),
    (b"From: a@example.org, b@example.org\r\n", None),
    (b"From: undisclosed-recipients:;\r\n", None),
    (b"To: a@example.org\r\n", None),
])
def test_only_one_from_field_with_one_mailbox_names_a_single_author(header, author):
    """What the signer signs for: nothing ambiguous."""
    assert authors(header).single == author


def test_several_from_fields_are_permerror_and_refused(domains):
    """RFC 5322 3.6 allows one; a reader sees one while a checker may read another."""
    header = b"From: a@example.com\r\nFrom: ceo@example.org\r\n"
    verdict, asked = check(POLICIES, authors(header), domains=domains)
    assert (verdict.result, verdict.disposition, asked) == ("permerror", "reject", [])
    assert verdict.reason == "2 From fields"


def test_each_author_domain_is_checked_and_the_strictest_failing_policy_applies(domains):
    """RFC 7489 6.6.1: a From naming mailboxes of several domains."""
    header = b"From: a@example.com, b@example.net, c@example.org\r\n"
    verdict, asked = check(POLICIES, authors(header), domains=domains)
    assert sorted(asked) == sorted(POLICIES)
    assert (verdict.result, verdict.domain, verdict.disposition) == (
        "fail", "example.org", "reject")
    # Aligned DKIM for example.org: example.net's quarantine is the strictest left.
    verdict, _ = check(POLICIES, authors(header), dkim=[("pass", "example.org")],
                       domains=domains)
    assert (verdict.result, verdict.domain, verdict.disposition) == (
        "fail", "example.net", "quarantine")
    # Both covered: example.com's p=none fails without consequence.
    verdict, _ = check(POLICIES, authors(header), domains=domains,
                       dkim=[("pass", "example.org"), ("pass", "example.net")])
    assert (verdict.result, verdict.disposition) == ("fail", "none")


def test_several_authors_all_aligned_pass(domains):
    header = b"From: a@example.org, b@mail.example.org\r\n"
    verdict, _ = check(POLICIES, authors(header), dkim=[("pass", "example.org")],
                       domains=domains)
    assert (verdict.result, verdict.domain) == ("pass", "example.org")


def test_too_many_author_domains_are_refused_unchecked(domains):
    header = b"From: " + b", ".join(
        b"a@d%d.test" % n for n in range(MAX_AUTHOR_DOMAINS + 1)) + b"\r\n"
    verdict, asked = check({}, authors(header), domains=domains)
    assert (verdict.result, verdict.disposition, asked) == ("permerror", "reject", [])


@pytest.mark.parametrize("header", [b"To: a@example.org\r\n",
                                    b"From: undisclosed-recipients:;\r\n",
                                    b"From: root\r\n"])
def test_a_from_without_a_domain_is_permerror_and_delivered(domains, header):
    """Nobody is claimed, so nobody is impersonated: the header says so, no more."""
    verdict, asked = check(POLICIES, authors(header), domains=domains)
    assert (verdict.result, verdict.disposition, asked) == ("permerror", "none", [])


def test_a_domainless_mailbox_beside_a_real_one_does_not_skip_the_check(domains):
    header = b"From: support, ceo@example.org\r\n"
    verdict, _ = check(POLICIES, authors(header), domains=domains)
    assert (verdict.result, verdict.domain, verdict.disposition) == (
        "fail", "example.org", "reject")


# -- tags RFC 7489 defines for reports, and DMARCbis's t= ------------------------------


@pytest.mark.parametrize("record, disposition", [
    ("v=DMARC1; p=reject; rua=mailto:a@example.org,mailto:b@x.test!10m; "
     "ruf=mailto:f@example.org; fo=1:d:s; rf=afrf; ri=3600", "reject"),
    ("v=DMARC1; p=reject; rua=not a uri; ruf=; fo=zz; rf=bogus; ri=soon", "reject"),
    ("v=DMARC1; p=reject; t=y", "quarantine"),               # testing: one step down
    ("v=DMARC1; p=quarantine; T = Y ", "none"),
    ("v=DMARC1; p=reject; pct=0; t=n", "quarantine"),        # t=n does not override pct
    ("v=DMARC1; p=reject; t=maybe", "reject"),               # unknown value: ignored
    ("v=DMARC1; p=reject; np=reject; psd=n; x-future=1", "reject"),
])
def test_reporting_and_testing_tags_parse_and_are_ignored_cleanly(domains, record, disposition):
    """No reports are sent; t=y is the DMARCbis testing flag, honoured as pct=0."""
    verdict = evaluate(record, "example.org", False, ("fail", "example.org"), [], 50.0, domains)
    assert (verdict.result, verdict.disposition) == ("fail", disposition)
