"""
Tests for L{pullmail.pull.retrieve.Retriever}: the RMTA's side of General
Delivery (SPEC 3-5).  The SMTA is a real MX server machine with a real
L{PickupCounter} over a L{MemoryOutbox}, on a L{FakeNetwork}; one L{Clock}
drives both.
"""

from __future__ import annotations

import pytest

from pathlib import Path

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pullmail.accounts.users import Accounts
from pullmail.config import DeliveryConfig
from pullmail.node.metrics import Metrics, MetricsObserver
from pullmail.outbound.delivery import Outbound
from pullmail.pull.retrieve import Retriever
from pullmail.pull.serve import PickupCounter
from pullmail.pull.verbs import Notify, Retrieve, pull_extension
from pullmail.smtp import replies
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.protocol import ConnectionLimits, SMTPServerFactory
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import ServerPolicy
from pullmail.storage.maildir import BlockingFsync
from pullmail.storage.outbox import NOTIFIED
from pullmail.storage.pending import PENDING, RETRIEVED, PendingStore
from pullmail.testing import (
    FakeNetwork,
    FakeResolver,
    FakeTrust,
    MemoryOutbox,
    make_entry,
    run_blocking,
)
from pullmail.trust.throttle import FailureTracker

START = 2_000_000.0
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
SCHEDULE = (0.0, 10 * MINUTE, HOUR, 6 * HOUR, DAY)
SMTA = "192.0.2.10"       # the notifying address, where the SMTA listens
RMTA = "192.0.2.25"       # the RMTA's address: an MX of receiver.example
GDEL_ID = "Retrievable_id_000001"
SENDER = "alice@sender.example"
BOB = "bob@receiver.example"
MESSAGE = b"Subject: pulled\r\n\r\nHello.\r\n"



class SMTANode:
    """The sending side: an outbox, a pickup counter, an MX listener."""

    def __init__(self, clock: Clock, network: FakeNetwork) -> None:
        self.clock = clock
        self.outbox = MemoryOutbox()
        self.resolver = FakeResolver(
            mx={"receiver.example": [(10, "mx.receiver.example")]},
            addresses={"mx.receiver.example": [RMTA]},
        )
        self.outbound = Outbound(
            outbox=self.outbox, resolver=self.resolver, connect=FakeNetwork(clock),
            clock=clock, run_blocking=run_blocking, hostname="mx.sender.example",
            config=DeliveryConfig(), send_bounce=lambda sender, message: None,
        )
        self.outbound.start()
        self.tracker = FailureTracker(clock, 100, HOUR, HOUR, 30.0)
        self.counter = PickupCounter(self.outbox, self.outbound, self.resolver, clock,
                                     self.tracker, run_blocking)
        self.retrs: list[str] = []
        policy = ServerPolicy(
            hostname="mx.sender.example", domains=("sender.example",),
            accounts=Accounts(frozenset({"sender.example"}), users={SENDER: "h"}),
            service="smtp",
        )
        self.factory = SMTPServerFactory(
            policy, clock, ConnectionLimits(100, 100), 300.0, {Retrieve: self.retrieve},
            extensions=(pull_extension(),),
        )
        network.listen(SMTA, 25, self.factory)

    def retrieve(self, connection, request: Retrieve):
        self.retrs.append(request.gdel_id)
        return self.counter(connection, request)

    def hold(self, gdel_id: str = GDEL_ID, recipients=(BOB,)) -> None:
        """An entry notified and waiting for RETR."""
        self.outbox.add([make_entry(id=gdel_id, sender=SENDER, recipients=list(recipients),
                                    state=NOTIFIED, notified_at=START, created=START,
                                    expires=START + 48 * HOUR, size=len(MESSAGE))],
                        [MESSAGE])
        self.outbound._push(self.outbox.get(gdel_id))


