"""
Tests for per-recipient local outcomes: the router's reply to end-of-data
when a store (LMTP) answers each recipient on its own
(L{pullmail.inbound.router.one_refusal}), and the L{LocalQueue} that
retries deferred local recipients and bounces refused ones
(L{pullmail.outbound.local}).
"""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail.accounts.users import Accounts
from pullmail.config import DeliveryConfig
from pullmail.inbound.router import Router, one_refusal
from pullmail.interfaces import DeliveryOutcome
from pullmail.outbound.local import LocalQueue
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.replies import Reply
from pullmail.testing import FakeDeliveryAgent, MemoryOutbox, result_of, run_blocking

NOW = 1704164645.0
ALICE, BOB = "alice@example.org", "bob@example.org"
BUSY = Reply(450, "4.2.1", "<bob@example.org> Mailbox busy")
OVER_QUOTA = Reply(452, "4.2.2", "<alice@example.org> Quota exceeded")
NO_USER = Reply(550, "5.1.1", "<bob@example.org> User doesn't exist")
CONFIG = DeliveryConfig(push_retry=(300.0, 900.0), push_lifetime=3600.0)


class FakeOutbound:
    def __init__(self) -> None:
        self.calls = []

    def enqueue(self, queue_id, sender, recipients, chunks, origin=None, smtputf8=False,
                dsn=None):
        self.calls.append((queue_id, sender, list(recipients)))
        return defer.succeed(None)


class Node:
    """A router, a scripted store, a local queue over a memory outbox, and the bounces sent."""

    def __init__(self, refusals=None, config=CONFIG, disk=None) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.agent = FakeDeliveryAgent(refusals)
        self.accounts = Accounts(frozenset({"example.org"}),
                                 users={ALICE: "h", BOB: "h"},
                                 aliases={"team@example.org": (ALICE, BOB)})
        self.outbound = FakeOutbound()
        self.router = Router("mx.example.org", self.accounts, self.agent, self.clock,
                             self.outbound)
        self.bounces: list[tuple[str, bytes]] = []
        self.store = MemoryOutbox(disk)
        self.queue = LocalQueue(
            store=self.store, agent=self.agent, clock=self.clock, run_blocking=run_blocking,
            hostname="mx.example.org", config=config, send_bounce=self.bounce,
        )
        self.router.local_queue = self.queue
        self.queue.start()

    def bounce(self, sender: str, message: bytes):
        self.bounces.append((sender, message))
        return defer.succeed(None)

    def accept(self, recipients, sender="x@remote.test") -> Reply:
        envelope = Envelope(sender, tuple(recipients))
        session = Session("192.0.2.1", helo="client.test", esmtp=True)
        return result_of(self.router.accept(session, envelope, [b"Subject: x\r\n\r\nhi\r\n"], 20))

    def delivered(self, address: str) -> int:
        return len(self.agent.mailboxes.get(address, []))


# -- the reply to end-of-data -----------------------------------------------------


@pytest.mark.parametrize("refused, queued_remote, expected", [
    ({}, False, None),                                    # all delivered
    ({BOB: BUSY}, False, BUSY),                           # every local one 4xx
    ({ALICE: OVER_QUOTA, BOB: BUSY}, False, OVER_QUOTA),  # 4xx alike: the first
    ({BOB: NO_USER}, False, NO_USER),                     # every local one 5xx
    ({ALICE: OVER_QUOTA, BOB: NO_USER}, False, None),     # mixed: ours to sort out
    ({BOB: BUSY}, True, None),                            # a remote copy is queued
])
def test_one_refusal(refused, queued_remote, expected):
    """A refusal goes straight back only when it is every recipient's and nothing was taken."""
    outcome = DeliveryOutcome(refused=refused)
    assert one_refusal(outcome, queued_remote) == expected


def test_one_refusal_with_a_delivery():
    """Once one local copy is delivered, the client must hear 250."""
    assert one_refusal(DeliveryOutcome(delivered=(ALICE,), refused={BOB: NO_USER}), False) is None


def test_store_text_is_made_printable():
    """The store's reply text goes to a client with control characters blanked."""
    odd = Reply(550, "5.1.1", "no\x1b[31m such\x00 user")
    reply = one_refusal(DeliveryOutcome(refused={BOB: odd}), False)
    assert reply.text == "no [31m such  user"


