"""
MTA-STS wired into outbound delivery and the RETR destined-host check
(SPEC 11.2, RFC 8461 5): an L{MTASTS} with a scripted policy fetch, on the
in-memory world of L{test_delivery} and the pickup counter of
L{test_pickup}.
"""

from __future__ import annotations

import pytest
from test_delivery import BOB, MX1, MX2, World
from test_pickup import RecordingOutbound
from test_sts import ScriptedFetch
from twisted.internet.task import Clock

from pullmail.outbound.sts import MTASTS
from pullmail.outbound.sts.cache import PolicyCache
from pullmail.pull.serve import PickupCounter
from pullmail.pull.verbs import Retrieve
from pullmail.smtp import replies
from pullmail.smtp.envelope import Session
from pullmail.smtp.server import Reverse
from pullmail.storage.outbox import NOTIFIED, QUEUED
from pullmail.testing import FakeResolver, MemoryOutbox, make_entry, result_of, run_blocking
from pullmail.trust.throttle import FailureTracker

TXT = {"_mta-sts.receiver.example": ["v=STSv1; id=1"]}


def policy(mode: str, *mx: str) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return "\n".join(lines).encode() + b"\n"


def sts_world(tmp_path, body: bytes, **config) -> World:
    world = World(tmp_path, **config)
    world.resolver.texts.update(TXT)
    world.fetch = ScriptedFetch(body)
    world.outbound.mta_sts = MTASTS(
        resolver=world.resolver, fetch=world.fetch, clock=world.clock, trust=None,
        cache=PolicyCache(tmp_path / "mta-sts", run_blocking))
    world.outbound.mta_sts.start()
    return world


def test_enforce_skips_unlisted_mx_hosts(tmp_path, logged_events):
    """Neither MX is listed: no connection at all, the entry waits with the reason."""
    world = sts_world(tmp_path, policy("enforce", "other.receiver.example"))
    [entry] = world.send([BOB])
    assert world.network.attempts == []
    assert world.peer.notifications == [] and world.peer.deliveries == []
    stored = world.outbox.get(entry.id)
    assert stored.state == QUEUED
    assert "MTA-STS enforce (receiver.example): MX mx1.receiver.example is not in the " \
           "MTA-STS policy" in stored.last_error
    assert "mx2.receiver.example" in stored.last_error
    assert [e["event"] for e in logged_events if e.get("event") == "mta-sts-refused"] == [
        "mta-sts-refused"] * 2


def test_enforce_never_downgrades(tmp_path):
    """
    The listed MX does not offer STARTTLS: it gets neither notification nor
    message, and the unlisted one is not tried instead.
    """
    world = sts_world(tmp_path, policy("enforce", "mx1.receiver.example"))
    world.network.listen(MX2, 25, world.peer.factory)
    [entry] = world.send([BOB])
    assert world.network.attempts == [(MX1, 25)]
    assert world.peer.notifications == [] and world.peer.deliveries == []
    stored = world.outbox.get(entry.id)
    assert stored.state == QUEUED
    assert stored.last_error.startswith("mx1.receiver.example[192.0.2.25]: PolicyRefused: "
                                        "MTA-STS enforce (receiver.example): MX "
                                        "mx1.receiver.example: ")
    assert "STARTTLS" in stored.last_error


def test_testing_mode_delivers_and_reports(tmp_path, logged_events):
    world = sts_world(tmp_path, policy("testing", "other.receiver.example"))
    [entry] = world.send([BOB])
    [notify] = world.peer.notifications
    assert notify.gdel_id == entry.id
    assert world.outbox.get(entry.id).state == NOTIFIED
    reports = [e for e in logged_events if e.get("event") == "mta-sts-report"]
    assert reports and "mx1.receiver.example is not in" in reports[0]["reason"]


@pytest.mark.parametrize("body", [policy("none"), b"garbled"])
def test_mode_none_or_bad_policy_changes_nothing(tmp_path, body):
    world = sts_world(tmp_path, body)
    [entry] = world.send([BOB])
    assert [n.gdel_id for n in world.peer.notifications] == [entry.id]


def test_smarthost_is_not_subject_to_mta_sts(tmp_path):
    world = sts_world(tmp_path, policy("enforce", "other.receiver.example"),
                      smarthost=(MX1, 25))
    world.send([BOB])
    assert len(world.peer.notifications) == 1
    assert world.fetch.asked == []


# -- the RETR destined-host check ------------------------------------------------------


@pytest.mark.parametrize("mode, evil_served", [("enforce", False), ("testing", True)])
def test_retr_only_from_listed_mx_under_enforce(tmp_path, mode, evil_served):
    """
    SPEC 11.2: a spoofed MX (evil, 192.0.2.66) in the DNS is told nothing
    under enforce; the listed one is served.
    """
    clock = Clock()
    clock.advance(1000)
    outbox = MemoryOutbox()
    outbox.load()
    outbox.add([make_entry(id="Notified_entry_00001", state=NOTIFIED, notified_at=900.0,
                           expires=5000.0, recipients=[BOB])], [b"Subject: x\r\n\r\nhi\r\n"])
    resolver = FakeResolver(
        mx={"receiver.example": [(10, "mx1.receiver.example"), (5, "evil.example")]},
        addresses={"mx1.receiver.example": [MX1], "evil.example": ["192.0.2.66"]},
        txt=TXT,
    )
    sts = MTASTS(resolver=resolver, fetch=ScriptedFetch(policy(mode, "mx1.receiver.example")),
                 clock=clock, trust=None, cache=PolicyCache(tmp_path / "sts", run_blocking))
    sts.start()
    counter = PickupCounter(outbox, RecordingOutbound(), resolver, clock,
                            FailureTracker(clock, 10, 3600.0, 600.0, 30.0), run_blocking,
                            mta_sts=sts)

    def retr(peer: str):
        return counter(object(), Retrieve(Session(peer, "smtp", helo="x", esmtp=True),
                                          "Notified_entry_00001"))

    evil = retr("192.0.2.66")
    clock.advance(1.0)
    if evil_served:
        assert isinstance(result_of(evil), Reverse)
        return
    assert result_of(evil) == replies.S550_NO_SUCH_MESSAGE
    assert not outbox.get("Notified_entry_00001").claimed
    assert isinstance(result_of(retr(MX1)), Reverse)
