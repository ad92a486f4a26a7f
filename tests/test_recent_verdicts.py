"""
Tests for L{pullmail.inbound.recent_verdicts} and its use by
L{pullmail.inbound.verdicts.MessageChecker}: the verdicts on an unsigned
message serve again for the same origin, SPF result and From, for as long
as the DMARC records' cached answers live (on the injected clock), and
never for a signed message, an unknown SPF result or an unsettled outcome.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_dkim import FakeTXT, blocking
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail.inbound.recent_verdicts import RecentVerdicts, dmarc_names, from_fields
from pullmail.inbound.verdicts import MessageChecker, Verdict
from pullmail.testing import result_of
from pullmail.trust.dkim import Verifier
from pullmail.trust.dmarc import DMARCChecker, OrganizationalDomains
from pullmail.trust.message import authors, header_end
from pullmail.trust.spf import SPFIdentity, SPFResult

IDENTITY = SPFIdentity("192.0.2.9", "mail.bank.test", "carol@bank.test")
HEADER = b"From: Carol <carol@bank.test>\r\nSubject: hi\r\n\r\n"
MESSAGE = HEADER + b"Hello.\r\n"
FOUND = (b"Authentication-Results: mx.example.org;\r\n\tspf=pass\r\n", "deliver", "")


@pytest.fixture(scope="module")
def domains():
    return OrganizationalDomains()


class KnownSPF:
    """The trust check's memo: C{spf_known} and C{spf_result} of one result."""

    def __init__(self, result: SPFResult | None = SPFResult.PASS) -> None:
        self.result = result
        self.asked = 0

    def known(self, peer, domain, helo, sender):
        return None if self.result is None else (self.result, "")

    def __call__(self, peer, domain, helo, sender):
        self.asked += 1
        return defer.succeed((self.result or SPFResult.NONE, ""))


def recent(clock, spf=None, ttls=None) -> RecentVerdicts:
    ttls = {"_dmarc.bank.test": 300.0} if ttls is None else ttls
    return RecentVerdicts(clock, (spf or KnownSPF()).known, ttls.get)


# -- the memo -----------------------------------------------------------------------------

def test_kept_for_the_shortest_ttl_of_the_dmarc_lookups() -> None:
    clock = Clock()
    memo = recent(clock, ttls={"_dmarc.a.test": 30.0, "_dmarc.b.test": 10.0})
    key = memo.key(HEADER, IDENTITY, "bank.test")
    memo.put(key, SPFResult.PASS, "none", ["_dmarc.a.test", "_dmarc.b.test", "_dmarc.c.test"],
             FOUND)
    clock.advance(9.9)
    assert memo.get(key) == FOUND
    clock.advance(0.1)
    assert memo.get(key) is None


@pytest.mark.parametrize("spf, dmarc, ttls", [
    (SPFResult.TEMPERROR, "none", {"_dmarc.bank.test": 300.0}),
    (SPFResult.PASS, "temperror", {"_dmarc.bank.test": 300.0}),
    (SPFResult.PASS, "fail", {"_dmarc.bank.test": 300.0}),      # pct sampling
    (SPFResult.PASS, "none", {}),                               # nothing cached
    (SPFResult.PASS, "none", {"_dmarc.bank.test": 0.0}),
])
def test_unsettled_outcomes_are_not_kept(spf, dmarc, ttls) -> None:
    memo = recent(Clock(), ttls=ttls)
    key = memo.key(HEADER, IDENTITY, "bank.test")
    memo.put(key, spf, dmarc, ["_dmarc.bank.test"], FOUND)
    assert memo.get(key) is None


@pytest.mark.parametrize("header", [
    b"DKIM-Signature: v=1; d=bank.test\r\n" + HEADER,
    b"ARC-Seal: i=1; cv=none\r\n" + HEADER,
])
def test_no_key_for_signed_or_sealed_mail(header) -> None:
    assert recent(Clock()).key(header, IDENTITY, "bank.test") is None


def test_no_key_before_the_trust_check_knows_the_spf_result() -> None:
    assert recent(Clock(), KnownSPF(None)).key(HEADER, IDENTITY, "bank.test") is None


def test_the_key_tells_apart_what_the_verdicts_rest_on() -> None:
    memo = recent(Clock())
    key = memo.key(HEADER, IDENTITY, "bank.test")
    assert key == memo.key(HEADER.replace(b"hi", b"other"), IDENTITY, "bank.test")
    assert key != memo.key(HEADER.replace(b"carol@bank", b"carol@other"), IDENTITY, "bank.test")
    two_froms = HEADER.replace(b"\r\n\r\n", b"\r\n") + HEADER
    assert key != memo.key(two_froms, IDENTITY, "bank.test")
    other = SPFIdentity("192.0.2.10", IDENTITY.helo, IDENTITY.sender)
    assert key != memo.key(HEADER, other, "bank.test")
    assert key != recent(Clock(), KnownSPF(SPFResult.FAIL)).key(HEADER, IDENTITY, "bank.test")