class World:
    def __init__(self, tmp_path, pending_per_origin: int = 100, trust=None) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.clock.advance(START)
        self.network = FakeNetwork(self.clock, source=RMTA)
        self.connect_times: list[float] = []
        self.smta = SMTANode(self.clock, self.network)
        self.trust = trust or FakeTrust()
        self.deliveries: list[tuple] = []
        self.deliver_reply = Reply(250, "2.0.0", "Ok: stored")
        self.pending_per_origin = pending_per_origin
        self.policy = ServerPolicy(
            hostname="mx.receiver.example", domains=("receiver.example",),
            accounts=Accounts(frozenset({"receiver.example"}), users={BOB: "h"}),
            service="smtp",
        )
        self.retriever = self.new_retriever()

    def connect(self, address: str, port: int, performers={}):
        self.connect_times.append(self.clock.seconds() - START)
        return self.network(address, port, performers)

    def deliver(self, session, envelope, chunks, size, queue_id=None, identity=None):
        self.deliveries.append((session, envelope, b"".join(chunks), size))
        return defer.succeed(self.deliver_reply)

    def new_retriever(self) -> Retriever:
        self.store = PendingStore(self.tmp_path / "pending")
        retriever = Retriever(
            store=self.store, trust=self.trust, connect=self.connect, clock=self.clock,
            run_blocking=run_blocking, hostname="mx.receiver.example", schedule=SCHEDULE,
            remote_port=25, keep_for=48 * HOUR, pending_per_origin=self.pending_per_origin,
            policy=self.policy, deliver=self.deliver,
        )
        retriever.start()
        return retriever

    def notify(self, gdel_id: str = GDEL_ID, sender: str | None = SENDER, recipients=(BOB,),
               peer: str = SMTA, esmtp: bool = True) -> Reply:
        session = Session(peer, "smtp", helo="mx.sender.example", esmtp=esmtp)
        envelope = Envelope(sender, tuple(recipients), len(MESSAGE)) if sender else None
        found = []
        self.retriever(object(), Notify(session, envelope, gdel_id)).addBoth(found.append)
        assert found, "notify did not answer synchronously with the fakes"
        return found[0]

    def settle(self) -> None:
        self.network.settle()

    def advance(self, seconds: float) -> None:
        self.network.advance(seconds)

    def step_to(self, offset: float) -> None:
        """Advance to START + offset, one due timer at a time."""
        while self.clock.seconds() < START + offset:
            calls = [c.getTime() for c in self.clock.getDelayedCalls()]
            upcoming = [t for t in calls if t > self.clock.seconds()]
            target = min(upcoming + [START + offset])
            self.advance(target - self.clock.seconds())


# -- notifications --------------------------------------------------------------------


def test_trust_refusal_passes_through(tmp_path) -> None:
    """The trust check's refusal is the reply; nothing is stored."""
    world = World(tmp_path, trust=FakeTrust({"sender.example": replies.S550_SPF_FAIL}))
    assert world.notify() == replies.S550_SPF_FAIL
    assert world.trust.calls == [(SMTA, "sender.example", "mx.sender.example", SENDER)]
    assert len(world.store) == 0
    world.settle()
    assert world.connect_times == []


def test_trust_temporary_refusal(tmp_path) -> None:
    world = World(tmp_path, trust=FakeTrust(default=replies.S451_SPF_TEMPERROR))
    assert world.notify() == replies.S451_SPF_TEMPERROR
    assert len(world.store) == 0


def test_bare_form_identity_is_helo(tmp_path) -> None:
    """SPEC 3: the bare form is checked against the EHLO domain."""
    world = World(tmp_path)
    assert world.notify(sender=None).code == 250
    assert world.trust.calls == [(SMTA, "mx.sender.example", "mx.sender.example", None)]
    [notification] = list(world.store)
    assert notification.sender is None and notification.recipients is None


def test_accepted_and_stored(tmp_path) -> None:
    """Accepted: stored durably, then '250 2.0.0 <id> notification accepted'."""
    world = World(tmp_path)
    world.network.stop_listening(SMTA, 25)  # keep it pending
    assert world.notify() == Reply(250, "2.0.0", f"{GDEL_ID} notification accepted")
    stored = PendingStore(tmp_path / "pending")
    stored.load()
    notification = stored.get("sender.example", GDEL_ID)
    assert notification.peer == SMTA
    assert notification.sender == SENDER
    assert notification.recipients == [BOB]
    assert notification.notified_at == START
    assert notification.size == len(MESSAGE)


@pytest.mark.parametrize("esmtp", [True, False])
def test_kept_whether_the_notifier_saw_our_extensions(tmp_path, esmtp) -> None:
    """SPEC 4: after HELO the SMTA saw no EHLO keywords, so its turn may use none."""
    world = World(tmp_path)
    world.network.stop_listening(SMTA, 25)
    world.notify(esmtp=esmtp)
    stored = PendingStore(tmp_path / "pending")
    stored.load()
    assert stored.get("sender.example", GDEL_ID).esmtp is esmtp


