"""
Tests for MTA-STS discovery, cache and fetch checks
(L{pullmail.outbound.sts}): RFC 8461 3.3 and 5.1 on a L{Clock}, a
L{FakeResolver} and a scripted fetch.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from pullmail.outbound.sts import MTASTS
from pullmail.outbound.sts.cache import CachedPolicy, PolicyCache
from pullmail.outbound.sts.discovery import FETCH_HOLDOFF, REFRESH_INTERVAL
from pullmail.outbound.sts.fetch import (
    FetchError,
    _CappedBody,
    check_response,
    policy_url,
)
from pullmail.outbound.sts.policy import MAX_POLICY_SIZE, Mode, Policy
from pullmail.testing import (
    FakeResolver,
    assert_no_result,
    failure_of,
    result_of,
    run_blocking,
)

DOMAIN = "receiver.example"
TXT_NAME = f"_mta-sts.{DOMAIN}"
BODY = b"version: STSv1\nmode: enforce\nmx: mx.receiver.example\nmax_age: 3600\n"
ENFORCE = Policy(Mode.ENFORCE, 3600, ("mx.receiver.example",), "one")


class ScriptedFetch:
    """C{fetch(domain)}: each call answers with the next of C{answers}."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []
        self.pending: list[defer.Deferred] = []

    def __call__(self, domain: str) -> defer.Deferred:
        self.asked.append(domain)
        answer = self.answers.pop(0)
        if answer is None:   # never answers by itself
            d = defer.Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(1_000_000)
    return clock


@pytest.fixture
def resolver():
    return FakeResolver(txt={TXT_NAME: ["v=STSv1; id=one"]})


def make_sts(tmp_path, clock, resolver, fetch) -> MTASTS:
    sts = MTASTS(resolver=resolver, fetch=fetch, clock=clock, trust=None,
                 cache=PolicyCache(tmp_path / "mta-sts", run_blocking))
    sts.start()
    return sts


def test_no_txt_record_no_policy(tmp_path, clock):
    fetch = ScriptedFetch()
    sts = make_sts(tmp_path, clock, FakeResolver(), fetch)
    assert result_of(sts.policy_for(DOMAIN)) is None
    assert fetch.asked == []


def test_fetched_policy_is_cached_on_disk(tmp_path, clock, resolver, logged_events):
    fetch = ScriptedFetch(BODY)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    assert result_of(sts.policy_for("Receiver.Example.")) == ENFORCE
    assert fetch.asked == [DOMAIN]
    stored = json.loads((tmp_path / "mta-sts" / f"{DOMAIN}.json").read_text())
    assert stored["mode"] == "enforce" and stored["id"] == "one"
    assert stored["fetched"] == clock.seconds() and stored["version"] == 1
    assert [e["event"] for e in logged_events if e.get("event", "").startswith("mta-sts")] == [
        "mta-sts-policy"]
    # A restart: the policy comes from the cache, no fetch.
    again = ScriptedFetch()
    restarted = make_sts(tmp_path, clock, resolver, again)
    clock.advance(3599)
    assert result_of(restarted.policy_for(DOMAIN)) == ENFORCE
    assert again.asked == []


def test_same_id_no_fetch_until_max_age(tmp_path, clock, resolver):
    fetch = ScriptedFetch(BODY, BODY)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    result_of(sts.policy_for(DOMAIN))
    clock.advance(3599)
    assert result_of(sts.policy_for(DOMAIN)) == ENFORCE
    assert len(fetch.asked) == 1
    clock.advance(1)   # max_age over: fetched again
    assert result_of(sts.policy_for(DOMAIN)) == ENFORCE
    assert len(fetch.asked) == 2


def test_new_id_refetches(tmp_path, clock, resolver):
    testing = BODY.replace(b"enforce", b"testing")
    fetch = ScriptedFetch(BODY, testing)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    result_of(sts.policy_for(DOMAIN))
    resolver.texts[TXT_NAME] = ["v=STSv1; id=two"]
    policy = result_of(sts.policy_for(DOMAIN))
    assert (policy.mode, policy.id) == (Mode.TESTING, "two")
    assert sts.cache.get(DOMAIN).id == "two"


@pytest.mark.parametrize("failure", [
    FetchError("HTTP 302: a redirect"),
    b"<html>garbled</html>",
    b"version: STSv1\nmode: enforce\nmx: x.example\nmax_age: 5\n" + b"x: y\n" * 20000,
])
def test_failed_refresh_keeps_cached_policy(tmp_path, clock, resolver, failure, logged_events):
    """RFC 8461 5.1: a refresh that fails leaves the unexpired cached policy in force."""
    fetch = ScriptedFetch(BODY, failure)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    result_of(sts.policy_for(DOMAIN))
    resolver.texts[TXT_NAME] = ["v=STSv1; id=two"]
    assert result_of(sts.policy_for(DOMAIN)) == ENFORCE
    failed = [e for e in logged_events if e.get("event") == "mta-sts-fetch-failed"]
    assert failed and failed[0]["fallback"] == "keeping the cached one"


