"""
Tests for L{pullmail.outbound.delivery.Outbound}: the SMTA's outbound side (SPEC 4,
5, 7) against in-memory peers (a real L{SMTPServerFactory} with fake
performers) on a L{FakeNetwork}, with a L{Clock}.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail.accounts.users import Accounts
from pullmail.config import DeliveryConfig
from pullmail.outbound import delivery
from pullmail.outbound.delivery import Outbound
from pullmail.pull.verbs import Notify, pull_extension
from pullmail.smtp.protocol import ConnectionLimits, SMTPServerFactory
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import Deliver, ServerPolicy
from pullmail.storage.outbox import NOTIFIED, QUEUED, WRITE_BEHIND, MaildirOutbox
from pullmail.testing import (
    FakeNetwork,
    FakeResolver,
    HeldRunner,
    assert_no_result,
    make_entry,
    run_blocking,
)

START = 1_000_000.0
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
MX1, MX2 = "192.0.2.25", "192.0.2.26"
SENDER = "alice@sender.example"
BOB, CAROL, NOBODY = "bob@receiver.example", "carol@receiver.example", "nobody@receiver.example"
DAVE = "dave@receiver.example"
MESSAGE = [b"Subject: hello\r\n\r\nHello Bob.\r\n"]


def result_of(d: defer.Deferred):
    found = []
    d.addBoth(found.append)
    assert found, "the Deferred has no result yet"
    if isinstance(found[0], Exception) or hasattr(found[0], "raiseException"):
        found[0].raiseException()
    return found[0]


class _Offering(SMTPServerFactory):
    """A factory whose machines leave the keywords in C{without} out of EHLO."""

    without: frozenset = frozenset()

    def new_machine(self, session):
        machine = super().new_machine(session)
        keywords = machine.ehlo_keywords
        machine.ehlo_keywords = lambda: [k for k in keywords() if k.split()[0] not in self.without]
        return machine


class Peer:
    """A receiving MX: a real server machine with recording performers."""

    def __init__(self, clock: Clock, gdel: bool = True, max_recipients: int = 10,
                 without: frozenset = frozenset()) -> None:
        self.notifications: list[Notify] = []
        self.deliveries: list[Deliver] = []
        self.notify_reply: Reply | None = None
        self.deliver_reply = Reply(250, "2.0.0", "Ok: queued")
        policy = ServerPolicy(
            hostname="mx1.receiver.example", domains=("receiver.example",),
            accounts=Accounts(frozenset({"receiver.example"}), users={BOB: "h", CAROL: "h", DAVE: "h"}),
            service="smtp", max_size=100_000, max_recipients=max_recipients,
        )
        self.factory = _Offering(
            policy, clock, ConnectionLimits(100, 100), 300.0,
            {Notify: self.notify, Deliver: self.deliver},
            extensions=(pull_extension(),) if gdel else (),
        )
        self.factory.without = frozenset(without)

    def notify(self, connection, request: Notify):
        self.notifications.append(request)
        return defer.succeed(
            self.notify_reply or Reply(250, "2.0.0", f"{request.gdel_id} notification accepted")
        )

    def deliver(self, connection, request: Deliver):
        self.deliveries.append(request)
        return defer.succeed(self.deliver_reply)


class World:
    def __init__(self, tmp_path, gdel: bool = True, max_recipients: int = 10,
                 without: frozenset = frozenset(), **config) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.clock.advance(START)
        self.network = FakeNetwork(self.clock, source="192.0.2.10")
        self.resolver = FakeResolver(
            mx={"receiver.example": [(10, "mx1.receiver.example"),
                                     (20, "mx2.receiver.example")]},
            addresses={"mx1.receiver.example": [MX1], "mx2.receiver.example": [MX2]},
        )
        self.peer = Peer(self.clock, gdel=gdel, max_recipients=max_recipients, without=without)
        self.network.listen(MX1, 25, self.peer.factory)
        defaults = dict(push_retry=(5 * MINUTE, 15 * MINUTE, HOUR, 4 * HOUR),
                        push_lifetime=5 * DAY, outbox_lifetime=48 * HOUR)
        defaults.update(config)
        self.config = DeliveryConfig(**defaults)
        self.bounces: list[tuple[str, bytes]] = []
        self.outbound = self.new_outbound()

    def new_outbound(self, outbox: MaildirOutbox | None = None) -> Outbound:
        self.outbox = outbox if outbox is not None else MaildirOutbox(self.tmp_path / "outbox")
        outbound = Outbound(
            outbox=self.outbox, resolver=self.resolver, connect=self.network,
            clock=self.clock, run_blocking=run_blocking, hostname="mx.sender.example",
            config=self.config, send_bounce=lambda sender, message: self.bounces.append(
                (sender, message)),
        )
        outbound.start()
        return outbound

    def settle(self) -> None:
        self.network.settle()

    def advance(self, seconds: float) -> None:
        self.network.advance(seconds)

    def send(self, recipients=(BOB,), sender: str = SENDER, **kw) -> list:
        result_of(self.outbound.enqueue("QID1", sender, list(recipients), MESSAGE, **kw))
        entries = list(self.outbox.entries())
        self.settle()
        return entries

    def attempts_to(self, address: str) -> int:
        return self.network.attempts.count((address, 25))


def _on_disk(tmp_path, entry_id: str):
    """The entry as a node starting now would read it."""
    again = MaildirOutbox(tmp_path / "outbox")
    again.load()
    return again.get(entry_id)


def _status(message: bytes) -> list[bytes]:
    return [line for line in message.split(b"\r\n") if line.startswith(b"Status:")]


def assert_dsn(message: bytes, status: str, recipient: str) -> None:
    assert b"Content-Type: multipart/report; report-type=delivery-status" in message
    assert f"Status: {status}".encode() in message
    assert f"Final-Recipient: rfc822; {recipient}".encode() in message
    assert b"From: Mail Delivery System <MAILER-DAEMON@mx.sender.example>" in message


# -- notification ----------------------------------------------------------------------


def test_notify_when_gdel_offered(tmp_path) -> None:
    """SPEC 7: the peer offers GDEL: notify, and keep the entry NOTIFIED until expiry."""
    world = World(tmp_path)
    [entry] = world.send([BOB])
    [notify] = world.peer.notifications
    assert notify.gdel_id == entry.id
    assert notify.envelope.sender == SENDER
    assert notify.envelope.recipients == (BOB,)
    assert notify.session.peer == "192.0.2.10"
    assert world.peer.deliveries == []
    stored = world.outbox.get(entry.id)
    assert stored.state == NOTIFIED
    assert stored.notified_at == START
    assert stored.expires == START + 48 * HOUR
    assert world.outbox.read_message(entry.id) == b"".join(MESSAGE)
    # On disk it says queued a while (retrieved meanwhile, it is never
    # written notified), then it stays there as notified.
    assert _on_disk(tmp_path, entry.id).state == QUEUED
    # The session idles for [delivery] connection_cache_time, then quits.
    assert world.network.open_connections() == 1
    world.advance(world.config.connection_cache_time)
    assert world.network.open_connections() == 0
    world.advance(WRITE_BEHIND)
    assert _on_disk(tmp_path, entry.id).state == NOTIFIED


# -- the connection cache -------------------------------------------------------------


@pytest.mark.parametrize("gdel", [True, False])
def test_messages_one_at_a_time_share_one_session(tmp_path, gdel) -> None:
    """
    A message queued while the last session to its domain idles goes over
    that session: one connection, one TLS handshake, for a trickle of mail
    (notifications and pushes alike).
    """
    world = World(tmp_path, gdel=gdel)
    world.send([BOB])
    world.advance(1.0)
    world.send([BOB])
    assert world.attempts_to(MX1) == 1
    done = world.peer.notifications if gdel else world.peer.deliveries
    assert len(done) == 2
    world.advance(world.config.connection_cache_time)
    assert world.network.open_connections() == 0
    world.send([BOB])
    assert world.attempts_to(MX1) == 2


def test_no_connection_cache_when_off(tmp_path) -> None:
    world = World(tmp_path, connection_cache_time=0.0)
    world.send([BOB])
    assert world.network.open_connections() == 0
    world.send([BOB])
    assert world.attempts_to(MX1) == 2


def test_an_idle_session_the_peer_closed_gives_its_entries_back(tmp_path) -> None:
    """A cached session found closed: its entries go to a new one, not to a retry."""
    world = World(tmp_path)
    world.send([BOB])
    [client] = world.network.clients
    client.transport.loseConnection()
    world.settle()
    [entry] = world.send([BOB])[-1:]
    assert len(world.peer.notifications) == 2
    assert world.attempts_to(MX1) == 2
    assert world.outbox.get(entry.id).state == NOTIFIED
    assert world.outbox.get(entry.id).attempts == 1


def test_one_entry_per_domain(tmp_path) -> None:
    """SPEC 2: recipients of one domain share an id; two domains get two."""
    world = World(tmp_path)
    entries = world.send([BOB, CAROL, "dave@other.example"])
    assert sorted(e.domain for e in entries) == ["other.example", "receiver.example"]
    by_domain = {e.domain: e for e in entries}
    assert by_domain["receiver.example"].recipients == [BOB, CAROL]
    assert by_domain["other.example"].id != by_domain["receiver.example"].id


def test_gdel_refused_permanently_bounces(tmp_path) -> None:
    """SPEC 3: a 5xx to GDEL is final: bounce, remove."""
    world = World(tmp_path)
    world.peer.notify_reply = Reply(550, "5.7.23", "SPF validation failed")
    [entry] = world.send([BOB])
    assert world.outbox.get(entry.id) is None
    [(to, message)] = world.bounces
    assert to == SENDER
    assert_dsn(message, "5.7.23", BOB)


def test_gdel_deferred_retries(tmp_path) -> None:
    """A 4xx to GDEL (e.g. SPF temperror): retry after the first push_retry delay."""
    world = World(tmp_path)
    world.peer.notify_reply = Reply(451, "4.7.24", "SPF temporary error")
    [entry] = world.send([BOB])
    stored = world.outbox.get(entry.id)
    assert stored.state == QUEUED
    assert stored.next_attempt == START + 5 * MINUTE
    assert world.bounces == []
    world.peer.notify_reply = None
    world.advance(5 * MINUTE)
    assert len(world.peer.notifications) == 2
    assert world.outbox.get(entry.id).state == NOTIFIED


def test_unknown_recipient_bounced_others_notified(tmp_path) -> None:
    """A 550 5.1.1 RCPT bounces that recipient; the others are notified."""
    world = World(tmp_path)
    [entry] = world.send([BOB, NOBODY])
    assert world.peer.notifications[0].envelope.recipients == (BOB,)
    stored = world.outbox.get(entry.id)
    assert stored.state == NOTIFIED
    assert stored.recipients == [BOB]
    [(to, message)] = world.bounces
    assert_dsn(message, "5.1.1", NOBODY)
    assert b"Final-Recipient: rfc822; " + BOB.encode() not in message


def test_deferred_recipients_split_off(tmp_path) -> None:
    """Recipients deferred while others were notified get their own queued entry."""
    world = World(tmp_path, max_recipients=1)
    [entry] = world.send([BOB, CAROL])
    notified = world.outbox.get(entry.id)
    assert notified.state == NOTIFIED and notified.recipients == [BOB]
    [sibling] = [e for e in world.outbox.entries() if e.id != entry.id]
    assert sibling.recipients == [CAROL]
    assert sibling.state == QUEUED
    assert sibling.next_attempt == START + 5 * MINUTE
    assert world.outbox.read_message(sibling.id) == b"".join(MESSAGE)
    world.advance(5 * MINUTE)
    assert [n.gdel_id for n in world.peer.notifications] == [entry.id, sibling.id]


def test_notified_entry_expires(tmp_path) -> None:
    """SPEC 5, 7: not retrieved within outbox_lifetime: bounce with X.4.7, remove."""
    world = World(tmp_path)
    [entry] = world.send([BOB])
    world.advance(48 * HOUR - 1)
    assert world.bounces == []
    assert world.outbox.get(entry.id) is not None
    world.advance(1)
    assert world.outbox.get(entry.id) is None
    [(to, message)] = world.bounces
    assert to == SENDER
    assert_dsn(message, "5.4.7", BOB)
    assert b"Action: failed" in message


def _held_bounces(world: World) -> list[tuple[str, bytes, defer.Deferred]]:
    """Bounces wait to be stored until the test fires their Deferreds."""
    held = []

    def send_bounce(sender, message):
        d = defer.Deferred()
        held.append((sender, message, d))
        return d

    world.outbound.send_bounce = send_bounce
    return held


def _files_of(world: World, entry_id: str) -> list[str]:
    root = world.tmp_path / "outbox"
    return sorted(p.parent.name for p in (root / "entries" / f"{entry_id}.json",
                                          root / "data" / f"{entry_id}.eml") if p.exists())


def test_expired_entry_kept_on_disk_until_its_bounce_is_stored(tmp_path) -> None:
    """
    Nothing is lost in between: an expired entry leaves the index at once
    (no second bounce, no RETR), but its files go only once the DSN is stored.
    """
    world = World(tmp_path)
    held = _held_bounces(world)
    [entry] = world.send([BOB])
    world.advance(48 * HOUR)
    [(to, message, stored)] = held
    assert world.outbox.get(entry.id) is None
    assert _files_of(world, entry.id) == ["data", "entries"]
    world.advance(HOUR)
    assert len(held) == 1
    stored.callback(None)
    assert _files_of(world, entry.id) == []


def test_failed_bounce_keeps_the_entry_for_the_next_start(tmp_path) -> None:
    """A DSN that cannot be stored leaves the entry on disk: the next start bounces it again."""
    world = World(tmp_path)
    held = _held_bounces(world)
    [entry] = world.send([BOB])
    world.advance(48 * HOUR)
    [(_, _, stored)] = held
    stored.errback(OSError(28, "No space left on device"))
    assert _files_of(world, entry.id) == ["data", "entries"]
    world.outbound.stop()
    world.outbound = world.new_outbound()
    world.settle()
    [(to, message)] = world.bounces
    assert to == SENDER
    assert_dsn(message, "5.4.7", BOB)
    assert _files_of(world, entry.id) == []


def test_bounce_reads_the_original_off_the_reactor_thread(tmp_path) -> None:
    """The message quoted in a DSN is read through run_blocking (the disk threads)."""
    world = World(tmp_path)
    ran = []

    def recording(function, *args, **kwargs):
        ran.append(getattr(function, "__name__", function))
        return run_blocking(function, *args, **kwargs)

    world.outbound.run_blocking = recording
    world.send([BOB])
    ran.clear()
    world.advance(48 * HOUR)
    assert ran == ["read_message"]
    [(_, message)] = world.bounces
    assert b"Subject: hello" in message


def test_expiry_counts_from_creation(tmp_path) -> None:
    """A notification after some retries still expires at created + outbox_lifetime."""
    world = World(tmp_path)
    world.peer.notify_reply = Reply(421, "4.3.2", "busy")
    [entry] = world.send([BOB])
    world.peer.notify_reply = None
    world.advance(5 * MINUTE)
    assert world.outbox.get(entry.id).expires == START + 48 * HOUR


# -- classic push ----------------------------------------------------------------------


def test_push_when_no_gdel(tmp_path) -> None:
    """No GDEL, push_fallback on: MAIL/RCPT/DATA, then the entry is removed."""
    world = World(tmp_path, gdel=False)
    [entry] = world.send([BOB, CAROL])
    [delivery] = world.peer.deliveries
    assert delivery.envelope.sender == SENDER
    assert delivery.envelope.recipients == (BOB, CAROL)
    assert b"".join(delivery.chunks) == b"".join(MESSAGE)
    assert world.outbox.get(entry.id) is None
    assert world.bounces == []
    assert world.peer.notifications == []


def test_no_gdel_no_fallback(tmp_path) -> None:
    """No GDEL and push_fallback off: nothing is pushed; the entry waits for a retry."""
    world = World(tmp_path, gdel=False, push_fallback=False)
    [entry] = world.send([BOB])
    assert world.peer.deliveries == []
    stored = world.outbox.get(entry.id)
    assert stored.state == QUEUED
    assert stored.next_attempt == START + 5 * MINUTE


def test_retry_times(tmp_path) -> None:
    """SPEC 5: 4xx: attempts at 0, +5 min, +15 min, +1 h, +4 h, +4 h ... exactly."""
    world = World(tmp_path, gdel=False)
    world.peer.deliver_reply = Reply(451, "4.3.0", "try later")
    [entry] = world.send([BOB])
    assert world.attempts_to(MX1) == 1
    for delay in [5 * MINUTE, 15 * MINUTE, HOUR, 4 * HOUR, 4 * HOUR]:
        count = world.attempts_to(MX1)
        world.advance(delay - 1)
        assert world.attempts_to(MX1) == count, delay
        world.advance(1)
        assert world.attempts_to(MX1) == count + 1, delay
    assert world.outbox.get(entry.id).attempts == 6
    assert world.outbox.get(entry.id).last_error.startswith("451")
    assert world.bounces == []


def test_retry_then_success(tmp_path) -> None:
    world = World(tmp_path, gdel=False)
    world.peer.deliver_reply = Reply(452, "4.3.1", "full")
    [entry] = world.send([BOB])
    world.peer.deliver_reply = Reply(250, "2.0.0", "Ok")
    world.advance(5 * MINUTE)
    assert len(world.peer.deliveries) == 2
    assert world.outbox.get(entry.id) is None
    assert world.bounces == []


def test_next_mx_when_first_unreachable(tmp_path) -> None:
    """Connect to each MX in preference order until one answers."""
    world = World(tmp_path, gdel=False)
    world.network.stop_listening(MX1, 25)
    world.network.listen(MX2, 25, world.peer.factory)
    [entry] = world.send([BOB])
    assert world.network.attempts == [(MX1, 25), (MX2, 25)]
    assert world.outbox.get(entry.id) is None


def test_no_answer_retries(tmp_path) -> None:
    """No MX answers: a transient failure, retried."""
    world = World(tmp_path)
    world.network.stop_listening(MX1, 25)
    [entry] = world.send([BOB])
    assert world.network.attempts == [(MX1, 25), (MX2, 25)]
    assert world.outbox.get(entry.id).next_attempt == START + 5 * MINUTE
    world.network.listen(MX1, 25, world.peer.factory)
    world.advance(5 * MINUTE)
    assert world.outbox.get(entry.id).state == NOTIFIED


def test_dns_temporary_error_retries(tmp_path) -> None:
    world = World(tmp_path)
    world.resolver.temporary.add("receiver.example")
    [entry] = world.send([BOB])
    assert world.network.attempts == []
    assert world.outbox.get(entry.id).state == QUEUED
    assert world.bounces == []


def test_no_such_domain_bounces(tmp_path) -> None:
    world = World(tmp_path)
    world.resolver.permanent.add("receiver.example")
    [entry] = world.send([BOB])
    assert world.outbox.get(entry.id) is None
    [(to, message)] = world.bounces
    assert_dsn(message, "5.1.2", BOB)


def test_implicit_mx(tmp_path) -> None:
    """RFC 5321 5.1: no MX records: the domain itself."""
    world = World(tmp_path, gdel=False)
    world.resolver.mx_records = {}
    world.resolver.hosts["receiver.example"] = [MX1]
    [entry] = world.send([BOB])
    assert world.network.attempts == [(MX1, 25)]
    assert world.outbox.get(entry.id) is None


def test_push_lifetime_over(tmp_path) -> None:
    """SPEC 5, 7: still deferred when push_lifetime ends: bounce with 4.4.7, remove."""
    world = World(tmp_path, gdel=False, push_retry=(300.0,), push_lifetime=1000.0)
    world.peer.deliver_reply = Reply(451, "4.3.0", "try later")
    [entry] = world.send([BOB])
    for _ in range(3):
        world.advance(300)   # attempts at 0, 300, 600, 900
    assert world.attempts_to(MX1) == 4
    assert world.bounces == []
    world.advance(100)   # the last, at the deadline
    assert world.attempts_to(MX1) == 5
    assert world.outbox.get(entry.id) is None
    [(to, message)] = world.bounces
    assert_dsn(message, "4.4.7", BOB)
    assert b"Action: failed" in message
    world.advance(DAY)
    assert world.attempts_to(MX1) == 5


def test_rcpt_refused_bounces_that_recipient(tmp_path) -> None:
    """5xx to one RCPT: that recipient is bounced with its status; the rest delivered."""
    world = World(tmp_path, gdel=False)
    [entry] = world.send([BOB, NOBODY])
    assert world.peer.deliveries[0].envelope.recipients == (BOB,)
    assert world.outbox.get(entry.id) is None
    [(to, message)] = world.bounces
    assert to == SENDER
    assert_dsn(message, "5.1.1", NOBODY)
    assert b"Diagnostic-Code: smtp; 550 5.1.1" in message
    assert _status(message) == [b"Status: 5.1.1"]


def test_data_refused_permanently(tmp_path) -> None:
    world = World(tmp_path, gdel=False)
    world.peer.deliver_reply = Reply(554, "5.6.0", "content refused")
    [entry] = world.send([BOB, CAROL])
    assert world.outbox.get(entry.id) is None
    reported = b"".join(m for _, m in world.bounces)
    assert f"Final-Recipient: rfc822; {BOB}".encode() in reported
    assert f"Final-Recipient: rfc822; {CAROL}".encode() in reported
    for _, message in world.bounces:
        assert set(_status(message)) == {b"Status: 5.6.0"}


def test_null_sender_never_bounced(tmp_path) -> None:
    """SPEC 7: never bounce a bounce."""
    world = World(tmp_path, gdel=False)
    [entry] = world.send([NOBODY], sender="")
    assert world.outbox.get(entry.id) is None
    assert world.bounces == []


def test_null_sender_expiry_not_bounced(tmp_path) -> None:
    world = World(tmp_path)
    [entry] = world.send([BOB], sender="")
    world.advance(48 * HOUR)
    assert world.outbox.get(entry.id) is None
    assert world.bounces == []


# -- retrieval results -----------------------------------------------------------------


def test_retrieval_finished_removes(tmp_path) -> None:
    """SPEC 4: 250 to end-of-data: the entry is done."""
    from pullmail.smtp.client import TransactionResult

    world = World(tmp_path)
    [entry] = world.send([BOB, CAROL])
    claimed = world.outbox.claim(entry.id)
    ok = Reply(250, "2.0.0", "Ok")
    world.outbound.retrieval_finished(
        claimed, TransactionResult(ok, {BOB: ok, CAROL: ok}, ok), MX1)
    assert world.outbox.get(entry.id) is None
    assert world.bounces == []


def test_retrieved_at_once_is_never_written_notified(tmp_path, monkeypatch) -> None:
    """
    Issue 17: retrieved before WRITE_BEHIND has passed, the entry's record
    is claimed and removed without ever being rewritten "notified": GDEL
    and RETR cost the sender no record write and no fsync of their own.
    """
    from pullmail.smtp.client import TransactionResult

    world = World(tmp_path)
    written = []
    monkeypatch.setattr(world.outbox, "update", lambda entry: written.append(entry.id))
    [entry] = world.send([BOB])
    assert world.outbox.get(entry.id).state == NOTIFIED
    claimed = world.outbox.claim(entry.id)
    ok = Reply(250, "2.0.0", "Ok")
    world.outbound.retrieval_finished(claimed, TransactionResult(ok, {BOB: ok}, ok), MX1)
    world.advance(WRITE_BEHIND)
    assert written == []
    assert world.outbox.get(entry.id) is None and _on_disk(tmp_path, entry.id) is None


def test_notified_entry_claimed_then_released_is_written_whole(tmp_path) -> None:
    """A broken transfer stores the entry (notified, to announce again) as ever."""
    world = World(tmp_path)
    [entry] = world.send([BOB])
    claimed = world.outbox.claim(entry.id)
    world.outbound.retrieval_finished(claimed, None, MX1)
    stored = _on_disk(tmp_path, entry.id)
    assert (stored.state, stored.renotify_at) == (NOTIFIED, START)


def test_crash_before_the_notified_write_notifies_again(tmp_path) -> None:
    """
    SPEC 4, 5: a crash (no stop) before the write: the entry comes back
    queued, nothing lost, and is notified again under its id, keeping its
    expiry; the receiver retrieves it once (SPEC 4, "no double copy").
    """
    world = World(tmp_path)
    [entry] = world.send([BOB])
    world.outbound = world.new_outbound()          # the old one died without stopping
    world.settle()
    assert [n.gdel_id for n in world.peer.notifications] == [entry.id, entry.id]
    stored = world.outbox.get(entry.id)
    assert (stored.state, stored.expires) == (NOTIFIED, START + 48 * HOUR)


def test_stop_writes_what_waits(tmp_path) -> None:
    """A node stopping writes the notified states that wait: no notification again."""
    world = World(tmp_path)
    [entry] = world.send([BOB])
    world.outbound.stop()
    assert _on_disk(tmp_path, entry.id).state == NOTIFIED


def test_a_refusal_is_written_notified_at_once(tmp_path) -> None:
    """
    A notification some recipients refused: its DSN goes now, so the entry
    (without them) is written now, never to be notified (and bounced) again.
    """
    world = World(tmp_path)
    [entry] = world.send([BOB, NOBODY])
    assert len(world.bounces) == 1
    stored = _on_disk(tmp_path, entry.id)
    assert (stored.state, stored.recipients) == (NOTIFIED, [BOB])


def test_retrieval_finished_mixed(tmp_path) -> None:
    """5xx recipients bounce; 4xx ones stay for a later RETR, released."""
    from pullmail.smtp.client import TransactionResult

    world = World(tmp_path)
    [entry] = world.send([BOB, CAROL, DAVE])
    claimed = world.outbox.claim(entry.id)
    ok, later = Reply(250, "2.0.0", "Ok"), Reply(450, "4.2.1", "busy")
    refused = Reply(550, "5.1.1", "No such user")
    world.outbound.retrieval_finished(claimed, TransactionResult(
        ok, {BOB: ok, CAROL: later, DAVE: refused}, ok), MX1, "mx1.receiver.example")
    stored = world.outbox.get(entry.id)
    assert stored.recipients == [CAROL]
    assert not stored.claimed
    assert stored.state == NOTIFIED
    [(to, message)] = world.bounces
    assert_dsn(message, "5.1.1", DAVE)
    assert b"Remote-MTA: dns; mx1.receiver.example\r\n" in message
    assert b"Diagnostic-Code: smtp; 550 5.1.1 No such user\r\n" in message
    assert world.outbox.claim(entry.id) is not None


def test_retrieval_broken_releases(tmp_path) -> None:
    world = World(tmp_path)
    [entry] = world.send([BOB])
    claimed = world.outbox.claim(entry.id)
    world.outbound.retrieval_finished(claimed, None, MX1)
    assert not world.outbox.get(entry.id).claimed
    assert world.outbox.claim(entry.id) is not None


def test_claimed_entry_does_not_expire_mid_retrieval(tmp_path) -> None:
    """An entry being retrieved is not bounced under the retrieval's feet."""
    world = World(tmp_path)
    [entry] = world.send([BOB])
    world.outbox.claim(entry.id)
    world.advance(48 * HOUR)
    assert world.bounces == []


