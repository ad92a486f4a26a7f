"""
Tests for L{pullmail.net.dns}: answers in the resolver's cache are given at
once; anything else is asked on the reactor (the injected C{query}), once
however many wait for it, and a failure is remembered for a while; and
L{cached_answer}, the cache-only lookup behind it.  Then SPF over it
(L{pullmail.trust.spf}): passes over what is known, fetching what is
missing, and a record that authorises everyone taken as "neutral".
"""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rrset
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail.net.dns import (
    FAILED_LOOKUP_TTL,
    DNSPermanentError,
    DNSTemporaryError,
    NotCached,
    Resolver,
    cached_answer,
    make_dnspython_resolver,
)
from pullmail.testing import FakeNameserver, assert_no_result, failure_of, result_of
from pullmail.testing import cache_dns_answer as cache
from pullmail.testing import cache_dns_nxdomain as cache_nxdomain
from pullmail.trust.spf import SPFResult, check_host, check_host_async


@pytest.fixture
def dnspython():
    # An address nothing answers on: a lookup that went out would time out.
    return make_dnspython_resolver([("192.0.2.1", 53)], 0.1)


def test_cached_answer_records(dnspython) -> None:
    cache(dnspython, "mx.example", "A", "192.0.2.7", "192.0.2.8")
    assert sorted(r.to_text() for r in cached_answer(dnspython, "mx.example", "A")) == [
        "192.0.2.7", "192.0.2.8"]
    assert cached_answer(dnspython, "MX.Example.", "A")        # names compare as DNS does


def test_cached_answer_no_answer_and_nxdomain(dnspython) -> None:
    cache(dnspython, "mx.example", "AAAA")
    assert cached_answer(dnspython, "mx.example", "AAAA") == []
    cache_nxdomain(dnspython, "gone.example")
    with pytest.raises(DNSPermanentError):
        cached_answer(dnspython, "gone.example", "MX")


def test_cached_answer_not_cached(dnspython) -> None:
    cache(dnspython, "mx.example", "A", "192.0.2.7")
    with pytest.raises(NotCached):
        cached_answer(dnspython, "mx.example", "MX")
    with pytest.raises(NotCached):
        cached_answer(dnspython, "other.example", "A")
    with pytest.raises(NotCached):
        cached_answer(None, "mx.example", "A")                 # no resolver, no cache


def _resolver(dnspython, zone=None, silent=()):
    clock = Clock()
    network = FakeNameserver(zone or {}, silent)
    return Resolver(dnspython, clock, query=network), network, clock


def test_resolver_answers_from_the_cache_without_asking(dnspython) -> None:
    """A cached question never goes to the network."""
    resolver, network, _ = _resolver(dnspython)
    cache(dnspython, "r.example", "MX", "10 mx.r.example.")
    cache(dnspython, "mx.r.example", "A", "192.0.2.7")
    cache(dnspython, "mx.r.example", "AAAA")
    assert result_of(resolver.mx("r.example")) == [(10, "mx.r.example")]
    assert result_of(resolver.addresses("mx.r.example")) == ["192.0.2.7"]
    cache_nxdomain(dnspython, "gone.example")
    failure_of(resolver.mx("gone.example"), DNSPermanentError)
    assert network.asked == []


def test_resolver_asks_once_and_caches(dnspython) -> None:
    """An answer from the network is cached; NXDOMAIN too."""
    resolver, network, _ = _resolver(dnspython, {("mx.r.example", "A"): ["192.0.2.7"]})
    assert result_of(resolver.addresses("mx.r.example")) == ["192.0.2.7"]
    assert result_of(resolver.addresses("mx.r.example")) == ["192.0.2.7"]
    assert network.asked == [("mx.r.example", "A"), ("mx.r.example", "AAAA")]
    failure_of(resolver.mx("gone.example"), DNSPermanentError)
    failure_of(resolver.mx("gone.example"), DNSPermanentError)
    assert network.asked[-1] == ("gone.example", "MX") and len(network.asked) == 3


def test_one_question_in_flight_shared(dnspython) -> None:
    """Everyone asking a name that is being looked up waits for the same answer."""
    resolver, network, _ = _resolver(dnspython, silent=["slow.example"])
    waiting = [resolver.txt("slow.example") for _ in range(100)]
    assert network.asked == [("slow.example", "TXT")]
    for d in waiting:
        assert_no_result(d)
    network.waiting[0].errback(defer.TimeoutError("no answer"))
    for d in waiting:
        failure_of(d, DNSTemporaryError)


