"""
Tests for L{pullmail.storage.indoubt} and for what the node does with a
message whose LMTP store went silent after the data, on each path that
hands mail to the store: received mail (the router's reply) and the local
queue's retries.  A real L{LMTPDelivery} over StringTransports, a Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pullmail.accounts.users import Accounts
from pullmail.config import DeliveryConfig
from pullmail.inbound.lmtp import LMTPDelivery
from pullmail.inbound.router import Router
from pullmail.outbound.local import LocalQueue
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.protocol import ClientConnection
from pullmail.storage.indoubt import InDoubt, kept_copies
from pullmail.testing import MemoryOutbox, result_of, run_blocking

NOW = 1704164645.0
ALICE, BOB = "alice@example.org", "bob@example.org"
CONFIG = DeliveryConfig(push_retry=(300.0, 900.0), push_lifetime=3600.0)
OPENING = (b"220 store.test LMTP\r\n250-store.test\r\n250 PIPELINING\r\n")


# -- the folder -------------------------------------------------------------------


def keep(folder, queue_id="Q1", why="why", recipients=(ALICE,), body=b"hi\r\n"):
    d = defer.Deferred.fromCoroutine(
        InDoubt(folder, run_blocking).keep(queue_id, why, "s@x.test", recipients, [body]))
    return result_of(d)


def test_a_copy_is_kept_with_its_envelope(tmp_path):
    path = keep(tmp_path / "in-doubt", why="cut off\r\nX-Forged: yes")
    assert path == tmp_path / "in-doubt" / "Q1.eml"
    assert path.read_bytes() == (b"X-Pullmail-In-Doubt: cut off X-Forged: yes\r\n"
                                 b"X-Pullmail-Envelope-From: <s@x.test>\r\n"
                                 b"X-Pullmail-Envelope-To: alice@example.org\r\n"
                                 b"hi\r\n")
    assert [p.name for p in (tmp_path / "in-doubt").iterdir()] == ["Q1.eml"]


def test_the_same_copy_twice_is_one_file_another_is_a_second(tmp_path):
    """
    A retrieval cut off twice keeps the same bytes: one file.  Another
    recipient of the same queue id kept later never replaces the first.
    """
    folder = tmp_path / "in-doubt"
    first = keep(folder)
    assert keep(folder) == first
    second = keep(folder, recipients=(BOB,))
    assert second == folder / "Q1.1.eml"
    assert b"alice@example.org" in first.read_bytes()
    assert [(c.id, c.recipients) for c in kept_copies(folder)] == [
        ("Q1", (ALICE,)), ("Q1.1", (BOB,))]


def test_kept_copies_reads_the_envelopes(tmp_path):
    folder = tmp_path / "in-doubt"
    assert kept_copies(folder) == []
    keep(folder, "Q2", recipients=(ALICE, BOB))
    (folder / ".Q3.1.2.tmp").write_bytes(b"half")   # a write under way
    [copy] = kept_copies(folder)
    assert (copy.id, copy.why, copy.sender, copy.recipients) == (
        "Q2", "why", "s@x.test", (ALICE, BOB))


# -- the paths to the store ---------------------------------------------------------


class Store:
    """Every LMTP connection the node opens, each on a StringTransport."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.connections: list[ClientConnection] = []

    def connect(self) -> defer.Deferred:
        connection = ClientConnection(self.clock, 300.0)
        connection.makeConnection(StringTransport())
        self.connections.append(connection)
        connection.dataReceived(OPENING)
        return defer.succeed(connection)

    def answer(self, *data_replies: bytes, rcpts: int = 1) -> None:
        """The last connection: MAIL and RCPTs taken, the data, C{data_replies}, then lost."""
        connection = self.connections[-1]
        connection.dataReceived(b"250 2.1.0 OK\r\n" + b"250 2.1.5 OK\r\n" * rcpts)
        connection.dataReceived(b"354 go\r\n")
        assert connection.transport.value().endswith(b"\r\n.\r\n")
        connection.dataReceived(b"".join(data_replies))
        connection.connectionLost(Failure(error.ConnectionLost("store gone")))