def test_stored_through_store_file_before_the_reply(tmp_path) -> None:
    """
    With store_file (the fsync helper's store), the record goes out as one
    request: a fresh temporary, the record's name, its JSON; no 250 before
    that request has finished, and a crash's leftover temporary is swept.
    """
    world = World(tmp_path)
    world.network.stop_listening(SMTA, 25)
    requests = []

    def store_file(temporary, final, data):
        d = defer.Deferred()
        requests.append((temporary, final, data, d))
        return d

    world.retriever = _retriever_with(world, None, store_file=store_file)
    session = Session(SMTA, "smtp", helo="mx.sender.example", esmtp=True)
    answers = []
    world.retriever(object(), Notify(session, Envelope(SENDER, (BOB,), len(MESSAGE)), GDEL_ID)
                    ).addBoth(answers.append)
    [(temporary, final, data, d)] = requests
    assert answers == []
    assert temporary.startswith(str(tmp_path / "pending" / ".")) and temporary.endswith(".tmp")
    assert final.endswith(".json") and final.startswith(str(tmp_path / "pending"))
    BlockingFsync().store(temporary, final, data)
    open(str(tmp_path / "pending" / ".leftover.1.2.tmp"), "wb").close()
    d.callback(None)
    assert answers == [Reply(250, "2.0.0", f"{GDEL_ID} notification accepted")]
    stored = PendingStore(tmp_path / "pending")
    stored.load()
    assert stored.get("sender.example", GDEL_ID).recipients == [BOB]
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == [Path(final).name]


def test_same_id_again(tmp_path) -> None:
    """SPEC 3: the same id from the same origin: 250 again, one record."""
    world = World(tmp_path)
    world.network.stop_listening(SMTA, 25)
    assert world.notify().code == 250
    assert world.notify().code == 250
    assert len(world.store) == 1
    assert world.store.pending_from(SMTA) == 1


def test_pending_cap(tmp_path) -> None:
    """SPEC 3: too many pending notifications from this origin: 452 4.3.1."""
    world = World(tmp_path, pending_per_origin=2)
    world.network.stop_listening(SMTA, 25)
    assert world.notify("Pending_id_0000000001").code == 250
    assert world.notify("Pending_id_0000000002").code == 250
    reply = world.notify("Pending_id_0000000003")
    assert (reply.code, reply.enhanced) == (452, "4.3.1")
    assert len(world.store) == 2
    # An id already pending is still answered 250.
    assert world.notify("Pending_id_0000000001").code == 250


def _gdel_over_the_wire(world: World, gdel_id: str) -> bytes:
    """One notification through a real MX connection whose Notify performer is the Retriever."""
    factory = SMTPServerFactory(
        world.policy, world.clock, ConnectionLimits(100, 100), 300.0,
        {Notify: world.retriever}, extensions=(pull_extension(),),
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", SMTA, 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO mx.sender.example\r\n")
    transport.clear()
    protocol.dataReceived(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{BOB}>\r\n"
                          f"GDEL {gdel_id}\r\n".encode())
    return transport.value().splitlines()[-1]


@pytest.mark.parametrize("trust, cap, refusal", [
    (FakeTrust({"sender.example": replies.S550_SPF_FAIL}), 5, replies.S550_SPF_FAIL),
    (FakeTrust(default=replies.S451_SPF_TEMPERROR), 5, replies.S451_SPF_TEMPERROR),
    (FakeTrust(), 0, replies.S452_TOO_MANY_PENDING),
])
def test_refused_gdel_is_one_log_event_counted_twice(tmp_path, logged_events, trust, cap,
                                                     refusal) -> None:
    """
    Stop 12: a refused GDEL is one event, notification-refused, carrying
    command-rejected's fields too; the metrics count it as a GDEL verdict
    and as a reply code, as they did from the two events.
    """
    world = World(tmp_path, trust=trust, pending_per_origin=cap)
    world.network.stop_listening(SMTA, 25)
    assert _gdel_over_the_wire(world, GDEL_ID) == refusal.render()[:-2]
    said = [e for e in logged_events
            if e.get("event") in ("notification-refused", "command-rejected")]
    assert [e["event"] for e in said] == ["notification-refused"]
    [event] = said
    assert (event["id"], event["peer"], event["identity"], event["verb"], event["code"],
            event["reply"]) == (GDEL_ID, SMTA, "sender.example", "GDEL", refusal.code,
                                str(refusal))
    metrics = Metrics()
    observer = MetricsObserver(metrics)
    for logged in logged_events:
        observer(logged)
    counted = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in metrics.registry.collect() for s in family.samples
               if s.name.endswith("_total") and s.value}
    verdict = "deferred" if refusal.transient else "refused"
    assert counted[("pullmail_gdel_total", (("verdict", verdict),))] == 1
    assert counted[("pullmail_replies_total", (("code", str(refusal.code)),))] == 1


