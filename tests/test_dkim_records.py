"""
The DKIM key records a node keeps (pullmail.trust.dkim_records): a key
is looked up once and kept, parsed, for its DNS TTL on the node's clock,
so the next message signed with it is verified at once, without a lookup;
what a record says against a signature (missing, revoked) is kept as
long as DNS allows; a failed lookup is never kept.
"""

from __future__ import annotations

import pytest
from test_dkim import MESSAGE, FakeTXT, clock, verifier
from twisted.internet import defer

from pullmail.net.dns import DNSPermanentError, DNSTemporaryError
from pullmail.testing import FakeResolver, assert_no_result, result_of
from pullmail.trust.dkim import Signer
from pullmail.trust.dkim_records import (MAX_KEY_TTL, KeyProblem, KeyRecords, PublicKey,
                                         parse_key)

RSA = "pm1-rsa._domainkey.example.org"
ED25519 = "pm1-ed25519._domainkey.example.org"


@pytest.fixture
def signed(dkim_keys):
    return b"".join(Signer(dkim_keys[0], clock()).sign([MESSAGE]))


def results(d: defer.Deferred) -> list[str]:
    return [r.result for r in result_of(d)]


def test_second_message_with_the_same_keys_does_no_lookup(signed, dkim_keys):
    txt = FakeTXT(dkim_keys[1])
    checker = verifier(txt)
    assert results(checker.verify(signed)) == ["pass", "pass"]
    assert sorted(txt.asked) == [ED25519, RSA]
    ran = []

    def run_blocking(function, *args):
        ran.append(function)
        return defer.succeed(function(*args))

    checker.run_blocking = run_blocking
    d = checker.verify(signed.replace(b"Shall we?", b"Shall we not?"))
    assert d.called                             # at once: nothing waited for
    assert results(d) == ["fail", "fail"]       # checked, with the kept keys
    assert sorted(txt.asked) == [ED25519, RSA] and ran == []


def test_keys_are_kept_for_their_ttl_then_looked_up_again(signed, dkim_keys):
    txt, at = FakeTXT(dkim_keys[1], ttl=300), clock()
    checker = verifier(txt, at=at)
    results(checker.verify(signed))
    at.advance(299.5)
    assert results(checker.verify(signed)) == ["pass", "pass"]
    assert len(txt.asked) == 2
    at.advance(0.5)
    txt.records[RSA] = "v=DKIM1; k=rsa; p="      # rotated away meanwhile
    assert results(checker.verify(signed)) == ["permerror", "pass"]
    assert sorted(txt.asked) == [ED25519, ED25519, RSA, RSA]


def test_each_key_is_kept_for_its_own_ttl(dkim_keys):
    at = clock()
    ttls = {RSA: 60.0, ED25519: 3600.0}
    txt = FakeTXT(dkim_keys[1])
    keys = KeyRecords(lambda name: txt.answer(name).addCallback(
        lambda answer: type(answer)(answer.records, ttls[name])), at)
    for name in (RSA, ED25519):
        result_of(keys.fetch(name))
    at.advance(60)
    assert keys.known(RSA) is None
    assert isinstance(keys.known(ED25519), PublicKey)


def test_a_failed_lookup_is_not_kept(signed, dkim_keys):
    records = dict(dkim_keys[1])
    records[RSA] = DNSTemporaryError("timeout")
    txt = FakeTXT(records)
    checker = verifier(txt)
    assert results(checker.verify(signed)) == ["temperror", "pass"]
    assert results(checker.verify(signed)) == ["temperror", "pass"]
    assert txt.asked == [RSA, ED25519, RSA]     # asked again; the good key kept
    txt.records[RSA] = dkim_keys[1][RSA]         # the nameserver is back
    assert results(checker.verify(signed)) == ["pass", "pass"]


def test_a_lookup_that_raises_is_a_temperror_not_kept(dkim_keys):
    def broken(name):
        raise RuntimeError("resolver bug")

    keys = KeyRecords(broken, clock())
    outcome = result_of(keys.fetch(RSA))
    assert outcome.result == "temperror" and "resolver bug" in outcome.reason
    assert keys.known(RSA) is None


def test_a_revoked_key_is_kept_negatively_for_its_ttl(signed, dkim_keys):
    records = dict(dkim_keys[1])
    records[RSA] = "v=DKIM1; k=rsa; p="          # RFC 6376 3.6.1: revoked
    txt, at = FakeTXT(records, ttl=60), clock()
    checker = verifier(txt, at=at)
    [first, _] = result_of(checker.verify(signed))
    assert first.result == "permerror" and "bad key record" in first.reason
    at.advance(59)
    assert results(checker.verify(signed)) == ["permerror", "pass"]
    assert txt.asked.count(RSA) == 1
    at.advance(1)
    txt.records[RSA] = dkim_keys[1][RSA]
    assert results(checker.verify(signed)) == ["pass", "pass"]
    assert txt.asked.count(RSA) == 2