class Node:
    """A router and a local queue over one LMTP agent, and the bounces sent."""

    def __init__(self, tmp_path) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.folder = tmp_path / "in-doubt"
        self.store = Store(self.clock)
        agent = LMTPDelivery(self.store.connect, "mx.example.org",
                             in_doubt=InDoubt(self.folder, run_blocking))
        accounts = Accounts(frozenset({"example.org"}), users={ALICE: "h", BOB: "h"})
        self.router = Router("mx.example.org", accounts, agent, self.clock)
        self.bounces: list = []
        self.queue = LocalQueue(
            store=MemoryOutbox(), agent=agent, clock=self.clock, run_blocking=run_blocking,
            hostname="mx.example.org", config=CONFIG,
            send_bounce=lambda sender, message: self.bounces.append(sender),
        )
        self.router.local_queue = self.queue
        self.queue.start()

    def accept(self, recipients) -> defer.Deferred:
        envelope = Envelope("x@remote.test", tuple(recipients))
        session = Session("192.0.2.1", helo="client.test", esmtp=True)
        return self.router.accept(session, envelope, [b"Subject: x\r\n\r\nhi\r\n"], 20)


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


def test_received_mail_whose_reply_never_came_is_250_and_kept(node):
    """
    The client hears 250 (as an SMTA does when a crash cut a retrieval
    off): sending it again might deliver it twice.  Nothing waits in the
    local queue, nothing bounces, no second connection later.
    """
    d = node.accept([ALICE])
    node.store.answer()
    assert result_of(d).code == 250
    [copy] = kept_copies(node.folder)
    assert copy.recipients == (ALICE,)
    assert b"Received: from client.test" in copy.path.read_bytes()
    assert len(node.queue.store) == 0 and node.bounces == []
    node.clock.advance(CONFIG.push_lifetime * 2)
    assert len(node.store.connections) == 1


def test_a_deferral_beside_a_recipient_in_doubt_is_not_passed_back(node):
    """
    Alice 450, Bob's reply never came: the 450 must not go back to the
    client (it would send Bob's copy again); 250, Alice waits in the local
    queue and is delivered at the first retry; Bob is not sent again.
    """
    d = node.accept([ALICE, BOB])
    node.store.answer(b"450 4.2.1 <alice@example.org> busy\r\n", rcpts=2)
    assert result_of(d).code == 250
    [entry] = node.queue.store.entries()
    assert entry.recipients == [ALICE]
    assert kept_copies(node.folder)[0].recipients == (BOB,)
    node.clock.advance(300)
    assert len(node.store.connections) == 2
    assert b"RCPT TO:<alice@example.org>\r\n" in node.store.connections[1].transport.value()
    assert b"bob" not in node.store.connections[1].transport.value()
    node.store.answer(b"250 2.0.0 <alice@example.org> ok\r\n")
    assert len(node.queue.store) == 0 and node.bounces == []


def test_a_local_retry_whose_reply_never_came_is_not_retried(node):
    """
    The local queue retries Alice; the store goes silent after the data:
    the entry is done (kept aside), no retry is scheduled, no bounce.
    """
    d = node.accept([ALICE, BOB])
    node.store.answer(b"250 2.0.0 <alice@example.org> ok\r\n"
                      b"450 4.2.1 <bob@example.org> busy\r\n", rcpts=2)
    assert result_of(d).code == 250
    node.clock.advance(300)
    node.store.answer()
    assert len(node.queue.store) == 0
    [copy] = kept_copies(node.folder)
    assert copy.recipients == (BOB,)
    node.clock.advance(CONFIG.push_lifetime * 2)
    assert len(node.store.connections) == 2
    assert node.bounces == []


# -- what the operator sees -----------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_pullmail_queue_lists_the_copies_and_says_what_to_do(tmp_path, as_json):
    """``pullmail queue`` (node running or not) shows each copy, its envelope and why."""
    import io
    import json
    from types import SimpleNamespace

    from pullmail.node import queuetools

    keep(tmp_path / "in-doubt", "Q7", why="Q7 to LMTP server: no reply after the data",
         recipients=(ALICE, BOB))
    config = SimpleNamespace(state_dir=tmp_path, node=SimpleNamespace(hostname="mx.test"))
    args = SimpleNamespace(action="list", target=None, delete=None, flush=False, json=as_json)
    out = io.StringIO()
    assert queuetools.run(config, args, out, lambda request: None) == 0
    if as_json:
        [record] = json.loads(out.getvalue())["messages"]
        assert (record["id"], record["queue"], record["queue_id"], record["state"]) == (
            "Q7", "in-doubt", "Q7", "kept")
        assert record["recipients"] == [ALICE, BOB]
        assert record["last_error"] == "Q7 to LMTP server: no reply after the data"
    else:
        text = out.getvalue()
        assert "In doubt (kept aside" in text and "1\n" in text
        assert f"{tmp_path / 'in-doubt' / 'Q7.eml'}  age " in text
        assert "from <s@x.test> to alice@example.org,bob@example.org" in text
        assert "tail -n +4 FILE | pullmail sendmail -f SENDER RECIPIENT..." in text