# -- restarts --------------------------------------------------------------------------


def _restart(world: World, logged_events, pause: float, from_snapshot: bool) -> None:
    """
    Restart after C{pause}; C{from_snapshot}: twice, the first reading the
    files (and writing the snapshot), the second taking them from it.
    """
    for _ in range(2 if from_snapshot else 1):
        world.outbound.stop()
        world.clock.advance(pause / 2 if from_snapshot else pause)
        world.outbound = world.new_outbound()
    if from_snapshot:
        [indexed] = [e for e in logged_events if e.get("event") == "outbox-indexed"][-1:]
        assert (indexed["reused"], indexed["read"]) == (len(world.outbox), 0)


def test_restart_requeues_released_claims(tmp_path) -> None:
    """SPEC 4: an SMTA restarting with an entry left claimed releases it and notifies again."""
    world = World(tmp_path)
    [entry] = world.send([BOB])
    world.outbox.claim(entry.id)             # a retrieval in progress...
    world.outbound.stop()                    # ...when the process dies
    world.clock.advance(HOUR)
    world.outbound = world.new_outbound()
    world.settle()
    assert [n.gdel_id for n in world.peer.notifications] == [entry.id, entry.id]
    stored = world.outbox.get(entry.id)
    assert stored.state == NOTIFIED
    assert not stored.claimed
    assert stored.expires == START + 48 * HOUR