def test_silent_name_delays_no_one_else(dnspython) -> None:
    """Issue 18: a name that never answers holds no thread and no other lookup."""
    resolver, network, _ = _resolver(dnspython, {("fast.example", "TXT"): ['"hello"']},
                                     silent=[f"evil{n}.example" for n in range(100)])
    stuck = [resolver.txt(f"evil{n}.example") for n in range(100)]
    assert result_of(resolver.txt("fast.example")) == ["hello"]
    assert_no_result(stuck[0])


def test_failures_remembered_for_a_while(dnspython) -> None:
    """A timeout or SERVFAIL is remembered for FAILED_LOOKUP_TTL, then asked again."""
    resolver, network, clock = _resolver(dnspython, silent=["slow.example"])
    d = resolver.txt("slow.example")
    network.waiting[0].errback(defer.TimeoutError("no answer"))
    failure_of(d, DNSTemporaryError)
    with pytest.raises(DNSTemporaryError):
        resolver.cached("slow.example", "TXT")
    failure_of(resolver.txt("slow.example"), DNSTemporaryError)
    assert len(network.asked) == 1
    clock.advance(FAILED_LOOKUP_TTL)
    assert_no_result(resolver.txt("slow.example"))
    assert len(network.asked) == 2


def _lookup_from(dnspython):
    return lambda name, rdtype: cached_answer(dnspython, name, rdtype)


def test_spf_check_one_pass(dnspython) -> None:
    """
    One pass gives the verdict when every record is known, and stops with
    NotCached at the first that is not.
    """
    arguments = ("s.example", "a@s.example", "mx.s.example", 5.0)
    lookup = _lookup_from(dnspython)
    cache(dnspython, "s.example", "TXT", '"v=spf1 a:mx.s.example -all"')
    with pytest.raises(NotCached) as missing:
        check_host(lookup, "192.0.2.7", *arguments)
    assert (missing.value.name, missing.value.rdtype) == ("mx.s.example", "A")
    cache(dnspython, "mx.s.example", "A", "192.0.2.7")
    cache(dnspython, "mx.s.example", "AAAA")
    assert check_host(lookup, "192.0.2.7", *arguments)[0] == SPFResult.PASS
    assert check_host(lookup, "192.0.2.9", *arguments)[0] == SPFResult.FAIL


def _spf(dnspython, record, ip="192.0.2.7", silent=()):
    zone = {("s.example", "TXT"): [record], ("mx.s.example", "A"): ["192.0.2.7"],
            ("mx.s.example", "AAAA"): ["2001:db8::7"]}
    resolver, network, clock = _resolver(dnspython, zone, silent)
    d = defer.Deferred.fromCoroutine(check_host_async(
        resolver, ip, "s.example", "a@s.example", "mx.s.example", 5.0, clock))
    return d, network


@pytest.mark.parametrize("record, ip, expected", [
    ('"v=spf1 a:mx.s.example -all"', "192.0.2.7", SPFResult.PASS),
    ('"v=spf1 a:mx.s.example -all"', "192.0.2.9", SPFResult.FAIL),
    ('"v=spf1 mx:s.example -all"', "192.0.2.7", SPFResult.FAIL),     # s.example has no MX
    ('"v=spf1 a:mx.s.example -all"', "2001:db8::7", SPFResult.PASS),
    # Issue 18: a record that passes every address proves nothing.
    ('"v=spf1 +all"', "192.0.2.7", SPFResult.NEUTRAL),
    ('"v=spf1 all"', "2001:db8::7", SPFResult.NEUTRAL),
    ('"v=spf1 ip4:0.0.0.0/0 -all"', "192.0.2.7", SPFResult.NEUTRAL),
    ('"v=spf1 ip4:0.0.0.0/1 ip4:128.0.0.0/1 -all"', "192.0.2.7", SPFResult.NEUTRAL),
    ('"v=spf1 a:mx.s.example/0 -all"', "192.0.2.7", SPFResult.NEUTRAL),
    ('"v=spf1 ip6:::/0 -all"', "2001:db8::7", SPFResult.NEUTRAL),
    # ... but only for the family it covers.
    ('"v=spf1 ip4:0.0.0.0/0 a:mx.s.example -all"', "2001:db8::7", SPFResult.PASS),
    ('"v=spf1 ?all"', "192.0.2.7", SPFResult.NEUTRAL),
    ('"v=spf1 ip4:192.0.2.0/24 -all"', "192.0.2.7", SPFResult.PASS),
])
def test_spf_check_async(dnspython, record, ip, expected) -> None:
    d, _ = _spf(dnspython, record, ip)
    assert result_of(d)[0] is expected


