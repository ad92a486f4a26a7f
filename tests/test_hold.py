"""
``pullmail queue hold``: a held notification is not retrieved, a held
outbox entry is not handed over by RETR, until released
(L{pullmail.node.control.set_held}), over the retrieval world of
C{test_retrieval}.
"""

from __future__ import annotations

from test_retrieval import GDEL_ID, HOUR, SMTA, World

from pullmail.node.control import set_held
from pullmail.storage.pending import PENDING, RETRIEVED


def test_held_notification_waits_for_release(tmp_path) -> None:
    world = World(tmp_path)
    world.smta.hold()
    world.notify()
    assert set_held(world.smta.outbound, world.retriever, GDEL_ID, True)
    world.settle()
    world.advance(HOUR)
    assert world.deliveries == []
    notification = world.store.get("sender.example", GDEL_ID)
    assert notification.state == PENDING and notification.held
    assert set_held(world.smta.outbound, world.retriever, GDEL_ID, False)
    world.settle()
    assert len(world.deliveries) == 1
    assert notification.state == RETRIEVED and not notification.held


def test_held_outbox_entry_is_not_handed_over(tmp_path) -> None:
    world = World(tmp_path)
    world.smta.hold()
    assert set_held(world.smta.outbound, world.retriever, GDEL_ID, True)
    assert world.smta.outbox.get(GDEL_ID).held
    world.notify()
    world.settle()
    assert world.deliveries == []                 # RETR answered 451: tried again later
    assert world.smta.outbox.get(GDEL_ID) is not None
    set_held(world.smta.outbound, world.retriever, GDEL_ID, False)
    world.step_to(HOUR)
    assert len(world.deliveries) == 1 and world.deliveries[0][0].peer == SMTA


def test_unknown_id() -> None:
    class _Outbox:
        def get(self, entry_id):
            return None

    class _Outbound:
        outbox = _Outbox()

    class _Retriever:
        store = []

    assert not set_held(_Outbound(), _Retriever(), "nope", True)