@pytest.mark.parametrize("snapshot", [False, True])
def test_restart_resumes_stored_next_attempt(tmp_path, logged_events, snapshot) -> None:
    """
    SPEC 5: timers resume from the stored next_attempt, not from the
    restart; also when the entries come from the snapshot (issue 17).
    """
    world = World(tmp_path, gdel=False)
    world.peer.deliver_reply = Reply(451, "4.3.0", "try later")
    [entry] = world.send([BOB])
    assert world.outbox.get(entry.id).next_attempt == START + 5 * MINUTE
    _restart(world, logged_events, 2 * MINUTE, snapshot)
    world.advance(3 * MINUTE - 1)
    assert world.attempts_to(MX1) == 1
    world.advance(1)
    assert world.attempts_to(MX1) == 2


@pytest.mark.parametrize("snapshot", [False, True])
def test_restart_keeps_expiry(tmp_path, logged_events, snapshot) -> None:
    """A notified entry keeps its stored expiry across a restart (from the snapshot too)."""
    world = World(tmp_path)
    [entry] = world.send([BOB])
    _restart(world, logged_events, 10 * HOUR, snapshot)
    world.advance(38 * HOUR - 1)
    assert world.bounces == []
    world.advance(1)
    assert len(world.bounces) == 1
    assert world.outbox.get(entry.id) is None