@pytest.mark.parametrize("failure", [
    FetchError("Content-Type 'text/html' is not text/plain"),
    b"version: STSv1\nmode: sometimes\nmx: x.example\nmax_age: 5\n",
    b"a" * (MAX_POLICY_SIZE + 1),
])
def test_bad_policy_without_cache_is_no_policy(tmp_path, clock, resolver, failure):
    sts = make_sts(tmp_path, clock, resolver, ScriptedFetch(failure))
    assert result_of(sts.policy_for(DOMAIN)) is None
    assert sts.cache.get(DOMAIN) is None
    assert not (tmp_path / "mta-sts" / f"{DOMAIN}.json").exists()


def test_failed_fetch_not_repeated_for_a_while(tmp_path, clock, resolver):
    """A broken policy host is asked again after FETCH_HOLDOFF, or at once for a new id."""
    fetch = ScriptedFetch(FetchError("refused"), FetchError("refused"), BODY)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    assert result_of(sts.policy_for(DOMAIN)) is None
    clock.advance(FETCH_HOLDOFF - 1)
    assert result_of(sts.policy_for(DOMAIN)) is None
    assert len(fetch.asked) == 1
    clock.advance(1)
    assert result_of(sts.policy_for(DOMAIN)) is None
    assert len(fetch.asked) == 2
    resolver.texts[TXT_NAME] = ["v=STSv1; id=two"]
    assert result_of(sts.policy_for(DOMAIN)).id == "two"
    assert len(fetch.asked) == 3


@pytest.mark.parametrize("change", ["temporary", "permanent", "removed", "garbled"])
def test_txt_unusable_keeps_cached_policy(tmp_path, clock, resolver, change):
    """An attacker who blocks or strips the TXT record does not lift the policy."""
    fetch = ScriptedFetch(BODY)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    result_of(sts.policy_for(DOMAIN))
    if change == "temporary":
        resolver.temporary.add(TXT_NAME)
    elif change == "permanent":
        resolver.permanent.add(TXT_NAME)
    elif change == "removed":
        del resolver.texts[TXT_NAME]
    else:
        resolver.texts[TXT_NAME] = ["v=STSv1; id=not valid"]
    assert result_of(sts.policy_for(DOMAIN)) == ENFORCE
    clock.advance(3600)
    assert result_of(sts.policy_for(DOMAIN)) is None   # expired: gone
    assert len(fetch.asked) == 1


def test_concurrent_lookups_share_one_fetch(tmp_path, clock, resolver):
    fetch = ScriptedFetch(None)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    first, second = sts.policy_for(DOMAIN), sts.policy_for(DOMAIN)
    assert_no_result(first)
    assert_no_result(second)
    fetch.pending[0].callback(BODY)
    assert result_of(first) == result_of(second) == ENFORCE
    assert len(fetch.asked) == 1


def test_a_failing_lookup_falls_back_to_the_cache(tmp_path, clock, resolver, logged_events):
    """An unexpected error answers every waiter with the cached policy; nothing hangs."""
    sts = make_sts(tmp_path, clock, resolver, ScriptedFetch(BODY, BODY))
    result_of(sts.policy_for(DOMAIN))
    resolver.texts[TXT_NAME] = ["v=STSv1; id=two"]
    sts.cache.put = lambda cached: 1 / 0
    first, second = sts.policy_for(DOMAIN), sts.policy_for(DOMAIN)
    assert result_of(first) == result_of(second) == ENFORCE
    assert any(e.get("log_failure") for e in logged_events)
    assert sts._asking == {}


def test_damaged_cache_file_is_skipped(tmp_path, clock, resolver, logged_events):
    folder = tmp_path / "mta-sts"
    folder.mkdir()
    (folder / f"{DOMAIN}.json").write_text('{"version": 1, "mode": "sometimes"}')
    (folder / "other.example.json").write_text(json.dumps(
        {"version": 1, "domain": "else.example", "id": "x", "mode": "enforce",
         "max_age": 99, "mx": ["a.example"], "fetched": clock.seconds()}))
    sts = make_sts(tmp_path, clock, resolver, ScriptedFetch(BODY))
    assert sts.cache.get(DOMAIN) is None
    assert sts.cache.get("else.example") is None   # a file under another name
    assert any(e.get("event") == "mta-sts-cache-damaged" for e in logged_events)
    assert result_of(sts.policy_for(DOMAIN)) == ENFORCE