@pytest.mark.parametrize("missing", [
    DNSPermanentError(RSA, ttl=120.0),      # NXDOMAIN, the SOA's negative TTL
    [],                                     # no TXT at the name
])
def test_a_missing_key_is_kept_for_the_negative_ttl(signed, dkim_keys, missing):
    records = dict(dkim_keys[1])
    records[RSA] = missing
    txt, at = FakeTXT(records, ttl=120), clock()
    checker = verifier(txt, at=at)
    assert results(checker.verify(signed)) == ["permerror", "pass"]
    at.advance(119)
    assert results(checker.verify(signed)) == ["permerror", "pass"]
    assert txt.asked.count(RSA) == 1
    at.advance(1)
    results(checker.verify(signed))
    assert txt.asked.count(RSA) == 2


def test_an_answer_without_a_ttl_is_not_kept(signed, dkim_keys):
    """RFC 2308 5: a negative answer without an SOA is not cached (TTL 0)."""
    records = dict(dkim_keys[1])
    records[RSA] = DNSPermanentError(RSA, ttl=0.0)
    txt = FakeTXT(records)
    checker = verifier(txt)
    for _ in range(3):
        assert results(checker.verify(signed)) == ["permerror", "pass"]
    assert txt.asked.count(RSA) == 3 and txt.asked.count(ED25519) == 1


def test_a_known_key_does_not_wait_for_an_unknown_one(signed, dkim_keys):
    records = dict(dkim_keys[1])
    txt = FakeTXT(records)
    checker = verifier(txt)
    results(checker.verify(signed))
    checker.keys.forget(ED25519)
    txt.records[ED25519] = "hang"
    d = checker.verify(signed)
    assert_no_result(d)
    assert txt.asked[-1] == ED25519 and txt.asked.count(RSA) == 1
    txt.waiting[ED25519].errback(DNSTemporaryError("timeout"))
    assert results(d) == ["pass", "temperror"]


def test_the_least_recently_used_key_is_dropped_first(dkim_keys):
    txt = FakeTXT(dkim_keys[1] | {"other._domainkey.example.net": dkim_keys[1][RSA]})
    keys = KeyRecords(txt.answer, clock(), entries=2)
    for name in (RSA, ED25519):
        result_of(keys.fetch(name))
    keys.known(RSA)                              # used: ED25519 is now the oldest
    result_of(keys.fetch("other._domainkey.example.net"))
    assert keys.known(ED25519) is None
    assert isinstance(keys.known(RSA), PublicKey)


@pytest.mark.parametrize("record", [
    "v=DKIM1; k=rsa; p=", "v=DKIM1; k=rsa; p=!!notbase64!!", "v=DKIM1; k=rsa p=AAAA",
    "v=DKIM2; k=rsa; p=AAAA", "v=DKIM1; k=dsa; p=AAAA", "v=DKIM1; k=ed25519; p=AAAA",
    "v=DKIM1; k=rsa; s=tlsrpt:x; p=AAAA", "\udcff\x00", "",
])
def test_a_bad_record_is_a_permerror_never_an_exception(record):
    outcome = parse_key(RSA, record)
    assert isinstance(outcome, KeyProblem) and outcome.result == "permerror"


def test_parsed_keys_are_what_the_check_needs(dkim_keys):
    rsa, ed = parse_key(RSA, dkim_keys[1][RSA]), parse_key(ED25519, dkim_keys[1][ED25519])
    assert (rsa.kind, rsa.bits) == (b"rsa", 2048)
    assert (ed.kind, ed.bits) == (b"ed25519", 256)


def test_keys_come_through_the_resolver_seam(dkim_keys):
    """The node hands KeyRecords its resolver's txt_answer; FakeResolver is that seam."""
    resolver = FakeResolver(txt={RSA: [dkim_keys[1][RSA]]}, permanent=["gone._domainkey.x.test"])
    at = clock()
    keys = KeyRecords(resolver.txt_answer, at)
    assert isinstance(result_of(keys.fetch(RSA)), PublicKey)
    assert result_of(keys.fetch("gone._domainkey.x.test")) == KeyProblem(
        "permerror", "no key record")
    at.advance(resolver.ttl - 1)
    assert keys.known(RSA) is not None and keys.known("gone._domainkey.x.test") is not None
    at.advance(1)
    assert keys.known(RSA) is None and keys.known("gone._domainkey.x.test") is None
    assert resolver.queries == [("TXT", RSA), ("TXT", "gone._domainkey.x.test")]


def test_no_record_is_kept_longer_than_a_day(dkim_keys):
    txt, at = FakeTXT(dkim_keys[1], ttl=2 ** 31 - 1), clock()
    keys = KeyRecords(txt.answer, at)
    result_of(keys.fetch(RSA))
    at.advance(MAX_KEY_TTL - 1)
    assert keys.known(RSA) is not None
    at.advance(1)
    assert keys.known(RSA) is None