def test_an_outbox_read_in_the_background_is_timed_once_read(tmp_path) -> None:
    """Issue 17: the node greets while its outbox is read; the timers follow the read."""
    world = World(tmp_path)
    [entry] = world.send([BOB])
    world.outbound.stop()
    runner = HeldRunner()
    outbox = MaildirOutbox(tmp_path / "outbox", background=True)
    outbox._run_blocking = runner                      # the load waits; the writes do not
    world.outbound = world.new_outbound(outbox)
    assert_no_result(world.outbound.loaded)
    world.clock.advance(48 * HOUR)                     # past its expiry: nothing is timed yet
    assert world.bounces == []
    runner.run_all()
    result_of(world.outbound.loaded)
    world.settle()
    assert len(world.bounces) == 1                     # overdue: at once
    assert world.outbox.get(entry.id) is None


def test_restart_overdue_entries_run_at_once(tmp_path) -> None:
    world = World(tmp_path, gdel=False)
    world.outbound.stop()
    world.outbox.add([make_entry(id="Overdue_entry_000001", next_attempt=START - HOUR,
                                 created=START - 2 * HOUR)], MESSAGE)
    world.outbound = world.new_outbound()
    world.settle()
    assert world.outbox.get("Overdue_entry_000001") is None
    assert len(world.peer.deliveries) == 1


