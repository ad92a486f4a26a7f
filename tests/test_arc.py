"""
ARC chain validation of arriving mail (pullmail.trust.arc, RFC 8617 5.2):
pass, fail or none for each chain, key records through our resolver, the
check itself off the reactor thread, and a result (never a traceback) for
every broken or hostile ARC set.
"""

from __future__ import annotations

import pytest
from test_dkim import MESSAGE, FakeTXT, clock
from twisted.internet import defer

from pullmail.inbound.authresults import Results, authentication_results
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError
from pullmail.testing import assert_no_result, result_of
from pullmail.trust.arc import MAX_ARC_KEYS, ARCResult, ARCVerifier
from pullmail.trust.dkim import Signer

HOP1 = b"Authentication-Results: mx.example.org;\r\n\tspf=pass smtp.mailfrom=a@b.test\r\n"


@pytest.fixture(scope="module")
def forwarder_keys(tmp_path_factory):
    """Keys of a second forwarder, forwarder.test, and their records."""
    from pullmail.config import DKIMConfig
    from pullmail.trust.dkim_keys import ensure_keys, load_keys

    config = DKIMConfig(key_dir=tmp_path_factory.mktemp("arc"), selector="fw")
    ensure_keys(config, ["forwarder.test"])
    keys = load_keys(config, ["forwarder.test"])
    return keys, {k.record_name.rstrip("."): k.record_value for k in keys["forwarder.test"]}


@pytest.fixture
def records(dkim_keys, forwarder_keys):
    return {**dkim_keys[1], **forwarder_keys[1]}


class Threads:
    """run_blocking that records what it ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, function, *args):
        self.ran.append(function.__name__)
        return defer.succeed(function(*args))


def check(message: bytes, records, threads=None) -> ARCResult:
    return result_of(ARCVerifier(FakeTXT(records), threads or Threads()).verify(message))


def sealed(dkim_keys) -> bytes:
    """MESSAGE as example.org forwards it: its verdicts, sealed (i=1, cv=none)."""
    message = HOP1 + MESSAGE
    return b"".join(Signer(dkim_keys[0], clock()).seal(message, "example.org", HOP1,
                                                      "none")) + message


def test_unsealed_mail_is_none_without_a_lookup_or_a_thread():
    txt, threads = FakeTXT({}), Threads()
    assert result_of(ARCVerifier(txt, threads).verify(MESSAGE)) == ARCResult("none")
    assert txt.asked == [] and threads.ran == []


def test_a_chain_we_sealed_passes_checked_in_a_thread(dkim_keys, records):
    threads = Threads()
    result = check(sealed(dkim_keys), records, threads)
    assert (result.result, result.instance, result.domain) == ("pass", 1, "example.org")
    assert threads.ran == ["_check"]


def test_a_second_forwarder_continues_the_chain_with_cv_pass(dkim_keys, forwarder_keys,
                                                              records):
    """The second hop writes arc=pass in its results; its seal says cv=pass."""
    first = sealed(dkim_keys)
    chain = check(first, records)
    verdict = authentication_results("mx.forwarder.test", Results(
        spf=("fail", "mailfrom", "a@b.test"), arc=chain))
    assert b"arc=pass (i=1 d=example.org)" in verdict
    second = verdict + first
    arc = Signer(forwarder_keys[0], clock()).seal(second, "forwarder.test", verdict, chain.result)
    assert b"i=2; cv=pass" in arc[0]
    result = check(b"".join(arc) + second, records)
    assert (result.result, result.instance, result.domain) == ("pass", 2, "forwarder.test")


def test_a_changed_body_fails(dkim_keys, records):
    result = check(sealed(dkim_keys).replace(b"Shall we?", b"Pay me."), records)
    assert result.result == "fail"
    assert "ARC-Message-Signature" in result.reason


@pytest.mark.parametrize("answer, reason", [
    (DNSPermanentError("nxdomain"), ""),
    ([], ""),
    (DNSTemporaryError("timeout"), "key lookup failed: pm1-rsa._domainkey.example.org"),
    ("v=DKIM1; k=rsa; p=", ""),
])
def test_key_problems_fail_the_chain(dkim_keys, records, answer, reason):
    records["pm1-rsa._domainkey.example.org"] = answer
    result = check(sealed(dkim_keys), records)
    assert result.result == "fail"
    assert reason in result.reason


def arc_set(instance: int, seal: bytes = b"a=rsa-sha256; cv=none; d=example.org; s=pm1-rsa; "
            b"t=1; b=AAAA") -> bytes:
    return (b"ARC-Seal: i=%d; " % instance + seal + b"\r\n"
            b"ARC-Message-Signature: i=%d; a=rsa-sha256; c=relaxed/relaxed; d=example.org; "
            b"s=pm1-rsa; h=from; bh=AAAA; b=AAAA\r\n" % instance
            + b"ARC-Authentication-Results: i=%d; mx.example.org; spf=pass\r\n" % instance)


@pytest.mark.parametrize("fields", [
    arc_set(1),                                                     # signatures that fail
    b"ARC-Authentication-Results: i=1; mx.example.org; spf=pass\r\n",   # incomplete set
    arc_set(1) + arc_set(1),                                        # duplicate instance
    arc_set(2),                                                     # no i=1
    arc_set(1, b"\xff\xfe; d=\x00; b=!!"),                          # junk bytes
    arc_set(1, b"cv=bogus; a=rsa-sha256; d=example.org; s=pm1-rsa; b=AAAA"),  # bad cv
    b"ARC-Seal: no tags at all\r\n",                                # no instance
    b"ARC-Seal: i=x\r\nARC-Message-Signature: i=1\r\n",             # no usable tags
])
def test_broken_arc_sets_fail_and_never_raise(dkim_keys, records, fields):
    result = check(fields + MESSAGE, records)
    assert result.result == "fail"


def test_more_than_fifty_sets_fail_without_lookups():
    """RFC 8617 4.2.1: i= is at most 50."""
    txt = FakeTXT({})
    fields = b"".join(arc_set(n) for n in range(1, 52))
    result = result_of(ARCVerifier(txt, Threads()).verify(fields + MESSAGE))
    assert (result.result, result.instance, txt.asked) == ("fail", 51, [])
    assert "more than 50" in result.reason


def test_a_chain_naming_too_many_keys_fails_without_lookups():
    fields = b"".join(
        b"ARC-Seal: i=%d; a=rsa-sha256; cv=pass; d=k%d.test; s=s; b=AAAA\r\n" % (n, n)
        for n in range(1, MAX_ARC_KEYS + 2))
    txt = FakeTXT({})
    result = result_of(ARCVerifier(txt, Threads()).verify(fields + MESSAGE))
    assert result.result == "fail" and txt.asked == []
    assert "ARC keys" in result.reason


def test_dns_that_stops_answering_holds_only_this_message(dkim_keys, records):
    records["pm1-rsa._domainkey.example.org"] = "hang"
    txt = FakeTXT(records)
    d = ARCVerifier(txt, Threads()).verify(sealed(dkim_keys))
    assert_no_result(d)
    txt.waiting["pm1-rsa._domainkey.example.org"].errback(DNSTemporaryError("timeout"))
    assert result_of(d).result == "fail"


def test_a_header_mentioning_arc_is_not_a_chain():
    message = b"Subject: arc-seal and arc-message-signature explained\r\n" + MESSAGE
    assert check(message, {}) == ARCResult("none")