def test_other_refusals_still_logged_as_rejected_commands(tmp_path, logged_events) -> None:
    """A GDEL the machine refuses itself (a bad id) never reaches the Retriever."""
    world = World(tmp_path)
    assert _gdel_over_the_wire(world, "bad!").startswith(b"501 5.5.4")
    [event] = [e for e in logged_events
               if e.get("event") in ("notification-refused", "command-rejected")]
    assert (event["event"], event["verb"], event["code"]) == ("command-rejected", "GDEL", 501)


# -- the schedule ---------------------------------------------------------------------


def test_schedule_offsets(tmp_path) -> None:
    """SPEC 5: attempts at 0, 10 min, 1 h, 6 h, 24 h; then the notification is dropped."""
    world = World(tmp_path)
    world.network.stop_listening(SMTA, 25)
    world.notify()
    world.settle()
    for offset in SCHEDULE[1:]:
        world.step_to(offset - 1)
        assert world.connect_times[-1] < offset
        world.step_to(offset)
        assert world.connect_times[-1] == offset
    assert world.connect_times == list(SCHEDULE)
    assert len(world.store) == 0
    world.advance(10 * DAY)
    assert world.connect_times == list(SCHEDULE)


def test_temporary_refusal_of_retr_follows_schedule(tmp_path) -> None:
    """A 451 to RETR (retrieval in progress elsewhere) waits for the next slot."""
    world = World(tmp_path)
    world.smta.hold()
    world.smta.outbox.claim(GDEL_ID)
    world.notify()
    world.settle()
    assert world.smta.retrs == [GDEL_ID]
    notification = world.store.get("sender.example", GDEL_ID)
    assert notification.state == PENDING
    assert notification.next_attempt == START + 10 * MINUTE
    assert notification.attempts == 1


def test_permanent_refusal_of_retr_drops(tmp_path) -> None:
    """SPEC 5: a 5xx to RETR drops the notification at once."""
    world = World(tmp_path)
    world.notify("Unknown_at_the_smta_01")
    world.settle()
    world.advance(1)  # the SMTA's tarpit
    assert world.smta.retrs == ["Unknown_at_the_smta_01"]
    assert len(world.store) == 0
    world.advance(DAY)
    assert world.smta.retrs == ["Unknown_at_the_smta_01"]


def test_resume_after_restart(tmp_path) -> None:
    """SPEC 5: a restarted RMTA keeps the stored next_attempt."""
    world = World(tmp_path)
    world.network.stop_listening(SMTA, 25)
    world.notify()
    world.settle()
    assert world.connect_times == [0.0]
    world.retriever.stop()
    world.advance(4 * MINUTE)
    world.retriever = world.new_retriever()
    world.advance(6 * MINUTE - 1)
    assert world.connect_times == [0.0]
    world.advance(1)
    assert world.connect_times == [0.0, 10 * MINUTE]


def test_no_retr_offered(tmp_path) -> None:
    """A peer that does not offer RETR: the attempt failed, try later."""
    world = World(tmp_path)
    world.smta.factory.extensions = ()
    world.notify()
    world.settle()
    notification = world.store.get("sender.example", GDEL_ID)
    assert notification.attempts == 1
    assert notification.next_attempt == START + 10 * MINUTE


# -- retrieval ------------------------------------------------------------------------


def test_retrieval(tmp_path) -> None:
    """Notified, retrieved at once, delivered, the SMTA's entry removed."""
    world = World(tmp_path)
    world.smta.hold()
    world.notify()
    world.settle()
    [(session, envelope, data, size)] = world.deliveries
    assert data == MESSAGE
    assert envelope.sender == SENDER and envelope.recipients == (BOB,)
    assert session.peer == SMTA
    assert world.smta.outbox.get(GDEL_ID) is None
    notification = world.store.get("sender.example", GDEL_ID)
    assert notification.state == RETRIEVED
    assert notification.keep_until == START + 48 * HOUR
    assert world.network.open_connections() == 0


def test_retrieved_not_counted_as_pending(tmp_path) -> None:
    """A retrieved notification no longer counts toward pending_per_origin."""
    world = World(tmp_path, pending_per_origin=1)
    world.smta.hold()
    world.notify()
    world.settle()
    # Whatever the turn's fate, the message was delivered and marked retrieved.
    assert world.store.get("sender.example", GDEL_ID).state == RETRIEVED
    assert world.store.pending_from(SMTA) == 0
    assert world.notify("Another_id_0000000001").code == 250


