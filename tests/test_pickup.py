"""
Tests for L{pullmail.pull.serve}: the SMTA's answer to ``RETR`` (SPEC 4) -- the
destined-host check, claims, and the brute-force tarpit -- on a L{Clock}.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.task import Clock

from pullmail.config import DeliveryConfig
from pullmail.outbound.delivery import Outbound
from pullmail.pull.serve import IN_FLIGHT_WAIT, PickupCounter
from pullmail.pull.verbs import Retrieve
from pullmail.smtp import replies
from pullmail.smtp.envelope import Session
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import Close, Reverse
from pullmail.storage.outbox import NOTIFIED, QUEUED
from pullmail.testing import (
    FakeNetwork,
    FakeResolver,
    HeldRunner,
    MemoryOutbox,
    assert_no_result,
    failure_of,
    make_entry,
    result_of,
    run_blocking,
)
from pullmail.trust.throttle import FailureTracker

GDEL_ID = "Notified_entry_00001"
MX_ADDRESS = "192.0.2.25"
STRANGER = "198.51.100.66"


class TestFailureTracker:
    def setup_method(self) -> None:
        self.clock = Clock()
        self.tracker = FailureTracker(self.clock, limit=5, window=3600.0, block=600.0,
                                      tarpit_max=10.0)

    def test_growing_delay(self) -> None:
        """SPEC 4: 1 s, 2 s, 4 s ... capped by retr_tarpit_max."""
        tracker = FailureTracker(self.clock, limit=100, window=3600.0, block=600.0,
                                 tarpit_max=10.0)
        assert [tracker.failed("192.0.2.1") for _ in range(6)] == \
                         [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]

    def test_per_address(self) -> None:
        self.tracker.failed("192.0.2.1")
        self.tracker.failed("192.0.2.1")
        assert self.tracker.failed("192.0.2.2") == 1.0

    def test_block_after_limit(self) -> None:
        """After retr_fail_limit failures in the window the address is refused at connect."""
        for _ in range(4):
            self.tracker.failed("192.0.2.1")
        assert self.tracker.refuse_connection("192.0.2.1") is None
        self.tracker.failed("192.0.2.1")
        refusal = self.tracker.refuse_connection("192.0.2.1")
        assert (refusal.code, refusal.enhanced) == (421, "4.7.0")
        assert self.tracker.refuse_connection("192.0.2.2") is None

    def test_unblock_after_block_time(self) -> None:
        """retr_block later the address is let in again, with a clean slate."""
        for _ in range(5):
            self.tracker.failed("192.0.2.1")
        self.clock.advance(599)
        assert self.tracker.refuse_connection("192.0.2.1") is not None
        self.clock.advance(1)
        assert self.tracker.refuse_connection("192.0.2.1") is None
        assert self.tracker.failed("192.0.2.1") == 1.0

    def test_window_expiry(self) -> None:
        """Failures older than the window are forgotten."""
        for _ in range(4):
            self.tracker.failed("192.0.2.1")
        self.clock.advance(3600)
        assert self.tracker.failed("192.0.2.1") == 1.0
        assert self.tracker.refuse_connection("192.0.2.1") is None

    def test_window_slides(self) -> None:
        """Only the failures inside the last window count toward the limit."""
        for _ in range(3):
            self.tracker.failed("192.0.2.1")
        self.clock.advance(1800)
        self.tracker.failed("192.0.2.1")
        self.clock.advance(1800)  # the first three fall out
        self.tracker.failed("192.0.2.1")
        assert self.tracker.refuse_connection("192.0.2.1") is None


class RecordingOutbound:
    def __init__(self) -> None:
        self.finished: list = []
        self.busy: set[str] = set()

    def in_flight(self, entry_id) -> bool:
        return entry_id in self.busy

    def transmitted(self, entry_id) -> defer.Deferred:
        self.waiter = defer.Deferred()
        return self.waiter

    def transmission_over(self, entry_id) -> None:
        self.busy.discard(entry_id)
        self.waiter.callback(None)

    def retrieval_finished(self, entry, result, peer, host=None) -> None:
        self.finished.append((entry, result, peer, host))


class ScriptedChannel:
    def __init__(self, replies) -> None:
        self.script = list(replies)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def reply(self) -> defer.Deferred:
        item = self.script.pop(0)
        if isinstance(item, Exception):
            return defer.fail(item)
        return defer.succeed(item)


class WaitingChannel(ScriptedChannel):
    """A channel whose peer has not answered yet."""

    def __init__(self) -> None:
        super().__init__([])

    def reply(self) -> defer.Deferred:
        return defer.Deferred()


OK = Reply(250, "2.0.0", "Ok")
GO_AHEAD = Reply(354, "", "Go ahead")


class TestPickupCounter:
    def setup_method(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.outbox = MemoryOutbox()
        self.outbox.load()
        self.entry = make_entry(id=GDEL_ID, state=NOTIFIED, notified_at=900.0, expires=5000.0,
                                recipients=["bob@receiver.example", "carol@receiver.example"],
                                size=17, body="8BITMIME")
        self.outbox.add([self.entry], [b"Subject: x\r\n\r\nhi\r\n"])
        self.resolver = FakeResolver(
            mx={"receiver.example": [(10, "mx.receiver.example")]},
            addresses={"mx.receiver.example": [MX_ADDRESS, "2001:db8::25"]},
        )
        self.tracker = FailureTracker(self.clock, limit=3, window=3600.0, block=600.0,
                                      tarpit_max=30.0)
        self.outbound = RecordingOutbound()
        self.counter = PickupCounter(self.outbox, self.outbound, self.resolver, self.clock,
                                     self.tracker, run_blocking)

    def retr(self, gdel_id: str = GDEL_ID, peer: str = MX_ADDRESS) -> defer.Deferred:
        session = Session(peer, "smtp", helo="mx.receiver.example", esmtp=True)
        return self.counter(object(), Retrieve(session, gdel_id))

    def assert_refused_after(self, d: defer.Deferred, delay: float) -> None:
        """The same 550 5.7.1, and only after C{delay} seconds."""
        self.clock.advance(delay - 0.001)
        assert_no_result(d)
        self.clock.advance(0.001)
        reply = result_of(d)
        assert reply == replies.S550_NO_SUCH_MESSAGE
        assert (reply.code, reply.enhanced) == (550, "5.7.1")

    def test_unknown_id(self) -> None:
        """An unknown id: 550 5.7.1, after the tarpit delay."""
        self.assert_refused_after(self.retr("Unknown_id_000000001"), 1.0)
        self.assert_refused_after(self.retr("Unknown_id_000000002"), 2.0)
        assert self.outbound.finished == []

    def test_not_destined(self) -> None:
        """A host that is no MX of the recipient domain gets the very same 550."""
        self.assert_refused_after(self.retr(peer=STRANGER), 1.0)
        assert not self.outbox.get(GDEL_ID).claimed

    def test_ipv6_mx_address(self) -> None:
        assert isinstance(result_of(self.retr(peer="2001:db8::25")), Reverse)

    def test_implicit_mx(self) -> None:
        """RFC 5321 5.1: with no MX, the domain's own addresses are the destined hosts."""
        self.resolver.mx_records = {}
        self.resolver.hosts = {"receiver.example": ["192.0.2.77"]}
        self.assert_refused_after(self.retr(peer=MX_ADDRESS), 1.0)
        assert isinstance(result_of(self.retr(peer="192.0.2.77")), Reverse)

    def test_queued_entry_served_to_destined_host(self) -> None:
        """
        An entry still queued (its GDEL reply lost, or not yet recorded) is
        handed to a destined host: only our notification could reveal its id,
        and a 550 would make the receiver drop it (SPEC 4: never lost).
        """
        self.outbox.update(make_entry(id=GDEL_ID, state=QUEUED, expires=None))
        assert isinstance(result_of(self.retr()), Reverse)

    def test_expired(self) -> None:
        self.clock.advance(4000)
        self.assert_refused_after(self.retr(), 1.0)

    def test_dns_temporary_error(self) -> None:
        """SPEC 4: DNS failure of the destined check: 451 4.4.3 at once, not 550."""
        self.resolver.temporary.add("receiver.example")
        reply = result_of(self.retr())
        assert reply == replies.S451_DNS_ERROR
        assert (reply.code, reply.enhanced) == (451, "4.4.3")
        assert self.tracker.refuse_connection(MX_ADDRESS) is None
        assert not self.outbox.get(GDEL_ID).claimed

    def test_dns_temporary_error_on_host(self) -> None:
        self.resolver.temporary.add("mx.receiver.example")
        assert result_of(self.retr()).code == 451

    def test_dns_permanent_error(self) -> None:
        """No such domain: nobody is destined; the same 550."""
        self.resolver.permanent.add("receiver.example")
        self.assert_refused_after(self.retr(), 1.0)

    def test_already_claimed(self) -> None:
        """A retrieval in progress: 451 4.3.0."""
        assert isinstance(result_of(self.retr()), Reverse)
        reply = result_of(self.retr())
        assert (reply.code, reply.enhanced) == (451, "4.3.0")

    def test_waits_for_the_notification_on_the_wire(self) -> None:
        """
        RETR for an id whose GDEL reply we have not read yet (the RMTA was
        quicker): it waits for that outcome, then hands the entry over.
        """
        self.outbound.busy.add(GDEL_ID)
        d = self.retr()
        assert_no_result(d)
        self.clock.advance(IN_FLIGHT_WAIT - 1)
        assert_no_result(d)
        self.outbound.transmission_over(GDEL_ID)
        assert isinstance(result_of(d), Reverse)
        assert self.outbox.get(GDEL_ID).claimed

    def test_notification_on_the_wire_too_long(self) -> None:
        """A notification still unanswered after IN_FLIGHT_WAIT: 451 4.3.0, nothing claimed."""
        self.outbound.busy.add(GDEL_ID)
        d = self.retr()
        self.clock.advance(IN_FLIGHT_WAIT)
        reply = result_of(d)
        assert (reply.code, reply.enhanced) == (451, "4.3.0")
        assert not self.outbox.get(GDEL_ID).claimed

    def test_success(self) -> None:
        """A destined host gets '250 2.0.0 <id> follows' and the entry is claimed."""
        action = result_of(self.retr())
        assert isinstance(action, Reverse)
        assert action.reply == Reply(250, "2.0.0", f"{GDEL_ID} follows")
        assert self.outbox.get(GDEL_ID).claimed
        assert self.outbound.finished == []

    def test_turn_sends_the_message(self) -> None:
        """The turn is one transaction of the entry; its result goes to the outbound."""
        action = result_of(self.retr())
        final = Reply(250, "2.0.0", "Ok: stored")
        channel = ScriptedChannel([OK, OK, OK, GO_AHEAD, final])
        result_of(defer.Deferred.fromCoroutine(action.turn(channel)))
        assert channel.sent[0] == \
                         b"MAIL FROM:<alice@sender.example> SIZE=17 BODY=8BITMIME\r\n" \
                         b"RCPT TO:<bob@receiver.example>\r\nRCPT TO:<carol@receiver.example>\r\n"
        assert channel.sent[-1] == b"Subject: x\r\n\r\nhi\r\n.\r\n"
        [(entry, result, peer, host)] = self.outbound.finished
        assert entry.id == GDEL_ID
        assert (peer, host) == (MX_ADDRESS, "mx.receiver.example")
        assert result.accepted() == ["bob@receiver.example", "carol@receiver.example"]
        assert result.final == final

    def test_message_read_before_the_reply(self) -> None:
        """
        Issue 17: the message is read (off the reactor thread) before
        '250 follows', so the turn's MAIL and RCPT go out at once, in the
        same write as that reply, and the RMTA wakes once for both.
        """
        runner = HeldRunner()
        self.counter.run_blocking = runner
        d = self.retr()
        assert_no_result(d)
        runner.run_all()
        action = result_of(d)
        channel = WaitingChannel()
        defer.Deferred.fromCoroutine(action.turn(channel))
        assert runner.work == []
        assert channel.sent == [b"MAIL FROM:<alice@sender.example> SIZE=17 BODY=8BITMIME\r\n"
                                b"RCPT TO:<bob@receiver.example>\r\n"
                                b"RCPT TO:<carol@receiver.example>\r\n"]

    def test_unreadable_message_released(self) -> None:
        """The message cannot be read: 451 4.3.0, and the claim goes back (a broken transfer)."""
        def unreadable(function, *args):
            return defer.fail(OSError(5, "Input/output error"))

        self.counter.run_blocking = unreadable
        assert result_of(self.retr()) == replies.S451_LOCAL_ERROR
        [(entry, result, peer, host)] = self.outbound.finished
        assert (entry.id, result, peer, host) == (GDEL_ID, None, MX_ADDRESS, "mx.receiver.example")

    def test_broken_transfer(self) -> None:
        """The channel failing mid-turn reports a broken transfer (result None)."""
        action = result_of(self.retr())
        channel = ScriptedChannel([OK, error.ConnectionLost()])
        failure_of(defer.Deferred.fromCoroutine(action.turn(channel)),
                             error.ConnectionLost)
        [(entry, result, peer, host)] = self.outbound.finished
        assert result is None

    def test_broken_transfer_releases_claim(self) -> None:
        """With the real Outbound, a broken transfer releases the claim: RETR works again."""
        network = FakeNetwork(self.clock)
        outbound = Outbound(outbox=self.outbox, resolver=self.resolver, connect=network,
                            clock=self.clock, run_blocking=run_blocking, hostname="mx.s.example",
                            config=DeliveryConfig(), send_bounce=lambda s, m: None)
        self.counter.outbound = outbound
        action = result_of(self.retr())
        assert isinstance(result_of(self.retr()), Reply)  # 451 in progress
        channel = ScriptedChannel([error.ConnectionLost()])
        failure_of(defer.Deferred.fromCoroutine(action.turn(channel)))
        assert not self.outbox.get(GDEL_ID).claimed
        assert isinstance(result_of(self.retr()), Reverse)
        outbound.stop()

    def test_brute_force_blocks(self) -> None:
        """
        After retr_fail_limit refusals the address is refused at connect
        (421 4.7.0), and the guessing connection itself is closed with 421
        (issue 18 item 10), on the last guess and on any after it.
        """
        for n, delay in enumerate([1.0, 2.0]):
            self.assert_refused_after(self.retr(f"Guess_{n:015d}"), delay)
        last = self.retr("Guess_000000000000002")
        self.clock.advance(4.0)
        assert result_of(last) == Close(replies.S421_BLOCKED)
        assert self.tracker.refuse_connection(MX_ADDRESS) == replies.S421_BLOCKED
        assert result_of(self.retr(GDEL_ID)) == Close(replies.S421_BLOCKED)
