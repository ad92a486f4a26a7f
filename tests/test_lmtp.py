"""
Tests for L{pullmail.inbound.lmtp} and the LMTP dialogue of
L{pullmail.smtp.client}: bytes out to the store, its replies in, over a
real L{ClientConnection} on a StringTransport with a Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pullmail import maillog
from pullmail.inbound.lmtp import MAX_CONNECTIONS, LMTPDelivery, lmtp_connector
from pullmail.interfaces import DeliveryOutcome, IDeliveryAgent
from pullmail.smtp.client import send_lmtp_transaction
from pullmail.smtp.protocol import ClientConnection
from pullmail.smtp.replies import Reply
from pullmail.storage.indoubt import InDoubt, kept_copies
from pullmail.testing import FakeDeliveryAgent, assert_no_result, result_of, run_blocking

IDLE = 300.0
ALICE, BOB, CAROL = "alice@example.org", "bob@example.org", "carol@example.org"
GREETING = b"220 store.test LMTP ready\r\n"
LHLO_PIPELINING = b"250-store.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
LHLO_PLAIN = b"250-store.test\r\n250 ENHANCEDSTATUSCODES\r\n"
MESSAGE = [b"Subject: hi\r\n\r\n", b".leading dot\r\n"]


class Store:
    """One LMTP connection: what pullmail wrote, and replies fed back."""

    def __init__(self, clock: Clock) -> None:
        self.transport = StringTransport()
        self.connection = ClientConnection(clock, IDLE)
        self.connection.makeConnection(self.transport)

    def says(self, data: bytes) -> None:
        self.connection.dataReceived(data)

    def heard(self) -> bytes:
        """What was written since the last call."""
        written = self.transport.value()
        self.transport.clear()
        return written

    def broken(self) -> None:
        self.connection.connectionLost(Failure(error.ConnectionLost("store gone")))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(clock):
    return Store(clock)


@pytest.fixture
def in_doubt(tmp_path):
    return InDoubt(tmp_path / "in-doubt", run_blocking)


@pytest.fixture
def agent(store, in_doubt):
    return LMTPDelivery(lambda: defer.succeed(store.connection), "mx.example.org",
                        in_doubt=in_doubt)


def start(agent, store, recipients, lhlo=LHLO_PIPELINING, sender="x@remote.test"):
    """Deliver to C{recipients}, through the greeting and LHLO; the Deferred outcome."""
    d = agent.deliver("Q1", sender, recipients, MESSAGE)
    store.says(GREETING)
    assert store.heard() == b"LHLO mx.example.org\r\n"
    store.says(lhlo)
    return d


def test_agents_provide_the_interface(agent):
    """LMTPDelivery and the public fake are IDeliveryAgents; no maildir root."""
    assert verifyObject(IDeliveryAgent, agent)
    assert verifyObject(IDeliveryAgent, FakeDeliveryAgent())
    assert agent.root is None


def test_one_reply_per_recipient_after_the_data(agent, store):
    """
    RFC 2033 4.2: MAIL and RCPTs pipelined, DATA, the dot-stuffed message,
    then one reply per accepted recipient, in RCPT order: 250, 450, 550
    each decide their own recipient.
    """
    d = start(agent, store, [ALICE, BOB, CAROL])
    assert store.heard() == (
        b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
        b"RCPT TO:<bob@example.org>\r\nRCPT TO:<carol@example.org>\r\n"
    )
    store.says(b"250 2.1.0 OK\r\n" + b"250 2.1.5 OK\r\n" * 3)
    assert store.heard() == b"DATA\r\n"
    store.says(b"354 OK\r\n")
    # Return-Path: on top; Delivered-To: only for a single mailbox (see below).
    assert store.heard() == (b"Return-Path: <x@remote.test>\r\n"
                             b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n")
    store.says(b"250 2.0.0 <alice@example.org> Saved\r\n")
    assert_no_result(d)
    store.says(b"450 4.2.1 <bob@example.org> Mailbox busy\r\n")
    assert_no_result(d)
    store.says(b"550 5.2.0 <carol@example.org> Refused\r\n")
    outcome = result_of(d)
    assert outcome.delivered == (ALICE,)
    assert {a: (r.code, r.enhanced) for a, r in outcome.refused.items()} == {
        BOB: (450, "4.2.1"), CAROL: (550, "5.2.0"),
    }
    assert (outcome.transient(), outcome.permanent()) == ([BOB], [CAROL])
    assert store.heard() == b"QUIT\r\n"


def test_rcpt_refusals_are_final_and_take_no_data_reply(agent, store):
    """A recipient refused at RCPT keeps that reply; only the others get a reply after the data."""
    d = start(agent, store, [ALICE, BOB])
    store.heard()
    store.says(b"250 2.1.0 OK\r\n550 5.1.1 <alice@example.org> User doesn't exist\r\n"
               b"250 2.1.5 OK\r\n")
    assert store.heard() == b"DATA\r\n"
    store.says(b"354 OK\r\n")
    store.heard()
    store.says(b"250 2.0.0 <bob@example.org> Saved\r\n")
    outcome = result_of(d)
    assert outcome.delivered == (BOB,)
    assert outcome.refused[ALICE].code == 550
    assert "exist" in outcome.refused[ALICE].text


def test_everyone_refused_at_rcpt_sends_no_data(agent, store):
    """No RCPT accepted: RSET, never DATA (RFC 2033 4.2 would make DATA fail with 503)."""
    d = start(agent, store, [ALICE])
    store.heard()
    store.says(b"250 2.1.0 OK\r\n550 5.1.1 <alice@example.org> User doesn't exist\r\n")
    assert store.heard() == b"RSET\r\n"
    store.says(b"250 2.0.0 OK\r\n")
    outcome = result_of(d)
    assert outcome.delivered == ()
    assert outcome.permanent() == [ALICE]


def test_without_pipelining_one_command_at_a_time(agent, store):
    """A store that does not offer PIPELINING gets each command after the last reply."""
    d = start(agent, store, [ALICE, BOB], lhlo=LHLO_PLAIN)
    assert store.heard() == b"MAIL FROM:<x@remote.test>\r\n"
    store.says(b"250 2.1.0 OK\r\n")
    assert store.heard() == b"RCPT TO:<alice@example.org>\r\n"
    store.says(b"250 2.1.5 OK\r\n")
    assert store.heard() == b"RCPT TO:<bob@example.org>\r\n"
    store.says(b"250 2.1.5 OK\r\n")
    assert store.heard() == b"DATA\r\n"
    store.says(b"354 OK\r\n")
    store.heard()
    store.says(b"250 2.0.0 a\r\n250 2.0.0 b\r\n")
    assert result_of(d).delivered == (ALICE, BOB)


def test_eight_bit_message_says_body(agent, store):
    """An 8-bit message is announced BODY=8BITMIME when the store offers it."""
    d = agent.deliver("Q1", "x@remote.test", [ALICE], [b"Subject: caf\xc3\xa9\r\n\r\n"])
    store.says(GREETING + LHLO_PIPELINING)
    assert store.heard().splitlines()[1] == b"MAIL FROM:<x@remote.test> BODY=8BITMIME"
    assert_no_result(d)
    store.broken()
    assert result_of(d).transient() == [ALICE]


def test_connection_lost_among_the_replies(agent, store, tmp_path, logged_events):
    """
    The connection breaks after the first recipient's 250: that one is
    delivered; the other's delivery is unknown (the store may have it),
    so it is neither retried nor refused: in doubt, the message kept for
    it alone, and logged.
    """
    d = start(agent, store, [ALICE, BOB])
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 OK\r\n"
               b"250 2.0.0 <alice@example.org> Saved\r\n")
    assert_no_result(d)
    store.broken()
    outcome = result_of(d)
    assert outcome == DeliveryOutcome(delivered=(ALICE,), in_doubt=(BOB,))
    [kept] = kept_copies(tmp_path / "in-doubt")
    assert (kept.id, kept.sender, kept.recipients) == ("Q1", "x@remote.test", (BOB,))
    assert "store gone" in kept.why
    [event] = [e for e in logged_events if e.get("event") == maillog.LMTP_IN_DOUBT.name]
    assert event["recipients"] == [BOB] and event["path"] == str(kept.path)


def test_reply_to_the_dot_never_arrives(agent, store, tmp_path):
    """
    The whole message went, then the connection broke before any reply:
    every recipient is in doubt, none refused, and the copy kept is the
    message as handed in (without the Return-Path: the store would get).
    """
    d = start(agent, store, [ALICE, BOB])
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 OK\r\n")
    assert store.heard().endswith(b"..leading dot\r\n.\r\n")
    store.broken()
    outcome = result_of(d)
    assert outcome == DeliveryOutcome(in_doubt=(ALICE, BOB))
    assert (outcome.transient(), outcome.permanent()) == ([], [])
    [kept] = (tmp_path / "in-doubt").iterdir()
    why, envelope = kept.read_bytes().split(b"\r\n", 1)
    assert why.startswith(b"X-Pullmail-In-Doubt: Q1 to LMTP server: no reply after the data")
    assert why.endswith(b"store gone.")
    assert envelope == (
        b"X-Pullmail-Envelope-From: <x@remote.test>\r\n"
        b"X-Pullmail-Envelope-To: alice@example.org, bob@example.org\r\n"
        b"Subject: hi\r\n\r\n.leading dot\r\n")


def test_partial_replies_each_decide_their_own(agent, store, tmp_path):
    """
    Three recipients: 250, then 452, then the connection breaks: Alice
    delivered, Bob deferred (the store said so), Carol in doubt.
    """
    d = start(agent, store, [ALICE, BOB, CAROL])
    store.says(b"250 2.1.0 OK\r\n" + b"250 2.1.5 OK\r\n" * 3 + b"354 OK\r\n"
               b"250 2.0.0 <alice@example.org> Saved\r\n"
               b"452 4.2.2 <bob@example.org> Over quota\r\n")
    store.broken()
    outcome = result_of(d)
    assert outcome.delivered == (ALICE,)
    assert outcome.transient() == [BOB] and outcome.refused[BOB].enhanced == "4.2.2"
    assert outcome.in_doubt == (CAROL,)
    [kept] = kept_copies(tmp_path / "in-doubt")
    assert kept.recipients == (CAROL,)


def test_a_garbled_reply_after_the_data_is_in_doubt(agent, store):
    """What is not a reply after the data says nothing of the delivery: in doubt."""
    d = start(agent, store, [ALICE])
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 OK\r\n")
    store.says(b"hello?\r\n")
    assert store.transport.disconnecting
    store.broken()
    assert result_of(d) == DeliveryOutcome(in_doubt=(ALICE,))


def test_a_copy_that_cannot_be_kept_is_4xx(store, tmp_path, logged_events):
    """
    No room to keep the copy: the recipient gets a 4xx after all (it may
    be delivered twice, never lost), and the log says why.
    """
    (tmp_path / "in-doubt").write_text("a file, not a folder")
    agent = LMTPDelivery(lambda: defer.succeed(store.connection), "mx.example.org",
                         in_doubt=InDoubt(tmp_path / "in-doubt", run_blocking))
    d = start(agent, store, [ALICE])
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 OK\r\n")
    store.broken()
    outcome = result_of(d)
    assert outcome.transient() == [ALICE] and outcome.in_doubt == ()
    [event] = [e for e in logged_events if e.get("event") == maillog.LMTP_FAILED.name]
    assert "could not keep it aside" in event["error"]


def test_connection_lost_before_the_data_ends(agent, store):
    """Broken before any reply to the data: every recipient 4xx."""
    d = start(agent, store, [ALICE, BOB])
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    store.broken()
    outcome = result_of(d)
    assert outcome.delivered == ()
    assert outcome.transient() == [ALICE, BOB]
    assert "mail store" in outcome.refused[ALICE].text


def test_silent_store_times_out_in_doubt(agent, store, clock):
    """
    A store silent after the data is dropped after the idle timeout; it
    may have the message: in doubt, not 4xx.  Silent before the data
    (below), nothing was sent: 4xx.
    """
    d = start(agent, store, [ALICE])
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 OK\r\n")
    clock.advance(IDLE - 1)
    assert_no_result(d)
    clock.advance(1)
    assert store.transport.disconnecting
    store.broken()   # what the reactor does after loseConnection
    assert result_of(d) == DeliveryOutcome(in_doubt=(ALICE,))


def test_silent_store_before_the_data_is_4xx(agent, store, clock, tmp_path):
    d = start(agent, store, [ALICE])
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    clock.advance(IDLE)
    store.broken()
    assert result_of(d).transient() == [ALICE]
    assert not (tmp_path / "in-doubt").exists()


def test_refused_session_is_4xx_for_all(agent, store, logged_events):
    """
    A 421 (or even 5xx) greeting is the store not ready: 4xx, never a
    bounce.  The store's words go to the log, not to the SMTP client.
    """
    d = agent.deliver("Q1", "x@remote.test", [ALICE, BOB], MESSAGE)
    store.says(b"554 5.3.2 not today\r\n")
    [event] = [e for e in logged_events if e.get("event") == "lmtp-failed"]
    assert event["queue_id"] == "Q1" and "554 5.3.2 not today" in event["error"]
    outcome = result_of(d)
    assert outcome.transient() == [ALICE, BOB]
    assert outcome.refused[ALICE].enhanced == "4.4.0"
    assert "not ready" in outcome.refused[ALICE].text


def test_unreachable_store_is_4xx_for_all(in_doubt):
    """A connection that cannot be made: every recipient 451 4.4.1."""
    agent = LMTPDelivery(lambda: defer.fail(error.ConnectError("no socket")), "mx.example.org",
                         in_doubt=in_doubt)
    outcome = result_of(agent.deliver("Q1", "", [ALICE], MESSAGE))
    assert outcome == DeliveryOutcome(refused=outcome.refused)
    assert (outcome.refused[ALICE].code, outcome.refused[ALICE].enhanced) == (451, "4.4.1")


def test_out_of_step_reply_is_4xx(agent, store):
    """A 250 to DATA (not 354) means the replies are out of step: 4xx, the data unsent."""
    d = start(agent, store, [ALICE])
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    store.heard()
    store.says(b"250 2.0.0 what\r\n")
    assert result_of(d).transient() == [ALICE]
    assert b"Subject" not in store.heard()


def test_per_recipient_replies_read_exactly():
    """send_lmtp_transaction reads one reply per accepted recipient, and no more."""
    ok = Reply(250, "2.0.0", "ok")
    script = [ok, ok, ok, Reply(354, "", "go"), ok, Reply(452, "4.2.2", "over quota")]

    class Channel:
        def send(self, data):
            pass

        def reply(self):
            return defer.succeed(script.pop(0))

    result = result_of(defer.Deferred.fromCoroutine(
        send_lmtp_transaction(Channel(), "s@x.test", [ALICE, BOB], [b"x\r\n"])))
    assert result.accepted() == [ALICE]
    assert result.refused(permanent=False) == [BOB]
    assert result.final.code == 452
    assert script == []


def test_unanswered_recipients_are_not_decided_by_their_rcpt():
    """
    send_lmtp_transaction: the reply after the data that never came leaves
    its recipients C{unanswered}, out of C{recipients} (whose RCPT 250
    decides nothing), and C{final} says why.
    """
    ok = Reply(250, "2.0.0", "ok")
    script = [ok, ok, ok, Reply(354, "", "go"), ok]

    class Channel:
        def send(self, data):
            pass

        def reply(self):
            if script:
                return defer.succeed(script.pop(0))
            return defer.fail(error.ConnectionLost("gone"))

    result = result_of(defer.Deferred.fromCoroutine(
        send_lmtp_transaction(Channel(), "s@x.test", [ALICE, BOB], [b"x\r\n"])))
    assert result.recipients == {ALICE: ok}
    assert result.unanswered == [BOB]
    assert (result.final.code, result.final.enhanced) == (451, "4.4.2")


def test_connections_are_limited(in_doubt):
    """At most MAX_CONNECTIONS deliveries talk to the store at once; the rest wait."""
    waiting: list[defer.Deferred] = []

    def connect():
        waiting.append(defer.Deferred())
        return waiting[-1]

    agent = LMTPDelivery(connect, "mx.example.org", in_doubt=in_doubt)
    results = [agent.deliver(f"Q{i}", "", [ALICE], MESSAGE) for i in range(MAX_CONNECTIONS + 2)]
    assert len(waiting) == MAX_CONNECTIONS
    waiting[0].errback(error.ConnectError("gone"))
    assert result_of(results[0]).transient() == [ALICE]
    assert len(waiting) == MAX_CONNECTIONS + 1


def test_connector_uses_the_endpoint_and_times_out(in_doubt):
    """lmtp_connector connects the endpoint string; a connection that never opens is a 4xx."""
    reactor = MemoryReactorClock()
    connect = lmtp_connector(reactor, reactor, "unix:/run/store/lmtp", 30.0, IDLE)
    agent = LMTPDelivery(connect, "mx.example.org", in_doubt=in_doubt)
    d = agent.deliver("Q1", "", [ALICE], MESSAGE)
    [(path, *_)] = reactor.unixClients
    assert path == "/run/store/lmtp"
    reactor.advance(30)
    outcome = result_of(d)
    assert outcome.transient() == [ALICE]
    tcp = lmtp_connector(reactor, reactor, "tcp:127.0.0.1:24", 30.0, IDLE)
    tcp()
    assert reactor.tcpClients[-1][:2] == ("127.0.0.1", 24)


def test_one_mailbox_gets_return_path_and_delivered_to(agent, store):
    """Issue 14: like virtual(8), a copy for one mailbox names it in Delivered-To:."""
    d = start(agent, store, [ALICE])
    store.heard()
    store.says(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    assert store.heard() == b"DATA\r\n"
    store.says(b"354 OK\r\n")
    assert store.heard().startswith(
        b"Return-Path: <x@remote.test>\r\nDelivered-To: alice@example.org\r\nSubject: hi\r\n"
    )
    store.says(b"250 2.0.0 Saved\r\n")
    assert result_of(d).delivered == (ALICE,)
