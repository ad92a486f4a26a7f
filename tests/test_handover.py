"""
Tests for L{pullmail.pull.handover}: retrieved mail handed to a store that
cannot be searched (LMTP) is marked, durably, before the store sees it;
the mark is gone once the store answered; a retrieval that finds the mark
of a delivery cut off keeps the copy aside instead of delivering it twice.
Over test_retrieval's world (a fake SMTA on a FakeNetwork, a Clock).
"""

from __future__ import annotations

import json

from twisted.internet import defer

from pullmail import maillog
from pullmail.pull.handover import S250_KEPT_ASIDE
from pullmail.pull.retrieve import Retriever
from pullmail.smtp import replies
from pullmail.smtp.replies import Reply
from pullmail.storage.pending import PENDING, RETRIEVED
from pullmail.testing import run_blocking
from tests.test_retrieval import BOB, GDEL_ID, HOUR, SCHEDULE, START, World


class LMTPWorld(World):
    """The receiving side delivers to a store it cannot search (LMTP)."""

    def new_retriever(self) -> Retriever:
        from pullmail.storage.pending import PendingStore

        self.store = PendingStore(self.tmp_path / "pending")
        retriever = Retriever(
            store=self.store, trust=self.trust, connect=self.connect, clock=self.clock,
            run_blocking=run_blocking, hostname="mx.receiver.example", schedule=SCHEDULE,
            remote_port=25, keep_for=48 * HOUR, pending_per_origin=100, policy=self.policy,
            deliver=lambda *a, **kw: self.deliver(*a, **kw), delivered_of=lambda wanted: set(),
            in_doubt=self.tmp_path / "in-doubt",
        )
        retriever.start()
        return retriever

    def record(self) -> dict:
        [record] = [json.loads(p.read_bytes()) for p in (self.tmp_path / "pending").glob("*.json")]
        return record


def test_the_mark_is_durable_before_the_store_sees_the_message(tmp_path) -> None:
    world = LMTPWorld(tmp_path)
    world.smta.hold()
    seen = []

    def deliver(session, envelope, chunks, size, queue_id=None, identity=None):
        record = world.record()
        seen.append((record["state"], record["handed_over"]))
        return defer.succeed(Reply(250, "2.0.0", "Ok"))

    world.deliver = deliver
    world.notify()
    world.settle()
    assert seen == [(PENDING, START)]
    assert (world.record()["state"], world.record()["handed_over"]) == (RETRIEVED, 0.0)
    assert world.smta.outbox.get(GDEL_ID) is None


def test_a_store_that_answered_4xx_leaves_no_doubt(tmp_path) -> None:
    """The outcome is known: the next attempt delivers, it does not keep aside."""
    world = LMTPWorld(tmp_path)
    world.deliver_reply = replies.S451_LOCAL_ERROR
    world.smta.hold()
    world.notify()
    world.settle()
    world.advance(300)
    assert (world.record()["state"], world.record()["handed_over"]) == (PENDING, 0.0)
    world.deliver_reply = Reply(250, "2.0.0", "Ok")
    world.advance(10 * 60)
    world.settle()
    assert len(world.deliveries) == 2 and not (tmp_path / "in-doubt").exists()


def test_a_delivery_cut_off_is_kept_aside_not_repeated(tmp_path, logged_events) -> None:
    """
    The record says a delivery began and never ended (the process died in
    it): retrieved again, the message is not delivered but kept aside with
    its envelope, logged, and the SMTA hears 250 and lets go.
    """
    world = LMTPWorld(tmp_path)
    world.smta.hold()
    cut_off = []

    def die(session, envelope, chunks, size, queue_id=None, identity=None):
        cut_off.append(queue_id)
        return defer.Deferred()   # the store's reply never comes

    world.deliver = die
    world.notify()
    world.settle()
    assert world.record()["handed_over"]
    world.retriever.stop()
    # The node restarted (its records read back), the SMTA still holding
    # the message (no 250 came): a world of its own over the same folders.
    world = LMTPWorld(tmp_path)
    world.smta.hold()
    world.settle()
    world.advance(10 * 60)
    world.settle()
    assert world.deliveries == []
    [kept] = (tmp_path / "in-doubt").iterdir()
    assert kept.name == f"{cut_off[0]}.eml"
    assert kept.read_bytes().startswith(
        f"X-Pullmail-In-Doubt: {GDEL_ID} from 192.0.2.10\r\n"
        f"X-Pullmail-Envelope-From: <alice@sender.example>\r\n"
        f"X-Pullmail-Envelope-To: {BOB}\r\n".encode())
    assert (world.record()["state"], world.record()["handed_over"]) == (RETRIEVED, 0.0)
    assert world.smta.outbox.get(GDEL_ID) is None
    [event] = [e for e in logged_events if e.get("event") == maillog.RETRIEVAL_IN_DOUBT.name]
    assert event["recipients"] == [BOB]


def test_maildirs_take_no_mark(tmp_path) -> None:
    """A store that can be searched: no write before the delivery (as before)."""
    world = World(tmp_path)
    assert world.retriever.handover.folder is None
    world.smta.hold()
    world.notify()
    world.settle()
    assert len(world.deliveries) == 1


def test_kept_aside_reply_is_a_250() -> None:
    assert S250_KEPT_ASIDE.code == 250 and S250_KEPT_ASIDE.enhanced == "2.0.0"