def test_a_large_outbox_joins_the_timer_a_slice_per_turn(tmp_path, monkeypatch, logged_events) -> None:
    """Issue 17: a million entries do not hold the reactor while they are timed."""
    monkeypatch.setattr(delivery, "TIMER_SLICE", 2)
    world = World(tmp_path, gdel=False)
    world.outbound.stop()
    for n in range(5):
        world.outbox.add([make_entry(id=f"Overdue_entry_{n:06d}", next_attempt=START - HOUR,
                                     created=START - 2 * HOUR)], MESSAGE)
    before = len(logged_events)
    world.outbound = world.new_outbound()

    def loaded() -> list:
        return [e for e in logged_events[before:] if "outbox loaded" in e.get("log_format", "")]

    assert loaded() == [] and world.clock.getDelayedCalls()   # 2 timed; the rest next turn
    world.settle()
    assert len(world.peer.deliveries) == 5
    assert loaded()


def test_flush(tmp_path) -> None:
    """flush makes every queued entry due now."""
    world = World(tmp_path, gdel=False)
    world.peer.deliver_reply = Reply(451, "4.3.0", "try later")
    [entry] = world.send([BOB])
    world.peer.deliver_reply = Reply(250, "2.0.0", "Ok")
    world.outbound.flush()
    world.settle()
    assert world.outbox.get(entry.id) is None


