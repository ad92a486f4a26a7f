"""
Tests for L{pullmail.trust.policy}: the SPF verdict table, the allow/deny
lists, DNSBL names (RFC 5782), and the order of the checks (SPEC 6).
"""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pullmail.config import TrustConfig
from pullmail.interfaces import ITrustPolicy
from pullmail.net.dns import Resolver, make_dnspython_resolver
from pullmail.smtp import replies
from pullmail.smtp.envelope import Envelope, Session
from pullmail.testing import (
    FakeNameserver,
    FakeResolver,
    FakeTrust,
    cache_dns_answer,
    result_of,
)
from pullmail.trust.policy import (
    REFUSAL_REUSE,
    TRUST_REUSE,
    TrustChecker,
    decide_spf,
    dnsbl_name,
    listed,
)
from pullmail.trust.spf import SPFResult


def _code(reply):
    return None if reply is None else (reply.code, reply.enhanced)


# -- decide_spf -----------------------------------------------------------------------

DEFAULT = ("pass",)
LENIENT = ("pass", "neutral", "none", "softfail")


@pytest.mark.parametrize("result, accepted, expected", [
    (SPFResult.PASS, DEFAULT, None),
    (SPFResult.FAIL, DEFAULT, (550, "5.7.23")),
    (SPFResult.SOFTFAIL, DEFAULT, (550, "5.7.1")),
    (SPFResult.NEUTRAL, DEFAULT, (550, "5.7.1")),
    (SPFResult.NONE, DEFAULT, (550, "5.7.1")),
    (SPFResult.TEMPERROR, DEFAULT, (451, "4.7.24")),
    (SPFResult.PERMERROR, DEFAULT, (550, "5.7.24")),
    (SPFResult.PASS, LENIENT, None),
    (SPFResult.NEUTRAL, LENIENT, None),
    (SPFResult.NONE, LENIENT, None),
    (SPFResult.SOFTFAIL, LENIENT, None),
    (SPFResult.FAIL, LENIENT, (550, "5.7.23")),
    (SPFResult.TEMPERROR, LENIENT, (451, "4.7.24")),
    (SPFResult.PERMERROR, LENIENT, (550, "5.7.24")),
    (SPFResult.PASS, ("neutral",), (550, "5.7.1")),
    (SPFResult.NONE, ("none",), None),
])
def test_decide_spf(result, accepted, expected) -> None:
    """SPEC 3, 6: only results in spf_accept are trusted; refusals per RFC 7372."""
    assert _code(decide_spf(result, accepted)) == expected


def test_decide_spf_every_result_has_a_verdict() -> None:
    for result in SPFResult:
        verdict = decide_spf(result, ())
        assert verdict is not None and verdict.code in (451, 550)
        assert decide_spf(result, (result.value,)) is None


# -- allow / deny lists -----------------------------------------------------------------

ENTRIES = (
    ipaddress.ip_network("192.0.2.0/24"),
    ipaddress.ip_network("2001:db8:1::/48"),
    "example.org",
)


@pytest.mark.parametrize("ip, domain, expected", [
    ("192.0.2.1", "nowhere.example", True),
    ("192.0.2.255", "nowhere.example", True),
    ("192.0.3.1", "nowhere.example", False),
    ("2001:db8:1::5", "nowhere.example", True),
    ("2001:db8:2::5", "nowhere.example", False),
    ("198.51.100.1", "example.org", True),
    ("198.51.100.1", "mail.example.org", True),       # subdomains
    ("198.51.100.1", "a.b.example.org", True),
    ("198.51.100.1", "evilexample.org", False),       # not a subdomain
    ("198.51.100.1", "example.org.evil.test", False),
    ("198.51.100.1", "org", False),
])
def test_listed(ip, domain, expected) -> None:
    assert listed(ENTRIES, ipaddress.ip_address(ip), domain) is expected


def test_listed_v4_mapped_not_confused() -> None:
    """An IPv6 network never matches an IPv4 address and vice versa."""
    entries = (ipaddress.ip_network("::/0"),)
    assert not listed(entries, ipaddress.ip_address("192.0.2.1"), "x.example")
    entries = (ipaddress.ip_network("0.0.0.0/0"),)
    assert not listed(entries, ipaddress.ip_address("2001:db8::1"), "x.example")