def test_all_deferred_passes_the_4xx_back():
    """Every local recipient 4xx, nothing else: the client retries; nothing is queued here."""
    node = Node({ALICE: OVER_QUOTA})
    reply = node.accept([ALICE])
    assert reply == OVER_QUOTA
    assert len(node.store) == 0 and node.bounces == []


def test_all_refused_passes_the_5xx_back():
    """Every local recipient 5xx: the client bounces it; we write no DSN."""
    node = Node({BOB: NO_USER})
    assert node.accept([BOB]).code == 550
    assert node.bounces == [] and len(node.store) == 0


# -- mixed outcomes: 250, and the node takes over ---------------------------------


def test_deferred_recipient_is_queued_and_retried():
    """
    Alice delivered, Bob 450: the client hears 250, Bob waits in the local
    queue, and is delivered at the first push_retry delay.
    """
    node = Node({BOB: BUSY})
    reply = node.accept(["team@example.org"])
    assert reply.code == 250
    [entry] = node.store.entries()
    assert entry.recipients == [BOB]
    assert entry.next_attempt == NOW + 300
    assert (node.delivered(ALICE), node.delivered(BOB)) == (1, 0)
    del node.agent.refusals[BOB]
    node.clock.advance(299)
    assert node.delivered(BOB) == 0
    node.clock.advance(1)
    assert node.delivered(BOB) == 1
    assert node.delivered(ALICE) == 1              # never twice
    assert len(node.store) == 0 and node.store.disk["data"] == {}
    queue_id, sender, addresses, _ = node.agent.calls[-1]
    assert (sender, addresses) == ("x@remote.test", [BOB])
    assert queue_id == node.agent.calls[0][0]


def test_refused_recipient_bounces_before_the_250():
    """Alice delivered, Bob 550: 250 to the client, and a DSN to the sender quoting the store."""
    node = Node({BOB: NO_USER})
    assert node.accept(["team@example.org"]).code == 250
    [(to, dsn)] = node.bounces
    assert to == "x@remote.test"
    assert b"Final-Recipient: rfc822; bob@example.org" in dsn
    assert b"Status: 5.1.1" in dsn
    assert b"Diagnostic-Code: smtp; 550 5.1.1" in dsn
    assert len(node.store) == 0


def test_deferred_local_with_a_remote_copy():
    """A remote recipient queued, the only local one 4xx: 250, and the local one is retried."""
    node = Node({ALICE: OVER_QUOTA})
    assert node.accept([ALICE, "carol@remote.test"]).code == 250
    assert [r for _, _, r in node.outbound.calls] == [["carol@remote.test"]]
    assert [e.recipients for e in node.store.entries()] == [[ALICE]]


def test_retries_until_the_lifetime_then_a_4_4_7_bounce():
    """A recipient deferred on every try bounces (4.4.7) when push_lifetime runs out."""
    node = Node({BOB: BUSY})
    node.accept(["team@example.org"])
    for delay in (300, 900, 900, 900):
        node.clock.advance(delay)
        assert node.bounces == []
        assert len(node.store) == 1
    node.clock.advance(600)            # the hour is up
    [(_, dsn)] = node.bounces
    assert b"Status: 4.4.7" in dsn and b"Mailbox busy" in dsn
    assert len(node.store) == 0


def test_a_later_5xx_bounces_the_deferred_recipient():
    """Deferred first, then refused for good: one bounce, entry gone."""
    node = Node({BOB: BUSY})
    node.accept(["team@example.org"])
    node.agent.refusals[BOB] = NO_USER
    node.clock.advance(300)
    assert len(node.bounces) == 1 and len(node.store) == 0


def test_queue_survives_a_restart():
    """The entry is on the "disk" before the 250: a restarted node retries it."""
    node = Node({BOB: BUSY})
    node.accept(["team@example.org"])
    node.queue.stop()
    again = Node(disk=node.store.disk)
    again.clock.advance(300)
    assert again.delivered(BOB) == 1
    assert len(again.store) == 0