def test_due_ids_of_one_address_share_few_connections(tmp_path) -> None:
    """
    Due ids of one address are spread over at most CONNECTIONS_PER_PEER
    connections, several RETRs each; every id is retrieved once.
    """
    from pullmail.pull.retrieve import CONNECTIONS_PER_PEER

    world = World(tmp_path)
    ids = [f"Retrievable_id_{n:06d}" for n in range(10)]
    for gdel_id in ids:
        world.smta.hold(gdel_id)
    world.network.stop_listening(SMTA, 25)
    for gdel_id in ids:
        world.notify(gdel_id)
    world.settle()
    first_round = len(world.connect_times)
    world.network.listen(SMTA, 25, world.smta.factory)
    world.advance(10 * MINUTE)
    later = world.connect_times[first_round:]
    # Ids waiting beyond what the open connections will take next open more.
    assert 1 < len(later) <= CONNECTIONS_PER_PEER
    assert set(later) == {10 * MINUTE}
    assert sorted(world.smta.retrs) == sorted(ids)
    assert len(world.deliveries) == len(ids)


def test_renotified_retrieved_id_delivered_once(tmp_path) -> None:
    """
    SPEC 4: an id retrieved before and notified again (the SMTA restarted) is
    retrieved again -- so the SMTA can let go -- but delivered only once.
    """
    world = World(tmp_path)
    world.smta.hold()
    world.notify()
    world.settle()
    assert len(world.deliveries) == 1
    world.smta.hold()             # the SMTA lost track, and notifies again
    assert world.notify().code == 250
    world.settle()
    assert world.smta.retrs == [GDEL_ID, GDEL_ID]
    assert world.smta.outbox.get(GDEL_ID) is None
    assert len(world.deliveries) == 1


def test_notified_again_during_its_retrieval_is_retrieved_once_more(tmp_path) -> None:
    """
    SPEC 4 in a cluster: another node of the SMTA (whose colleague's lease
    ran out) notifies the id again while it is being retrieved.  That GDEL
    is answered 250, so the RMTA retrieves once more after the transfer, so
    that the re-notifier, still holding the row, sees a 250 and lets go;
    a copy would be dropped as a duplicate.  (Here one SMTA plays both
    nodes: having let go after the first transfer, it refuses the second.)
    """
    world = World(tmp_path)
    world.smta.hold()
    first_deliver = world.deliver

    def deliver_while_notified_again(*args, **kwargs):
        assert world.notify().code == 250
        world.retriever.deliver = first_deliver
        return first_deliver(*args, **kwargs)

    world.retriever.deliver = deliver_while_notified_again
    world.notify()
    world.settle()
    world.advance(1)
    world.settle()
    assert world.smta.retrs == [GDEL_ID, GDEL_ID]
    assert len(world.deliveries) == 1


def test_retrieved_record_forgotten_after_keep_for(tmp_path) -> None:
    world = World(tmp_path)
    world.smta.hold()
    world.notify()
    world.settle()
    world.advance(48 * HOUR)
    assert len(world.store) == 0


def test_deferred_delivery_retries(tmp_path) -> None:
    """A 4xx at end-of-data: the notification stays pending for the next slot."""
    world = World(tmp_path)
    world.deliver_reply = replies.S451_LOCAL_ERROR
    world.smta.hold()
    world.notify()
    world.settle()
    world.advance(300)  # with the turn stuck, the SMTA's idle timer ends it
    notification = world.store.get("sender.example", GDEL_ID)
    assert notification.state == PENDING
    assert notification.next_attempt == START + 10 * MINUTE
    assert world.smta.outbox.get(GDEL_ID) is not None
    assert not world.smta.outbox.get(GDEL_ID).claimed


def test_falls_back_to_origin_mx_hosts_that_pass_spf(tmp_path) -> None:
    """
    SPEC 4: when the notifying address does not answer, the RMTA may try
    the origin domain's MX hosts whose addresses pass the same SPF check --
    and never any address that does not.
    """
    world = World(tmp_path)
    world.smta.hold()
    stranger, down = "192.0.2.99", "192.0.2.11"
    resolver = FakeResolver(
        mx={"sender.example": [(10, "mx2.sender.example"), (20, "mx.sender.example")]},
        addresses={"mx2.sender.example": [stranger], "mx.sender.example": [SMTA]},
    )
    checked = []

    def authorised(address, sender):
        checked.append((address, sender))
        return defer.succeed(address == SMTA)

    world.retriever.stop()
    world.retriever = Retriever(
        store=world.store, trust=world.trust, connect=world.connect, clock=world.clock,
        run_blocking=run_blocking, hostname="mx.receiver.example", schedule=SCHEDULE,
        remote_port=25, keep_for=48 * HOUR, pending_per_origin=100, policy=world.policy,
        deliver=world.deliver, resolver=resolver, sender_authorised=authorised,
    )
    world.retriever.start()
    assert world.notify(peer=down).code == 250
    world.settle()
    assert world.network.attempts[0] == (down, 25)
    assert (stranger, 25) not in world.network.attempts      # failed SPF: never contacted
    assert (stranger, "postmaster@sender.example") in checked
    assert world.smta.retrs == [GDEL_ID]
    assert len(world.deliveries) == 1