def test_cached_policy_freshness():
    cached = CachedPolicy.of(DOMAIN, ENFORCE, 100.0)
    assert cached.fresh(3699.9) and not cached.fresh(3700.0)
    assert cached.policy() == ENFORCE


# -- applying a policy ------------------------------------------------------------------


def test_refusal_and_report(tmp_path, clock, resolver, logged_events):
    sts = make_sts(tmp_path, clock, resolver, ScriptedFetch())
    assert sts.refusal(ENFORCE, DOMAIN, "mx.receiver.example") is None
    reason = sts.refusal(ENFORCE, DOMAIN, "evil.example")
    assert reason.startswith("MTA-STS enforce (receiver.example): MX evil.example is not in")
    testing = Policy(Mode.TESTING, 3600, ("mx.receiver.example",), "t")
    assert sts.refusal(testing, DOMAIN, "evil.example") is None
    assert [e["event"] for e in logged_events if e.get("event", "").startswith("mta-sts")] == [
        "mta-sts-refused", "mta-sts-report"]


def test_destined_hosts_narrowed_by_enforce(tmp_path, clock, resolver):
    """SPEC 11.2: under enforce only the listed MX hosts may RETR."""
    sts = make_sts(tmp_path, clock, resolver, ScriptedFetch(BODY))
    hosts = {"192.0.2.25": "mx.receiver.example", "192.0.2.66": "evil.example"}
    assert result_of(sts.destined(DOMAIN, hosts)) == {"192.0.2.25": "mx.receiver.example"}
    assert result_of(sts.destined("other.example", hosts)) == hosts   # no policy there


# -- the HTTPS response (RFC 8461 3.3) ----------------------------------------------------


@pytest.mark.parametrize("code, types, length", [
    (200, [b"text/plain"], 80),
    (200, [b"text/plain; charset=utf-8"], None),
    (200, [b"Text/Plain ;charset=US-ASCII"], MAX_POLICY_SIZE),
])
def test_response_accepted(code, types, length):
    check_response(code, types, length)


@pytest.mark.parametrize("code, types, length, why", [
    (301, [b"text/plain"], 0, "redirect"),
    (302, [b"text/html"], 0, "redirect"),
    (307, [b"text/plain"], 0, "redirect"),
    (404, [b"text/plain"], 0, "HTTP 404"),
    (200, [b"text/html"], 80, "not text/plain"),
    (200, [b"text/plain-ish"], 80, "not text/plain"),
    (200, [], 80, "none"),
    (200, [b"text/plain", b"text/html"], 80, "not text/plain"),
    (200, [b"text/plain"], MAX_POLICY_SIZE + 1, "over"),
])
def test_response_refused(code, types, length, why):
    with pytest.raises(FetchError, match=why):
        check_response(code, types, length)


def test_policy_url():
    assert policy_url("example.org", 443) == b"https://mta-sts.example.org/.well-known/mta-sts.txt"
    assert policy_url("example.org", 8443) == (
        b"https://mta-sts.example.org:8443/.well-known/mta-sts.txt")


class _Transport:
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


def _body(limit: int) -> tuple[_CappedBody, _Transport]:
    body, transport = _CappedBody(limit), _Transport()
    body.makeConnection(transport)
    return body, transport


def test_body_collected():
    body, _ = _body(10)
    body.dataReceived(b"12345")
    body.dataReceived(b"67890")
    body.connectionLost(Failure(ResponseDone()))
    assert result_of(body.finished) == b"1234567890"


def test_body_without_length_ends_with_the_connection():
    body, _ = _body(10)
    body.dataReceived(b"abc")
    body.connectionLost(Failure(PotentialDataLoss()))
    assert result_of(body.finished) == b"abc"


def test_body_over_the_cap_stops_reading():
    body, transport = _body(10)
    body.dataReceived(b"12345")
    body.dataReceived(b"678901")
    assert transport.stopped
    failure_of(body.finished, FetchError)
    body.connectionLost(Failure(ConnectionLost()))   # no second result


def test_body_cut_off():
    body, _ = _body(10)
    body.dataReceived(b"123")
    body.connectionLost(Failure(ConnectionLost()))
    assert "cut off" in str(failure_of(body.finished, FetchError).value)


# -- refresh and pruning (RFC 8461 5.1), U-label domains ---------------------------------

WEEK = 7 * 86400
LONG_BODY = BODY.replace(b"max_age: 3600", b"max_age: %d" % WEEK)