def test_delay_warning(tmp_path) -> None:
    """With delay_warning set, a notified entry not yet retrieved gets one 'delayed' DSN."""
    world = World(tmp_path, delay_warning=4 * HOUR)
    [entry] = world.send([BOB])
    world.advance(4 * HOUR - 1)
    assert world.bounces == []
    world.advance(1)
    [(to, message)] = world.bounces
    assert b"Action: delayed" in message
    assert world.outbox.get(entry.id).warned
    assert world.outbox.get(entry.id).state == NOTIFIED
    world.advance(44 * HOUR)
    assert len(world.bounces) == 2
    assert b"Action: failed" in world.bounces[1][1]
    assert world.outbox.get(entry.id) is None


def test_due_entries_of_one_domain_share_a_connection(tmp_path) -> None:
    """
    Messages for one domain that fall due together go over one connection,
    one transaction each (and one TLS handshake in real life), not one
    connection apiece.
    """
    world = World(tmp_path)
    for n in range(3):
        result_of(world.outbound.enqueue(f"QID{n}", SENDER, [BOB], MESSAGE))
    world.settle()
    assert world.attempts_to(MX1) == 1
    assert sorted(n.gdel_id for n in world.peer.notifications) == sorted(
        e.id for e in world.outbox.entries())
    assert {e.state for e in world.outbox.entries()} == {NOTIFIED}