# -- DNSBL names ------------------------------------------------------------------------


def test_dnsbl_name_v4() -> None:
    """RFC 5782 2.1: octets reversed under the zone."""
    assert dnsbl_name(ipaddress.ip_address("192.0.2.99"), "bl.example") == "99.2.0.192.bl.example"


def test_dnsbl_name_v6() -> None:
    """RFC 5782 2.4: 32 nibbles reversed, dot-separated."""
    name = dnsbl_name(ipaddress.ip_address("2001:db8:1:2:3:4:567:89ab"), "bl.example")
    assert name == "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example"


def test_dnsbl_name_v6_compressed() -> None:
    name = dnsbl_name(ipaddress.ip_address("2001:db8::1"), "bl.example")
    assert name == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.example"
    assert len(name.split(".")) == 32 + 2


# -- the checker ------------------------------------------------------------------------


class SPFStub:
    """The checker's spf_check: answers with a fixed result."""

    def __init__(self, result: SPFResult) -> None:
        self.result = result
        self.calls: list[tuple] = []

    def __call__(self, resolver, *args):
        self.calls.append(args[0:3])
        return defer.succeed((self.result, ""))


def _check(checker, peer="198.51.100.7", domain="sender.example", sender="a@sender.example"):
    found = []
    checker.check(peer, domain, "mx.sender.example", sender).addBoth(found.append)
    assert found
    return found[0]


def _checker(spf=SPFResult.PASS, resolver=None, plugins=(), **config):
    stub = SPFStub(spf)
    checker = TrustChecker(TrustConfig(**config), resolver or FakeResolver(), Clock(), 5.0,
                           plugins=plugins, spf_check=stub)
    return checker, stub


def test_checker_provides_interface() -> None:
    checker, _ = _checker()
    assert verifyObject(ITrustPolicy, checker)
    assert verifyObject(ITrustPolicy, FakeTrust())


def test_spf_pass_trusted() -> None:
    checker, stub = _checker(SPFResult.PASS)
    assert _check(checker) is None
    assert stub.calls == [("198.51.100.7", "sender.example", "a@sender.example")]


def test_spf_fail_refused() -> None:
    checker, _ = _checker(SPFResult.FAIL)
    assert _code(_check(checker)) == (550, "5.7.23")


def test_spf_refusal_reused_for_a_burst(logged_events) -> None:
    """A flood of notifications from an SPF-failing sender: one evaluation, one log line."""
    checker, stub = _checker(SPFResult.FAIL)
    for _ in range(50):
        assert _code(_check(checker)) == (550, "5.7.23")
    assert len(stub.calls) == 1
    assert [e["result"] for e in logged_events if e.get("event") == "spf"] == ["fail"]
    checker.clock.advance(REFUSAL_REUSE - 0.1)
    assert _code(_check(checker)) == (550, "5.7.23")
    assert len(stub.calls) == 1
    checker.clock.advance(0.2)
    assert _code(_check(checker)) == (550, "5.7.23")
    assert len(stub.calls) == 2


@pytest.mark.parametrize("result", [SPFResult.FAIL, SPFResult.PASS])
def test_spf_reuse_is_per_peer_and_sender(result) -> None:
    """A refusal (REFUSAL_REUSE) and a pass (TRUST_REUSE) alike."""
    checker, stub = _checker(result)
    _check(checker)
    _check(checker, peer="198.51.100.8")
    _check(checker, sender="b@sender.example")
    _check(checker)
    assert len(stub.calls) == 3


def test_spf_trust_reused_for_a_second(logged_events) -> None:
    """
    Issue 17: a pass is reused for TRUST_REUSE (a stream of notifications
    from one origin: one evaluation, one log line a second); after that a
    tightened record bites.
    """
    checker, stub = _checker(SPFResult.PASS)
    assert _check(checker) is None
    stub.result = SPFResult.FAIL
    for _ in range(20):
        assert _check(checker) is None
    checker.clock.advance(TRUST_REUSE - 0.1)
    assert _check(checker) is None
    assert len(stub.calls) == 1
    assert [e["result"] for e in logged_events if e.get("event") == "spf"] == ["pass"]
    checker.clock.advance(0.2)
    assert _code(_check(checker)) == (550, "5.7.23")
    assert len(stub.calls) == 2