def test_dmarc_names_include_the_organizational_domain(domains) -> None:
    assert dmarc_names(["mail.bank.co.uk", "bank.test"], domains.of) == [
        "_dmarc.mail.bank.co.uk", "_dmarc.bank.co.uk", "_dmarc.bank.test"]


# -- in the checker ----------------------------------------------------------------------

def checker(domains, clock, record="v=DMARC1; p=none", ttls=None):
    txt = FakeTXT({"_dmarc.bank.test": record})
    spf = KnownSPF()
    made = MessageChecker("mx.example.org", spf, Verifier(txt, blocking),
                          DMARCChecker(txt, domains, lambda: 0.0), "enforce", None,
                          recent(clock, spf, ttls))
    return made, txt, spf


def test_unsigned_mail_from_a_busy_origin_is_checked_once_per_ttl(domains) -> None:
    clock = Clock()
    made, txt, spf = checker(domains, clock)
    first = result_of(made.check(MESSAGE, IDENTITY))
    second = result_of(made.check(MESSAGE.replace(b"Hello", b"Again"), IDENTITY))
    assert (txt.asked, spf.asked) == (["_dmarc.bank.test"], 1)
    assert second == Verdict(MESSAGE.replace(b"Hello", b"Again"), first.header, "deliver")
    assert b"spf=pass smtp.mailfrom=carol@bank.test" in first.header
    assert b"dmarc=pass" in first.header
    clock.advance(300)
    result_of(made.check(MESSAGE, IDENTITY))
    assert txt.asked == ["_dmarc.bank.test"] * 2


def test_our_forged_results_are_removed_from_a_reused_verdict(domains) -> None:
    made, _, _ = checker(domains, Clock())
    result_of(made.check(MESSAGE, IDENTITY))
    forged = b"Authentication-Results: mx.example.org; dmarc=pass\r\n" + MESSAGE
    assert result_of(made.check(forged, IDENTITY)).message == MESSAGE


def test_a_quarantine_verdict_is_reused_with_its_disposition(domains) -> None:
    made, txt, _ = checker(domains, Clock(), "v=DMARC1; p=quarantine")
    spoofed = MESSAGE.replace(b"From: Carol <carol@bank.test>", b"From: <x@bank.test>")
    other = SPFIdentity("192.0.2.9", "evil.test", "x@evil.test")
    first = result_of(made.check(spoofed, other))
    assert first.disposition == "quarantine"     # a DMARC fail: asked afresh each time
    assert result_of(made.check(spoofed, other)).disposition == "quarantine"
    assert len(txt.asked) == 2


def test_signed_mail_is_always_checked(domains) -> None:
    made, txt, _ = checker(domains, Clock())
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=bank.test; s=x; b=; bh=\r\n" + MESSAGE
    result_of(made.check(signed, IDENTITY))
    result_of(made.check(signed, IDENTITY))
    assert txt.asked.count("_dmarc.bank.test") == 2


_LINES = [b"From: <carol@bank.test>\r\n", b"from : Carol\r\n", b" <carol@bank.test>\r\n",
          b"From: <x@evil.test>\r\n", b"X-From: <x@evil.test>\r\n", b"Subject: a\r\n",
          b" from: <x@evil.test>\r\n", b"not a field\r\n", b"Subject: a\nFrom: <y@b.test>\r\n",
          b"\r\n", b"From: <x@evil.test>\r", b"Body\r\n"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_LINES), max_size=5), st.lists(st.sampled_from(_LINES), max_size=5))
@example([b"from : Carol\r\n", b" <carol@bank.test>\r\n"],
         [b"from : Carol\r\n", b" from: <x@evil.test>\r\n"])
def test_the_same_from_fields_mean_the_same_authors(first, second) -> None:
    """The memo's key part stands for the DMARC authors: never two authors for one key."""
    one, two = (header_of(b"".join(lines) + b"\r\n") for lines in (first, second))
    if from_fields(one) == from_fields(two):
        assert authors(one) == authors(two)


def header_of(message: bytes) -> bytes:
    return message[:header_end(message)]


def test_a_plain_header_is_keyed_by_its_from_fields_as_written() -> None:
    assert from_fields(HEADER) == (b"From: Carol <carol@bank.test>\r\n",)
    odd = b"not a field\r\n" + HEADER
    assert from_fields(odd) == authors(odd)