def test_spf_check_waits_only_for_its_own_names(dnspython) -> None:
    """A check whose record never arrives waits; its timeout makes it temperror."""
    d, network = _spf(dnspython, '"v=spf1 include:evil.example -all"', silent=["evil.example"])
    assert_no_result(d)
    network.waiting[0].errback(defer.TimeoutError("no answer"))
    assert result_of(d)[0] is SPFResult.TEMPERROR


# -- TXT answers with their TTL (what the DKIM key records are kept for) -----------


def _negative(rcode, soa: str | None):
    """A query function answering every question with C{rcode}, with an SOA or none."""
    def query(qname, rdtype):
        response = dns.message.make_response(dns.message.make_query(qname, rdtype))
        response.set_rcode(rcode)
        if soa is not None:
            response.authority.append(dns.rrset.from_text("example.", 900, "IN", "SOA", soa))
        return defer.succeed(dns.message.from_wire(response.to_wire()))
    return query


def test_txt_answer_carries_the_records_ttl(dnspython) -> None:
    resolver, network, _ = _resolver(dnspython, {("k._domainkey.example", "TXT"): ['"v=DKIM1"']})
    answer = result_of(resolver.txt_answer("k._domainkey.example"))
    assert answer.records == ["v=DKIM1"] and answer.ttl == pytest.approx(300, abs=1)
    again = result_of(resolver.txt_answer("k._domainkey.example"))     # from the cache
    assert again.ttl <= answer.ttl and len(network.asked) == 1


@pytest.mark.parametrize("soa, ttl", [
    ("ns.example. host.example. 1 7200 900 1209600 120", 120),     # MINIMUM the lesser
    ("ns.example. host.example. 1 7200 900 1209600 3600", 900),    # the SOA's own TTL
])
def test_nxdomain_is_kept_for_the_rfc2308_negative_ttl(dnspython, soa, ttl) -> None:
    resolver = Resolver(dnspython, Clock(), _negative(dns.rcode.NXDOMAIN, soa))
    error = failure_of(resolver.txt_answer("gone.example"), DNSPermanentError).value
    assert error.ttl == pytest.approx(ttl, abs=1)
    cached = failure_of(resolver.txt_answer("gone.example"), DNSPermanentError).value
    assert 0 < cached.ttl <= error.ttl


def test_no_answer_without_an_soa_is_not_to_be_kept(dnspython) -> None:
    """RFC 2308 5: a negative answer without an SOA SHOULD NOT be cached."""
    resolver = Resolver(dnspython, Clock(), _negative(dns.rcode.NXDOMAIN, None))
    assert failure_of(resolver.txt_answer("gone.example"), DNSPermanentError).value.ttl == 0
    resolver = Resolver(dnspython, Clock(), _negative(dns.rcode.NOERROR, None))
    assert result_of(resolver.txt_answer("empty.example")).ttl == 0


def test_no_answer_with_an_soa_has_its_negative_ttl(dnspython) -> None:
    resolver = Resolver(dnspython, Clock(),
                        _negative(dns.rcode.NOERROR, "ns.example. h.example. 1 2 3 4 60"))
    answer = result_of(resolver.txt_answer("empty.example"))
    assert answer.records == [] and answer.ttl == pytest.approx(60, abs=1)


def test_ttl_of_cached_answers(dnspython) -> None:
    """How long a cached answer lives on: records, a no-answer, an NXDOMAIN; else None."""
    resolver, network, clock = _resolver(dnspython, silent=["slow.example"])
    cache(dnspython, "_dmarc.example.org", "TXT", '"v=DMARC1; p=none"')     # TTL 300
    assert 299 < resolver.ttl("_dmarc.example.org") <= 300
    cache(dnspython, "nodata.example", "TXT")
    assert resolver.ttl("nodata.example") is not None
    cache_nxdomain(dnspython, "_dmarc.gone.example")
    assert resolver.ttl("_dmarc.gone.example") is not None
    assert resolver.ttl("never.example") is None
    d = resolver.txt("slow.example")
    network.waiting[0].errback(defer.TimeoutError("no answer"))
    failure_of(d, DNSTemporaryError)
    assert resolver.ttl("slow.example") is None
    assert network.asked == [("slow.example", "TXT")]      # ttl() never asks
