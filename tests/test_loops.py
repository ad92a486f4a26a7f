"""
Tests for mail loops (RFC 5321 6.3, issue 14 item 1): the Received: count
on the header only, Delivered-To: written by local delivery and read back
as a loop, and the machine's and the router's ``554 5.4.6``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from pullmail.accounts.users import Accounts
from pullmail.inbound.router import Router
from pullmail.pull.verbs import TurnMachine
from pullmail.smtp import replies
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.loops import (
    delivered_to,
    delivery_fields,
    header_block,
    received_count,
    too_many_hops,
)
from pullmail.smtp.server import Deliver, EndTurn, ServerMachine, ServerPolicy
from pullmail.storage.maildir import BlockingFsync, MaildirDelivery, MaildirNames
from pullmail.testing import FakeDeliveryAgent, result_of

ACCOUNTS = Accounts(frozenset({"example.org"}),
                    users={"alice@example.org": "h", "bob@example.org": "h"}, aliases={})


def _hops(n: int, body: bytes = b"body\r\n") -> list[bytes]:
    return [b"Received: from a by b; x\r\n" * n + b"Subject: s\r\n\r\n" + body]


@pytest.mark.parametrize("chunks, header", [
    ([b"A: 1\r\nB: 2\r\n\r\nbody\r\n"], b"A: 1\r\nB: 2\r\n"),
    ([b"A: 1\r\n", b"\r\n", b"body\r\n"], b"A: 1\r\n"),       # blank line in its own chunk
    ([b"A: 1\r", b"\n\r", b"\nbody\r\n"], b"A: 1\r\n"),       # split inside the CRLF CRLF
    ([b"\r\nReceived: x\r\n"], b""),                          # no header at all
    ([b"A: 1\r\nB: 2\r\n"], b"A: 1\r\nB: 2\r\n"),              # all header, no body
    ([], b""),
])
def test_header_block(chunks, header):
    assert header_block(chunks) == header


@pytest.mark.parametrize("header, count", [
    (b"Received: a\r\nreceived : b\r\nRECEIVED:\tc\r\n", 3),
    (b"X-Received: a\r\nSubject: Received: b\r\n", 0),
    (b"Subject: x\r\n Received: folded, not a field\r\n", 0),
])
def test_received_count(header, count):
    assert received_count(header) == count


def test_body_received_lines_do_not_count():
    """Only the header is read: a body quoting 500 trace fields is no loop."""
    assert not too_many_hops(_hops(1, b"Received: x\r\n" * 500), 100)
    assert not too_many_hops(_hops(100), 100)
    assert too_many_hops(_hops(101), 100)


def test_delivered_to_and_the_fields_written():
    fields = delivery_fields("x@remote.test", "alice@example.org")
    assert fields == b"Return-Path: <x@remote.test>\r\nDelivered-To: alice@example.org\r\n"
    assert delivery_fields("", None) == b"Return-Path: <>\r\n"
    assert delivered_to(fields + b"delivered-to: <Bob@Example.org> \r\n") == {
        "alice@example.org", "bob@example.org"}


def _machine(cls=ServerMachine, limit: int = 100):
    policy = ServerPolicy(hostname="mx.example.org", domains=("example.org",),
                          accounts=ACCOUNTS, max_received=limit)
    if cls is TurnMachine:
        m = TurnMachine(policy, Session("192.0.2.1", "smtp"))
    else:
        m = ServerMachine(policy, Session("192.0.2.1", "smtp"))
        m.handle("EHLO client.test")
    m.handle("MAIL FROM:<x@remote.test>")
    m.handle("RCPT TO:<alice@example.org>")
    m.handle("DATA")
    return m


@pytest.mark.parametrize("limit, hops, refused", [(100, 100, False), (100, 101, True),
                                                   (2, 3, True), (2, 2, False)])
def test_machine_refuses_too_many_hops(limit, hops, refused):
    action = _machine(limit=limit).data_received(_hops(hops), 1, None)
    if refused:
        assert action is replies.S554_TOO_MANY_HOPS
        assert (action.code, action.enhanced) == (554, "5.4.6")
    else:
        assert isinstance(action, Deliver)


def test_reversed_turn_ends_with_the_loop_refusal():
    """SPEC 4: the refusal is the reply to end-of-data, so it ends the turn."""
    m = _machine(TurnMachine)
    action = m.data_received(_hops(101), 1, None)
    assert isinstance(action, EndTurn) and action.reply is replies.S554_TOO_MANY_HOPS


def _router(delivery=None):
    return Router("mx.example.org", ACCOUNTS, delivery or FakeDeliveryAgent(), Clock())


def test_router_refuses_a_message_delivered_here_before():
    delivery = FakeDeliveryAgent()
    router = _router(delivery)
    chunks = [b"Delivered-To: alice@example.org\r\nSubject: s\r\n\r\nhi\r\n"]
    reply = result_of(router.accept(Session("192.0.2.1", "smtp"),
                                    Envelope("x@remote.test", ("alice@example.org",)), chunks, 9))
    assert reply is replies.S554_DELIVERED_BEFORE
    assert delivery.calls == []


def test_router_delivers_when_delivered_to_names_another_mailbox():
    delivery = FakeDeliveryAgent()
    chunks = [b"Delivered-To: bob@example.org\r\nSubject: s\r\n\r\nDelivered-To: "
              b"alice@example.org\r\n"]
    reply = result_of(_router(delivery).accept(
        Session("192.0.2.1", "smtp"), Envelope("x@remote.test", ("alice@example.org",)),
        chunks, 9))
    assert reply.code == 250
    assert list(delivery.mailboxes) == ["alice@example.org"]


def test_maildir_copies_each_name_their_mailbox(tmp_path: Path):
    """virtual(8): each mailbox's copy has its own Delivered-To: (no shared link)."""
    delivery = MaildirDelivery(tmp_path, MaildirNames(Clock(), "h", 1), BlockingFsync())
    outcome = result_of(delivery.deliver("Q1", "x@remote.test",
                                         ["alice@example.org", "bob@example.org"],
                                         [b"Subject: s\r\n\r\nhi\r\n"]))
    texts = {path.parent.parent.name: path.read_bytes() for path in outcome.paths}
    assert texts == {
        name: (b"Return-Path: <x@remote.test>\r\nDelivered-To: " + name.encode()
               + b"@example.org\r\nSubject: s\r\n\r\nhi\r\n")
        for name in ("alice", "bob")
    }
    # Read back, each copy is a loop for its own mailbox only.
    assert delivered_to(header_block([texts["alice"]])) == {"alice@example.org"}