def _retriever_with(world, delivered_of, **settings) -> Retriever:
    world.retriever.stop()
    retriever = Retriever(
        store=world.store, trust=world.trust, connect=world.connect, clock=world.clock,
        run_blocking=run_blocking, hostname="mx.receiver.example", schedule=SCHEDULE,
        remote_port=25, keep_for=48 * HOUR, pending_per_origin=100, policy=world.policy,
        deliver=world.deliver, delivered_of=delivered_of, **settings,
    )
    retriever.start()
    return retriever


def _mailboxes(asked: list, holding: bool):
    """A Router.delivered_of that records each question; every id is found, or none."""
    def delivered_of(wanted):
        asked.append({queue_id: tuple(recipients) for queue_id, recipients in wanted.items()})
        return set(wanted) if holding else set()

    return delivered_of


def test_delivery_takes_no_extra_write_and_a_stable_queue_id(tmp_path) -> None:
    """
    Exactly once without a write before each delivery: the record on disk
    is still the notification's when the message is stored (a crash then
    leaves it pending, and records read at start-up are checked: below),
    and the message is stored under a queue id that is the same on every
    retry.
    """
    import json

    world = World(tmp_path)
    world.smta.hold()
    seen = []

    def deliver(session, envelope, chunks, size, queue_id=None, identity=None):
        [record] = [json.loads(p.read_bytes()) for p in (tmp_path / "pending").glob("*.json")]
        seen.append((record["state"], "delivering" in record, queue_id))
        return defer.succeed(Reply(250, "2.0.0", "Ok"))

    world.deliver = deliver
    world.retriever = _retriever_with(world, lambda wanted: set())
    world.notify()
    world.settle()
    notification = world.store.get("sender.example", GDEL_ID)
    assert seen == [(PENDING, False, notification.queue_id)]
    assert notification.state == RETRIEVED


def test_records_read_at_start_up_are_checked_before_storing(tmp_path) -> None:
    """
    A pending record read at start-up may be one whose delivery the dead
    process had begun: its retrieval looks in the mailboxes first.
    """
    world = World(tmp_path)
    world.smta.hold()
    world.notify()                          # on disk: pending, never marked
    asked = []
    world.retriever = _retriever_with(world, _mailboxes(asked, holding=True))    # the restart
    world.settle()
    notification = world.store.get("sender.example", GDEL_ID)
    # once at start-up, once more before storing (found the first time)
    assert asked == [{notification.queue_id: (BOB,)}] * 2
    assert world.deliveries == []
    assert notification.state == RETRIEVED


def test_start_up_looks_once_for_all_records(tmp_path) -> None:
    """
    Many pending records at start-up: one question covers them all (each
    mailbox is listed once), and those whose message is nowhere are then
    delivered without another look.
    """
    world = World(tmp_path)
    ids = [f"Pending_id_{i:010}" for i in range(5)]
    for gdel_id in ids:
        world.smta.hold(gdel_id)
        world.notify(gdel_id)
    queue_ids = {world.store.get("sender.example", g).queue_id for g in ids}
    asked = []
    world.retriever = _retriever_with(world, _mailboxes(asked, holding=False))    # the restart
    assert asked == [{queue_id: (BOB,) for queue_id in queue_ids}]
    world.settle()
    assert len(asked) == 1
    assert len(world.deliveries) == 5
    assert all(world.store.get("sender.example", g).state == RETRIEVED for g in ids)