def test_storage_failure_is_4xx_not_250():
    """When the deferred recipient cannot be queued, the client hears 4xx, never 250."""
    node = Node({BOB: BUSY})

    def full(entries, chunks):
        raise OSError(errno.ENOSPC, "No space left on device")

    node.store.add = full
    assert node.accept(["team@example.org"]).code == 452


def test_without_a_local_queue_mixed_outcomes_are_4xx():
    """A router with no local queue never says 250 for a refused recipient."""
    node = Node({BOB: BUSY})
    node.router.local_queue = None
    assert node.accept(["team@example.org"]).code == 451


def test_bounces_are_never_bounced():
    """A DSN (null sender) refused for good is dropped, not bounced again."""
    node = Node({BOB: NO_USER})
    result_of(node.router.inject("", [ALICE, BOB], [b"Subject: dsn\r\n\r\nx\r\n"]))
    assert node.bounces == []
    assert node.delivered(ALICE) == 1


def test_injected_mail_deferred_is_queued():
    """A bounce for a local mailbox the store defers waits in the local queue."""
    node = Node({ALICE: OVER_QUOTA})
    result_of(node.router.inject("", [ALICE], [b"Subject: dsn\r\n\r\nx\r\n"]))
    [entry] = node.store.entries()
    assert (entry.sender, entry.recipients) == ("", [ALICE])


def test_lost_store_is_retried_with_the_agents_os_error():
    """An agent failing with OSError on a retry counts as 4xx for all its recipients."""
    node = Node({BOB: BUSY}, config=replace(CONFIG, push_retry=(60.0,)))
    node.accept(["team@example.org"])
    node.agent.error = OSError(errno.EIO, "I/O error")
    node.clock.advance(60)
    [entry] = node.store.entries()
    assert "I/O error" in entry.last_error
    assert entry.next_attempt == NOW + 120


def test_hooks_hear_of_the_delivered_recipients_only():
    """A delivery hook is told of Alice, whom the store took, not of Bob, whom it deferred."""
    node = Node({BOB: BUSY})
    told = []

    class Hook:
        name = "record"

        def delivered(self, queue_id, sender, recipients, paths):
            told.append((sender, recipients, paths))

    node.router.hooks = (Hook(),)
    node.accept(["team@example.org"])
    assert told == [("x@remote.test", [ALICE], [])]


# -- DSN parameters (RFC 3461) kept with the queued entry --------------------------


def _accept_with_dsn(node: Node, notify: str, ret: str = "HDRS") -> Reply:
    envelope = Envelope("x@remote.test", (ALICE, BOB), params={"RET": ret, "ENVID": "e+2B1"},
                        rcpt_params={BOB: {"notify": notify, "orcpt": "rfc822;b+40old.test"}})
    session = Session("192.0.2.1", helo="client.test", esmtp=True)
    return result_of(node.router.accept(session, envelope, [b"Subject: x\r\n\r\nhi\r\n"], 20))


def test_queued_entry_keeps_the_dsn_parameters_across_a_restart():
    node = Node({BOB: BUSY})
    assert _accept_with_dsn(node, "SUCCESS").code == 250
    node.queue.stop()
    again = Node({BOB: BUSY}, disk=node.store.disk)
    [entry] = again.store.entries()
    assert entry.dsn == {"ret": "HDRS", "envid": "e+2B1", "notify": {BOB: "SUCCESS"},
                         "orcpt": {BOB: "rfc822;b+40old.test"}}


def test_later_delivery_sends_the_success_report_asked_for():
    """RFC 3461 4.1: NOTIFY=SUCCESS holds for the delivery the queue makes later."""
    node = Node({BOB: BUSY})
    _accept_with_dsn(node, "SUCCESS")
    del node.agent.refusals[BOB]
    node.clock.advance(300)
    [(to, report)] = node.bounces
    assert to == "x@remote.test"
    assert b"Action: delivered" in report and b"Final-Recipient: rfc822; bob@example.org" in report
    assert b"Original-Recipient: rfc822; b@old.test" in report
    assert b"Original-Envelope-Id: e+1" in report


@pytest.mark.parametrize("notify, bounced", [("NEVER", False), ("SUCCESS", False),
                                             ("FAILURE", True), ("DELAY", False)])