def test_spf_reuse_judged_by_the_accepted_results() -> None:
    """A softfail refused for one caller is accepted where softfail is (the same result)."""
    checker, stub = _checker(SPFResult.SOFTFAIL)
    assert _check(checker) is not None
    checker.config = TrustConfig(spf_accept=("pass", "softfail"))
    assert _check(checker) is None
    checker.clock.advance(TRUST_REUSE + 0.1)
    assert _check(checker) is None
    assert len(stub.calls) == 2


def test_spf_accept_configurable() -> None:
    checker, _ = _checker(SPFResult.SOFTFAIL, spf_accept=("pass", "softfail"))
    assert _check(checker) is None


def test_allow_list_first() -> None:
    """Allow list: accepted without DNSBL or SPF."""
    resolver = FakeResolver(addresses={"7.100.51.198.bl.example": ["127.0.0.2"]})
    checker, stub = _checker(SPFResult.FAIL, resolver=resolver,
                             allow=(ipaddress.ip_network("198.51.100.0/24"),),
                             deny=("sender.example",), dnsbl=("bl.example",))
    assert _check(checker) is None
    assert stub.calls == []
    assert resolver.queries == []


def test_allow_list_domain() -> None:
    checker, stub = _checker(SPFResult.FAIL, allow=("sender.example",))
    assert _check(checker, domain="Mail.Sender.Example") is None


def test_deny_list() -> None:
    checker, stub = _checker(SPFResult.PASS, deny=("sender.example",))
    assert _code(_check(checker, domain="sub.sender.example")) == (550, "5.7.1")
    checker, stub = _checker(SPFResult.PASS, deny=(ipaddress.ip_network("198.51.100.7/32"),))
    assert _code(_check(checker)) == (550, "5.7.1")
    assert stub.calls == []


def test_dnsbl_listed() -> None:
    """RFC 5782: an A record in 127.0.0.0/8 under the zone lists the address."""
    resolver = FakeResolver(addresses={"7.100.51.198.bl.example": ["127.0.0.2"]})
    checker, stub = _checker(SPFResult.PASS, resolver=resolver,
                             dnsbl=("clean.example", "bl.example"))
    assert _code(_check(checker)) == (550, "5.7.1")
    assert stub.calls == []


def test_dnsbl_not_listed() -> None:
    resolver = FakeResolver(addresses={"8.100.51.198.bl.example": ["127.0.0.2"]},
                            temporary={"7.100.51.198.down.example"})
    checker, stub = _checker(SPFResult.PASS, resolver=resolver,
                             dnsbl=("bl.example", "down.example"))
    assert _check(checker) is None


def test_dnsbl_odd_answer_not_a_listing() -> None:
    """RFC 5782 2.3: answers outside 127.0.0.0/8 are not listings."""
    resolver = FakeResolver(addresses={"7.100.51.198.bl.example": ["192.0.2.1"]})
    checker, _ = _checker(SPFResult.PASS, resolver=resolver, dnsbl=("bl.example",))
    assert _check(checker) is None


def test_null_sender_uses_domain() -> None:
    """The null sender (and the bare form) are checked against the EHLO domain given."""
    checker, stub = _checker(SPFResult.PASS)
    assert _check(checker, domain="mx.sender.example", sender=None) is None
    assert stub.calls == [("198.51.100.7", "mx.sender.example", "")]


@implementer(ITrustPolicy)
class Veto:
    name = "veto"

    def __init__(self) -> None:
        self.calls = 0

    def check(self, peer, domain, helo, sender):
        self.calls += 1
        return defer.succeed(replies.S550_POLICY.with_text("vetoed"))


def test_plugins_veto_after_spf() -> None:
    """SPEC 6: trust-policy plugins may veto, after the built-in checks pass."""
    veto = Veto()
    checker, _ = _checker(SPFResult.PASS, plugins=(veto,))
    assert _check(checker).text == "vetoed"
    checker, _ = _checker(SPFResult.FAIL, plugins=(veto,))
    assert _code(_check(checker)) == (550, "5.7.23")
    assert veto.calls == 1