def test_a_retry_in_the_same_process_looks_first(tmp_path) -> None:
    """A delivery that failed after it began: the next attempt looks before storing."""
    world = World(tmp_path)
    asked = []
    world.retriever = _retriever_with(world, _mailboxes(asked, holding=False))
    world.deliver_reply = replies.S451_LOCAL_ERROR
    world.smta.hold()
    world.notify()
    world.settle()
    world.advance(300)                      # the stuck turn ends on the SMTA's idle timer
    assert asked == [] and len(world.deliveries) == 1   # fresh: nothing to look for
    world.deliver_reply = Reply(250, "2.0.0", "Ok: stored")
    world.advance(SCHEDULE[1])
    notification = world.store.get("sender.example", GDEL_ID)
    assert asked == [{notification.queue_id: (BOB,)}]
    assert notification.state == RETRIEVED


def test_retry_after_a_crash_finds_the_stored_copy(tmp_path) -> None:
    """
    A notification whose delivery began before a crash (marked
    'delivering', not yet 'retrieved') is retrieved again so the SMTA can let
    go, but if the mailbox already holds its message it is not stored twice.
    """
    world = World(tmp_path)
    world.smta.hold()
    asked = []
    world.retriever = _retriever_with(world, _mailboxes(asked, holding=True))
    world.notify()
    notification = world.store.get("sender.example", GDEL_ID)
    notification.delivering = True          # as left on disk by the crashed run
    world.store.save(notification)
    world.settle()
    assert world.deliveries == []           # not stored again
    assert asked == [{notification.queue_id: (BOB,)}]
    assert world.smta.retrs == [GDEL_ID]    # but retrieved, so the SMTA sees its 250
    assert world.store.get("sender.example", GDEL_ID).state == RETRIEVED


# -- one record write on the reply's path ---------------------------------------------------


def _deferred_store_file(requests: list):
    def store_file(temporary, final, data):
        d = defer.Deferred()
        requests.append((temporary, final, data, d))
        return d
    return store_file


def _notify_later(world, gdel_id: str = GDEL_ID) -> list:
    """Notify; the reply lands in the list returned once the record is written."""
    answers: list = []
    session = Session(SMTA, "smtp", helo="mx.sender.example", esmtp=True)
    world.retriever(object(), Notify(session, Envelope(SENDER, (BOB,), len(MESSAGE)), gdel_id)
                    ).addBoth(answers.append)
    return answers


def _land(requests: list, index: int) -> None:
    temporary, final, data, d = requests[index]
    BlockingFsync().store(temporary, final, data)
    d.callback(None)


def _retrieved_with_writes_held(tmp_path, delivered_of):
    """
    A notification whose record write lands, then its retrieval and
    delivery; record writes after that are held (see L{_land}).
    """
    world = World(tmp_path)
    world.smta.hold()
    requests: list = []
    world.retriever = _retriever_with(world, delivered_of,
                                      store_file=_deferred_store_file(requests))
    _notify_later(world)
    _land(requests, 0)                       # the notification's record: then 250
    world.settle()
    assert len(world.deliveries) == 1
    return world, requests


def test_one_durable_write_per_retrieved_message(tmp_path) -> None:
    """
    With searchable mailboxes a retrieved message costs one durable record
    write, the notification's: the mark "retrieved" is a hint beside the
    record (the stored copy is the proof), read back at start-up.  A later
    durable write of the record (a re-notification) removes the mark first.
    """
    import json

    world, requests = _retrieved_with_writes_held(tmp_path, lambda wanted: set())
    assert world.smta.outbox.get(GDEL_ID) is None          # the SMTA had its 250
    assert len(requests) == 1
    notification = world.store.get("sender.example", GDEL_ID)
    assert notification.state == RETRIEVED and world.store.pending_from(SMTA) == 0
    mark = tmp_path / "pending" / f"{notification.key}.retrieved"
    assert float(mark.read_text()) == START + 48 * HOUR
    again = PendingStore(tmp_path / "pending")
    again.load()
    assert again.get("sender.example", GDEL_ID).state == RETRIEVED
    assert again.get("sender.example", GDEL_ID).keep_until == START + 48 * HOUR
    # Notified again: the mark goes before the record's durable write.
    world.smta.hold()
    answers = _notify_later(world)
    assert not mark.exists() and len(requests) == 2
    _land(requests, 1)
    assert answers[0].code == 250
    assert json.loads(Path(requests[1][1]).read_bytes())["state"] == "pending"
    again.load()
    assert again.get("sender.example", GDEL_ID).state == PENDING


def test_retrieved_mark_before_the_250_without_searchable_mailboxes(tmp_path) -> None:
    """An LMTP store cannot be searched for a copy: the mark must land before the 250."""
    world, requests = _retrieved_with_writes_held(tmp_path, None)
    assert len(requests) == 2
    assert world.smta.outbox.get(GDEL_ID) is not None     # no 250 yet
    _land(requests, 1)
    world.settle()
    assert world.smta.outbox.get(GDEL_ID) is None