def test_later_failure_honours_notify(notify, bounced):
    node = Node({BOB: BUSY})
    _accept_with_dsn(node, notify)
    node.agent.refusals[BOB] = NO_USER
    node.clock.advance(300)
    assert len(node.bounces) == int(bounced) and len(node.store) == 0


@pytest.mark.parametrize("ret, whole", [("HDRS", False), ("FULL", True)])
def test_refused_at_once_honours_ret_and_envid(ret, whole):
    node = Node({BOB: NO_USER})
    _accept_with_dsn(node, "FAILURE", ret)
    [(_, report)] = node.bounces
    assert (b"\r\n\r\nhi\r\n" in report) is whole
    assert b"Original-Envelope-Id: e+1" in report


def test_local_queue_reports_obey_spf():
    """SPEC 7: nothing, failure or success, to a sender SPF does not back."""
    node = Node({BOB: BUSY})
    asked = []

    def authorised(origin, sender):
        asked.append((origin, sender))
        return defer.succeed(False)

    node.queue.reports.sender_authorised = authorised
    _accept_with_dsn(node, "SUCCESS,FAILURE")
    del node.agent.refusals[BOB]
    node.clock.advance(300)
    assert node.delivered(BOB) == 1
    assert node.bounces == [] and asked == [("192.0.2.1", "x@remote.test")]


# -- the operator: pullmail queue --------------------------------------------------


def test_flush_makes_every_entry_due_now():
    """``pullmail queue --flush``: the deferred recipient is tried at once, not at its retry."""
    node = Node({BOB: BUSY})
    node.accept(["team@example.org"])
    del node.agent.refusals[BOB]
    node.queue.flush()
    node.clock.advance(0)
    assert node.delivered(BOB) == 1 and len(node.store) == 0


def test_delete_drops_an_entry_without_a_bounce():
    node = Node({BOB: BUSY})
    node.accept(["team@example.org"])
    [entry] = node.queue.entries()
    assert node.queue.delete(entry.id)
    assert not node.queue.delete(entry.id)
    node.clock.advance(3600)
    assert len(node.store) == 0 and node.bounces == [] and node.delivered(BOB) == 0


def test_the_control_socket_lists_flushes_and_deletes_the_local_queue():
    """The node's control requests cover the local queue; "queue": "local" alone."""
    from pullmail.node.control import ControlFactory

    class Nothing:
        outbox = MemoryOutbox()
        store = ()

        def flush(self):
            self.flushed = True

        def delete(self, target):
            return False

    node = Node({BOB: BUSY})
    node.accept(["team@example.org"])
    outbound, retriever = Nothing(), Nothing()
    control = ControlFactory(outbound, retriever, node.clock, local_queue=node.queue)
    [row] = control.handle({"command": "list"})["rows"]
    assert (row["kind"], row["recipients"], row["next"]) == ("local", [BOB], 300.0)
    assert control.handle({"command": "list", "queue": "local"})["rows"] == [row]
    del node.agent.refusals[BOB]
    assert control.handle({"command": "flush", "queue": "local"}) == {"ok": True}
    assert not hasattr(outbound, "flushed")
    node.clock.advance(0)
    assert node.delivered(BOB) == 1
    node.agent.refusals[BOB] = BUSY
    node.accept(["team@example.org"])
    [entry] = node.queue.entries()
    assert control.handle({"command": "delete", "id": entry.id})["ok"]
    assert node.queue.entries() == []


def test_the_local_queue_from_the_files(tmp_path):
    """No node running: the listing reads the local queue's files; delete removes them."""
    from pullmail.node.control import offline_delete, offline_listing
    from pullmail.storage.outbox import MaildirOutbox
    from pullmail.testing import make_entry

    store = MaildirOutbox(tmp_path / "local-queue")
    store.load()
    store.add([make_entry(id="Local_entry_id_00001", recipients=[BOB])], [b"x\r\n"])
    [row] = offline_listing(tmp_path, NOW)
    assert (row["kind"], row["id"]) == ("local", "Local_entry_id_00001")
    assert offline_delete(tmp_path, "Local_entry_id_00001", outbox=False)
    assert offline_listing(tmp_path, NOW) == []
    assert not list((tmp_path / "local-queue" / "data").iterdir())