def test_a_struggling_peer_leaves_the_rest_of_the_row_untried(tmp_path) -> None:
    """
    Notifications go pipelined, each GDEL with the next envelope; a 4xx to
    one GDEL ends the session: the transaction begun behind it is reset
    and, like the rest of the line, tried on a new session, counted once.
    """
    world = World(tmp_path)
    world.peer.notify_reply = Reply(451, "4.7.24", "SPF temporary error")
    for n in range(3):
        result_of(world.outbound.enqueue(f"QID{n}", SENDER, [BOB], MESSAGE))
    world.settle()
    assert len(world.peer.notifications) == 3
    assert world.attempts_to(MX1) == 3
    assert [e.attempts for e in world.outbox.entries()] == [1, 1, 1]
    assert {e.state for e in world.outbox.entries()} == {QUEUED}


def test_entry_waiting_in_line_is_retrievable_and_then_skipped(tmp_path) -> None:
    """
    An entry taken by a session but not yet on the wire is not "in flight"
    for RETR: a retrieval may claim it, and the session then skips it.
    """
    world = World(tmp_path)
    for n in range(2):
        result_of(world.outbound.enqueue(f"QID{n}", SENDER, [BOB], MESSAGE))
    world.clock.advance(0)                   # a session starts; nothing moved yet
    first, second = sorted(world.outbox.entries(), key=lambda e: e.queue_id)
    assert not world.outbound.in_flight(second.id)
    assert world.outbox.claim(second.id) is second
    world.settle()
    assert [n.gdel_id for n in world.peer.notifications] == [first.id]
    assert world.outbox.get(second.id).claimed


def test_transmitted_fires_once_the_outcome_is_recorded(tmp_path) -> None:
    """
    While a GDEL is on the wire the entry is in flight; transmitted() fires
    after its reply has been read and applied (the entry is notified), so a
    RETR that overtook the reply can go on at once.
    """
    world = World(tmp_path)
    result_of(world.outbound.enqueue("QID", SENDER, [BOB], MESSAGE))
    [entry] = world.outbox.entries()
    for _ in range(100):
        if world.outbound.in_flight(entry.id):
            break
        world.clock.advance(0)
        for pump in list(world.network.pumps):
            pump.pump()
    assert world.outbound.in_flight(entry.id)
    states = []
    world.outbound.transmitted(entry.id).addCallback(
        lambda _: states.append(world.outbox.get(entry.id).state))
    assert states == []
    world.settle()
    assert states == [NOTIFIED]
    assert world.outbound.transmitted(entry.id).called       # nothing in flight: at once


# -- SMTPUTF8 (RFC 6531 3.2) and CHUNKING (RFC 3030) -------------------------------------

UTF8_SENDER = "jösé@sender.example"