def test_a_crash_before_the_mark_lands_drops_the_copy(tmp_path) -> None:
    """
    kill -9 after the 250, before the mark is written: the record says
    pending; at start-up the mailboxes are searched, and the retrieval the
    SMTA's re-notification brings is answered 250 with the copy dropped.
    """
    world, requests = _retrieved_with_writes_held(tmp_path, lambda wanted: set())
    for mark in (tmp_path / "pending").glob("*.retrieved"):
        mark.unlink()                                           # the mark was lost
    world.smta.hold()                 # the SMTA, restarted too, notifies again
    asked: list = []
    world.retriever = _retriever_with(world, _mailboxes(asked, holding=True))   # the restart
    assert world.notify().code == 250
    world.settle()
    assert len(world.deliveries) == 1
    assert world.smta.outbox.get(GDEL_ID) is None
    assert world.store.get("sender.example", GDEL_ID).state == RETRIEVED


def test_a_retrieval_connection_idles_for_the_next_notification(tmp_path) -> None:
    """
    SPEC 4 "RETR <next-id> or QUIT": a notification that comes while the
    last retrieval connection to its address idles is retrieved over it.
    """
    world = World(tmp_path)
    world.retriever = _retriever_with(world, None, connection_cache_time=2.0)
    world.smta.hold()
    world.smta.hold("Retrievable_id_000002")
    world.notify()
    world.settle()
    world.advance(1.0)
    world.notify("Retrievable_id_000002")
    world.settle()
    assert world.connect_times == [0.0]
    assert world.smta.retrs == [GDEL_ID, "Retrievable_id_000002"]
    assert len(world.deliveries) == 2
    assert world.network.open_connections() == 1
    world.advance(2.0)
    assert world.network.open_connections() == 0


def test_a_notification_accepted_at_t_is_retrieved_at_t(tmp_path) -> None:
    """
    Issue 17 (latency at light load): the schedule's first attempt is at
    0 s, so a notification accepted at t, a fraction of a second past a
    whole one, is retrieved and delivered at t -- in the reactor turns
    that follow its reply, with no timer tick, batching wait or retry
    delay between -- over a new connection and over an idling one alike.
    """
    world = World(tmp_path)
    world.retriever = _retriever_with(world, None, connection_cache_time=2.0)
    delivered_at = []
    deliver = world.deliver

    def timed(*args, **kwargs):
        delivered_at.append(world.clock.seconds() - START)
        return deliver(*args, **kwargs)

    world.retriever.deliver = timed
    world.smta.hold()
    world.smta.hold("Retrievable_id_000002")
    world.clock.advance(0.37)
    world.notify()
    world.settle()
    assert world.connect_times == pytest.approx([0.37], abs=1e-6)
    assert delivered_at == pytest.approx([0.37], abs=1e-6)
    world.clock.advance(0.91)      # the connection idles meanwhile
    world.notify("Retrievable_id_000002")
    world.settle()
    assert world.connect_times == pytest.approx([0.37], abs=1e-6)
    assert delivered_at == pytest.approx([0.37, 1.28], abs=1e-6)
    assert world.smta.retrs == [GDEL_ID, "Retrievable_id_000002"]


def test_notified_again_during_its_retrieval_is_written_durably_not_marked(tmp_path) -> None:
    """
    Delivered while notified again: the record is pending once more, and
    that is written durably (a lost write would lose the retrieval the
    re-notifier waits for) -- never a mark "retrieved".
    """
    import json

    world = World(tmp_path)
    world.smta.hold()
    requests: list = []
    world.retriever = _retriever_with(world, lambda wanted: set(),
                                      store_file=_deferred_store_file(requests))
    first_deliver = world.deliver

    def deliver_while_notified_again(*args, **kwargs):
        _notify_later(world)            # the existing record: no write, answered at once
        world.retriever.deliver = first_deliver
        return first_deliver(*args, **kwargs)

    world.retriever.deliver = deliver_while_notified_again
    _notify_later(world)
    _land(requests, 0)
    world.settle()
    assert len(world.deliveries) == 1
    assert len(requests) == 2                                   # durable, and waited for
    assert json.loads(requests[1][2])["state"] == "pending"
    assert list((tmp_path / "pending").glob("*.retrieved")) == []
    assert world.smta.outbox.get(GDEL_ID) is not None           # no 250 before it lands
    _land(requests, 1)
    world.settle()
    assert world.smta.outbox.get(GDEL_ID) is None
