"""
Tests for L{pullmail.net.dns}: answers already in the resolver's cache are given
in the calling thread (no hop to the DNS pool), anything else goes to the
pool; and L{cached_answer}, the cache-only lookup behind both that and the
cache-only SPF check.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer

from pullmail.net.dns import (
    DNSPermanentError,
    NotCached,
    Resolver,
    cached_answer,
    make_dnspython_resolver,
)
from pullmail.testing import cache_dns_answer as cache
from pullmail.testing import cache_dns_nxdomain as cache_nxdomain
from pullmail.trust.spf import SPFResult, check_host


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


def _result(d: defer.Deferred):
    found = []
    d.addBoth(found.append)
    assert found, "the lookup did not finish at once"
    return found[0]


def test_resolver_answers_from_the_cache_without_the_pool(dnspython, monkeypatch) -> None:
    """A cached question never leaves the reactor thread."""
    hops = []
    monkeypatch.setattr("pullmail.net.dns.deferToThreadPool",
                        lambda *a, **k: hops.append(a) or defer.Deferred())
    resolver = Resolver(dnspython, reactor=None, pool=None)
    cache(dnspython, "r.example", "MX", "10 mx.r.example.")
    cache(dnspython, "mx.r.example", "A", "192.0.2.7")
    cache(dnspython, "mx.r.example", "AAAA")
    assert _result(resolver.mx("r.example")) == [(10, "mx.r.example")]
    assert _result(resolver.addresses("mx.r.example")) == ["192.0.2.7"]
    assert hops == []
    cache_nxdomain(dnspython, "gone.example")
    assert isinstance(_result(resolver.mx("gone.example")).value, DNSPermanentError)
    assert hops == []
    resolver.mx("uncached.example")                            # goes to the pool
    assert len(hops) == 1


def test_spf_check_cache_only(dnspython) -> None:
    """
    The cache-only SPF check gives the same verdicts as the full one when
    every record is cached, and stops with NotCached at the first that is not.
    """
    arguments = ("s.example", "a@s.example", "mx.s.example", 5.0)
    cache(dnspython, "s.example", "TXT", '"v=spf1 a:mx.s.example -all"')
    with pytest.raises(NotCached):
        check_host(dnspython, "192.0.2.7", *arguments, cache_only=True)
    cache(dnspython, "mx.s.example", "A", "192.0.2.7")
    cache(dnspython, "mx.s.example", "AAAA")
    assert check_host(dnspython, "192.0.2.7", *arguments, cache_only=True)[0] == SPFResult.PASS
    assert check_host(dnspython, "192.0.2.9", *arguments, cache_only=True)[0] == SPFResult.FAIL


def test_spf_check_cache_only_without_resolver() -> None:
    """No resolver of our own: never pyspf's system lookup in the calling thread."""
    with pytest.raises(NotCached):
        check_host(None, "192.0.2.7", "s.example", "a@s.example", "mx.s.example", 5.0,
                   cache_only=True)