def test_daily_refresh_fetches_again_for_the_same_id(tmp_path, clock, resolver, logged_events):
    """No mail to the domain for a day: its policy is renewed anyway, max_age counts anew."""
    fetch = ScriptedFetch(LONG_BODY, LONG_BODY)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    start = clock.seconds()
    result_of(sts.policy_for(DOMAIN))
    clock.advance(REFRESH_INTERVAL - 1)
    assert len(fetch.asked) == 1
    clock.advance(1)
    assert fetch.asked == [DOMAIN, DOMAIN]
    assert sts.cache.get(DOMAIN).fetched == start + REFRESH_INTERVAL
    stored = json.loads((tmp_path / "mta-sts" / f"{DOMAIN}.json").read_text())
    assert stored["fetched"] == start + REFRESH_INTERVAL
    assert any(e.get("event") == "mta-sts-refresh" for e in logged_events)


def test_refresh_picks_up_a_new_id(tmp_path, clock, resolver):
    fetch = ScriptedFetch(LONG_BODY, LONG_BODY.replace(b"enforce", b"testing"))
    sts = make_sts(tmp_path, clock, resolver, fetch)
    result_of(sts.policy_for(DOMAIN))
    resolver.texts[TXT_NAME] = ["v=STSv1; id=two"]
    clock.advance(REFRESH_INTERVAL)
    cached = sts.cache.get(DOMAIN)
    assert (cached.id, cached.mode) == ("two", "testing")


def test_failed_refresh_keeps_the_policy_then_it_is_pruned(tmp_path, clock, resolver):
    """A refresh that fails changes nothing; past max_age the policy and its file go."""
    two_days = BODY.replace(b"max_age: 3600", b"max_age: %d" % (2 * 86400))
    fetch = ScriptedFetch(two_days, FetchError("refused"))
    sts = make_sts(tmp_path, clock, resolver, fetch)
    start = clock.seconds()
    result_of(sts.policy_for(DOMAIN))
    clock.advance(REFRESH_INTERVAL)
    assert len(fetch.asked) == 2
    assert sts.cache.get(DOMAIN).fetched == start
    del resolver.texts[TXT_NAME]            # the next round finds no record: no fetch
    clock.advance(REFRESH_INTERVAL)
    assert sts.cache.get(DOMAIN) is None
    assert not (tmp_path / "mta-sts" / f"{DOMAIN}.json").exists()
    assert len(fetch.asked) == 2


def test_expired_cache_files_are_removed_at_start(tmp_path, clock, resolver):
    folder = tmp_path / "mta-sts"
    folder.mkdir()
    for domain, fetched in [("old.example", clock.seconds() - 3600), (DOMAIN, clock.seconds())]:
        (folder / f"{domain}.json").write_text(json.dumps(
            {"version": 1, "domain": domain, "id": "x", "mode": "enforce", "max_age": 3600,
             "mx": ["a.example"], "fetched": fetched}))
    sts = make_sts(tmp_path, clock, resolver, ScriptedFetch())
    assert sts.cache.get("old.example") is None and sts.cache.get(DOMAIN) is not None
    assert sorted(p.name for p in folder.iterdir()) == [f"{DOMAIN}.json"]


def test_stopped_no_refresh(tmp_path, clock, resolver):
    fetch = ScriptedFetch(LONG_BODY)
    sts = make_sts(tmp_path, clock, resolver, fetch)
    result_of(sts.policy_for(DOMAIN))
    sts.stop()
    clock.advance(3 * REFRESH_INTERVAL)
    assert len(fetch.asked) == 1 and clock.getDelayedCalls() == []


def test_u_label_domain_is_looked_up_and_cached_as_its_a_label(tmp_path, clock):
    """RFC 8461 3: _mta-sts.<A-label> and https://mta-sts.<A-label>/ (IDNA 2008)."""
    a_label = "xn--bcher-kva.example"
    resolver = FakeResolver(txt={f"_mta-sts.{a_label}": ["v=STSv1; id=idn"]})
    fetch = ScriptedFetch(BODY.replace(b"mx.receiver.example", "mx.bücher.example".encode()))
    sts = make_sts(tmp_path, clock, resolver, fetch)
    policy = result_of(sts.policy_for("Bücher.example"))
    assert (policy.mode, policy.mx) == (Mode.ENFORCE, (f"mx.{a_label}",))
    assert fetch.asked == [a_label]
    assert (tmp_path / "mta-sts" / f"{a_label}.json").exists()
    assert result_of(sts.policy_for(a_label)) == policy     # one policy, either spelling
    assert policy_url(a_label, 443) == (
        b"https://mta-sts.xn--bcher-kva.example/.well-known/mta-sts.txt")
    assert sts.refusal(policy, a_label, f"mx.{a_label}") is None


def test_domain_without_an_a_label_has_no_policy(tmp_path, clock, resolver):
    fetch = ScriptedFetch()
    sts = make_sts(tmp_path, clock, resolver, fetch)
    assert result_of(sts.policy_for("a\u200db.example")) is None   # ZWJ: not IDNA 2008
    assert fetch.asked == []