def test_spf_over_the_resolver() -> None:
    """
    The real SPF check: a known origin's records come from the cache, a new
    one's from the network (on the reactor, no thread), once.
    """
    dnspython = make_dnspython_resolver([("192.0.2.1", 53)], 0.1)
    cache_dns_answer(dnspython, "cached.example", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"')
    network = FakeNameserver({("new.example", "TXT"): ['"v=spf1 ip4:192.0.2.0/24 -all"']})
    clock = Clock()
    checker = TrustChecker(TrustConfig(), Resolver(dnspython, clock, query=network), clock, 5.0)
    assert _check(checker, domain="cached.example", sender="a@cached.example") is None
    assert _code(_check(checker, peer="192.0.2.9", domain="cached.example",
                        sender="a@cached.example")) == (550, "5.7.23")
    assert ("cached.example", "TXT") not in network.asked
    assert _code(_check(checker, domain="new.example", sender="a@new.example")) == (550, "5.7.23")
    assert _check(checker, peer="192.0.2.9", domain="new.example", sender="a@new.example") is None
    assert network.asked.count(("new.example", "TXT")) == 1


def test_spf_pass_for_everyone_not_trusted() -> None:
    """Issue 18: "+all" makes a pass that proves nothing: neutral, refused by default."""
    dnspython = make_dnspython_resolver([("192.0.2.1", 53)], 0.1)
    network = FakeNameserver({("evil.example", "TXT"): ['"v=spf1 +all"']})
    clock = Clock()
    checker = TrustChecker(TrustConfig(), Resolver(dnspython, clock, query=network), clock, 5.0)
    verdict = _check(checker, domain="evil.example", sender="x@evil.example")
    assert _code(verdict) == (550, "5.7.1")
    assert "neutral" in verdict.text
    assert result_of(checker.spf_passes("198.51.100.7", "x@evil.example")) is False


def test_null_mx_sender_refused() -> None:
    """RFC 7505 4.2: a sender domain with a null MX gets 550 5.7.27 (after SPF)."""
    resolver = FakeResolver(mx={"nomail.example": [(0, "")]})
    checker, stub = _checker(SPFResult.PASS, resolver=resolver)
    assert _code(_check(checker, domain="nomail.example", sender="a@nomail.example")) == (
        550, "5.7.27")
    checker, stub = _checker(SPFResult.FAIL, resolver=resolver)
    assert _code(_check(checker, domain="nomail.example", sender="a@nomail.example")) == (
        550, "5.7.23")
    checker, stub = _checker(SPFResult.PASS, resolver=resolver)
    # The bare form and the null sender name no sender domain: not refused for it.
    assert _check(checker, domain="nomail.example", sender=None) is None
    # DNS trouble is not a null MX.
    checker, _ = _checker(SPFResult.PASS, resolver=FakeResolver(temporary={"sender.example"}))
    assert _check(checker) is None


@pytest.mark.parametrize("peer, allow, expected", [
    ("127.0.0.2", (), None),                                    # the host itself
    ("198.51.100.7", (), (550, "5.7.1")),                       # a stranger
    ("198.51.100.7", (ipaddress.ip_network("198.51.100.0/24"),), None),
])
def test_own_literal_sender_guard(peer, allow, expected) -> None:
    """Issue 18: someone@[our address] from outside is a forgery, like our domain."""
    checker, stub = _checker(SPFResult.PASS, allow=allow)
    session = Session(peer, "smtp", helo="client.example")
    envelope = Envelope("someone@[127.0.0.2]", (), None, None, {})
    assert _code(result_of(checker.check_own_domain(session, envelope))) == expected
    assert stub.calls == []


def test_real_spf_over_the_fake_resolver() -> None:
    """FakeResolver answers the real SPF check too (cached()/lookup() as records)."""
    resolver = FakeResolver(
        mx={"s.example": [(10, "mx.s.example")]},
        addresses={"mx.s.example": ["198.51.100.7", "2001:db8::7"]},
        txt={"s.example": ["v=spf1 mx -all"], "all.example": ["v=spf1 +all"]},
    )
    checker = TrustChecker(TrustConfig(), resolver, Clock(), 5.0)
    assert _check(checker, domain="s.example", sender="a@s.example") is None
    assert _code(_check(checker, peer="192.0.2.1", domain="s.example",
                        sender="a@s.example")) == (550, "5.7.23")
    assert _check(checker, peer="2001:db8::7", domain="s.example", sender="a@s.example") is None
    assert "neutral" in _check(checker, domain="all.example", sender="a@all.example").text