@pytest.mark.parametrize("gdel", [True, False])
def test_smtputf8_message_bounces_at_a_peer_without_it(tmp_path, gdel) -> None:
    """Never to a peer that does not offer SMTPUTF8: a 5.6.7 bounce, push or notification."""
    world = World(tmp_path, gdel=gdel, without={"SMTPUTF8"})
    [entry] = world.send([BOB], sender=UTF8_SENDER, smtputf8=True)
    assert world.peer.notifications == [] and world.peer.deliveries == []
    assert world.outbox.get(entry.id) is None
    [(to, message)] = world.bounces
    assert to == UTF8_SENDER
    assert_dsn(message, "5.6.7", BOB)


def test_smtputf8_message_goes_to_a_peer_offering_it(tmp_path) -> None:
    world = World(tmp_path, gdel=False)
    [entry] = world.send([BOB], sender=UTF8_SENDER, smtputf8=True)
    [delivery] = world.peer.deliveries
    assert delivery.envelope.sender == UTF8_SENDER
    assert "SMTPUTF8" in delivery.envelope.params
    assert world.bounces == []


def test_notification_says_smtputf8_and_keeps_the_rmta_s_offers(tmp_path) -> None:
    """SPEC 4: the turn may use what the RMTA offered with the notification."""
    world = World(tmp_path, without={"CHUNKING"})
    [entry] = world.send([BOB], sender=UTF8_SENDER, smtputf8=True)
    [notify] = world.peer.notifications
    assert "SMTPUTF8" in notify.envelope.params
    offers = world.outbox.get(entry.id).offers
    assert "SMTPUTF8" in offers and "CHUNKING" not in offers


def test_ascii_message_ignores_a_peer_without_smtputf8(tmp_path) -> None:
    world = World(tmp_path, gdel=False, without={"SMTPUTF8"})
    world.send([BOB])
    [delivery] = world.peer.deliveries
    assert "SMTPUTF8" not in delivery.envelope.params


@pytest.mark.parametrize("without, chunked", [(frozenset(), True), ({"CHUNKING"}, False)])
def test_push_uses_bdat_when_offered(tmp_path, without, chunked, logged_events) -> None:
    world = World(tmp_path, gdel=False, without=without)
    world.send([BOB])
    [delivery] = world.peer.deliveries
    assert b"".join(delivery.chunks) == b"".join(MESSAGE)
    verbs = {e.get("verb") for e in logged_events if e.get("event") == "reply"}
    assert ("BDAT" in verbs) is chunked and ("DATA" in verbs) is not chunked


# -- DSN (RFC 3461) ---------------------------------------------------------------------


def test_dsn_parameters_go_to_a_peer_offering_dsn(tmp_path) -> None:
    world = World(tmp_path, gdel=False)
    params = {"ret": "HDRS", "envid": "e1", "notify": {BOB: "SUCCESS"}}
    world.send([BOB, CAROL], dsn=params)
    [delivery] = world.peer.deliveries
    assert delivery.envelope.params == {"SIZE": "30", "RET": "HDRS", "ENVID": "e1"}
    assert delivery.envelope.rcpt_params == {BOB: {"notify": "SUCCESS"}}
    assert world.bounces == []     # the peer reports on success itself


def test_relayed_report_when_the_peer_has_no_dsn(tmp_path) -> None:
    world = World(tmp_path, gdel=False, without={"DSN"})
    world.send([BOB, CAROL], dsn={"notify": {BOB: "SUCCESS,FAILURE"}})
    [delivery] = world.peer.deliveries
    assert delivery.envelope.params == {"SIZE": "30"} and delivery.envelope.rcpt_params == {}
    [(to, report)] = world.bounces
    assert to == SENDER
    assert b"Action: relayed\r\nStatus: 2.0.0" in report
    assert f"Final-Recipient: rfc822; {CAROL}".encode() not in report


@pytest.mark.parametrize("notify, bounced", [(None, True), ("NEVER", False), ("SUCCESS", False),
                                             ("FAILURE", True)])
def test_failure_report_honours_notify(tmp_path, notify, bounced) -> None:
    world = World(tmp_path)
    world.peer.notify_reply = Reply(550, "5.7.23", "SPF validation failed")
    world.send([BOB], dsn={"notify": {BOB: notify}} if notify else None)
    assert bool(world.bounces) is bounced


def test_delay_warning_only_with_delay(tmp_path) -> None:
    """A notified message not yet retrieved: a warning for DELAY, none for FAILURE alone."""
    world = World(tmp_path, delay_warning=4 * HOUR)
    world.send([BOB, CAROL], dsn={"notify": {BOB: "DELAY,FAILURE", CAROL: "FAILURE"},
                                   "envid": "env+2D1", "orcpt": {BOB: "rfc822;b+40x"}})
    world.advance(5 * HOUR)
    [(to, warning)] = world.bounces
    assert b"Action: delayed" in warning
    assert f"Final-Recipient: rfc822; {BOB}".encode() in warning
    assert f"Final-Recipient: rfc822; {CAROL}".encode() not in warning
    assert b"Original-Envelope-Id: env-1" in warning
    assert b"Original-Recipient: rfc822; b@x" in warning


def test_ret_hdrs_returns_the_header_only(tmp_path) -> None:
    world = World(tmp_path)
    world.peer.notify_reply = Reply(550, "5.1.1", "No such user")
    world.send([BOB], dsn={"ret": "HDRS"})
    [(_, report)] = world.bounces
    assert b"text/rfc822-headers" in report and b"Hello Bob." not in report
