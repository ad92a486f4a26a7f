"""
Tests for CHUNKING (RFC 3030) in the machine: L{pullmail.smtp.chunking} and
BDAT in L{ServerMachine} and the reversed turn's L{TurnMachine}.
"""

from __future__ import annotations

import pytest

from pullmail.accounts.users import Accounts
from pullmail.pull.verbs import TurnMachine
from pullmail.smtp import replies
from pullmail.smtp.chunking import ChunkedMessage, ReadChunk, parse_bdat
from pullmail.smtp.envelope import Session
from pullmail.smtp.server import (
    CheckPush,
    Close,
    Deliver,
    EndTurn,
    ServerMachine,
    ServerPolicy,
    State,
)

ACCOUNTS = Accounts(frozenset({"example.org"}), users={"alice@example.org": "h"})


@pytest.mark.parametrize("argument, parsed", [
    ("0 LAST", (0, True)), ("12", (12, False)), ("12 last", (12, True)),
    ("007", (7, False)), ("x", None), ("-1", None), ("", None), ("1 LAST x", None),
    ("1  LAST", None), ("1 FIRST", None), ("9" * 21, None), ("+5", None),
])
def test_parse_bdat(argument, parsed):
    assert parse_bdat(argument) == parsed


def test_chunked_message_limit_is_checked_as_announced():
    message = ChunkedMessage(10)
    message.announce(6, False)
    assert message.add(b"abcdef").code == 250
    message.announce(5, True)
    assert message.error is replies.S552_TOO_BIG
    assert message.add(b"ghijk") is replies.S552_TOO_BIG
    assert message.chunks == [] and message.size == 11


def test_message_ends_with_crlf():
    message = ChunkedMessage(100)
    message.announce(2, True)
    message.add(b"hi")
    assert message.message() == [b"hi", b"\r\n"]


def _policy(**kw) -> ServerPolicy:
    return ServerPolicy(hostname="mx.example.org", domains=("example.org",),
                        accounts=ACCOUNTS, max_size=100, **kw)


def _machine(**kw) -> ServerMachine:
    m = ServerMachine(_policy(**kw), Session("192.0.2.1", "smtp"))
    m.handle("EHLO client.test")
    m.handle("MAIL FROM:<x@remote.test>")
    assert m.handle("RCPT TO:<alice@example.org>").code == 250
    return m


def test_ehlo_offers_chunking():
    m = ServerMachine(_policy(), Session("192.0.2.1", "smtp"))
    assert "CHUNKING" in m.handle("EHLO client.test").text.split("\n")


def test_chunks_then_last_deliver():
    m = _machine()
    assert m.handle("BDAT 3") == ReadChunk(3, False)
    assert m.state is State.BDAT
    assert m.chunk_received(b"a\r\n").code == 250
    assert m.handle("BDAT 2 LAST") == ReadChunk(2, True)
    action = m.chunk_received(b"b\n")
    assert isinstance(action, Deliver)
    assert action.chunks == [b"a\r\n", b"b\n", b"\r\n"] and action.size == 5
    assert m.state is State.READY


@pytest.mark.parametrize("line, reply", [
    ("DATA", (503, "5.5.1")), ("MAIL FROM:<y@remote.test>", (503, "5.5.1")),
    ("RCPT TO:<alice@example.org>", (503, "5.5.1")), ("NOOP", (250, "2.0.0")),
])
def test_between_chunks(line, reply):
    m = _machine()
    m.handle("BDAT 1")
    m.chunk_received(b"a")
    action = m.handle(line)
    assert (action.code, action.enhanced) == reply
    assert m.state is State.BDAT


def test_bad_argument_closes():
    m = _machine()
    action = m.handle("BDAT ten")
    assert isinstance(action, Close)
    assert (action.reply.code, action.reply.enhanced) == (501, "5.5.4")


def test_push_refused_still_reads_the_chunk():
    """[trust] push judges the first BDAT; a refusal comes after its chunk is read."""
    m = _machine(push="reject")
    request = m.handle("BDAT 3 LAST")
    assert isinstance(request, CheckPush)
    refusal = replies.S550_POLICY
    assert m.resolve(request, refusal) == ReadChunk(3, True, keep=False)
    assert m.chunk_received(b"abc") is refusal
    assert m.state is State.READY


def test_push_accepted_goes_on_with_the_chunk():
    m = _machine(push="reject")
    request = m.handle("BDAT 2")
    assert m.resolve(request, None) == ReadChunk(2, False)
    assert m.chunk_received(b"ab").code == 250


def test_reversed_turn_ends_with_the_reply_to_bdat_last():
    """SPEC 4: BDAT LAST is the end of data: its reply ends the SMTA's turn."""
    m = TurnMachine(_policy(push="reject"), Session("192.0.2.1", "smtp"))
    m.handle("MAIL FROM:<x@remote.test>")
    m.handle("RCPT TO:<alice@example.org>")
    assert m.handle("BDAT 2") == ReadChunk(2, False)     # no push check: pulled mail
    assert m.chunk_received(b"ab").code == 250           # not the end of the turn
    m.handle("BDAT 0 LAST")
    request = m.chunk_received(b"")
    assert isinstance(request, Deliver)
    action = m.resolve(request, replies.S250_SENDER_OK)
    assert isinstance(action, EndTurn) and m.state is State.CLOSED


def test_reversed_turn_refused_bdat_ends_the_turn():
    m = TurnMachine(_policy(), Session("192.0.2.1", "smtp"))
    m.handle("MAIL FROM:<x@remote.test>")
    m.handle("RCPT TO:<alice@example.org>")
    m.handle("BDAT 200 LAST")
    action = m.chunk_received(b"x" * 200)
    assert isinstance(action, EndTurn) and action.reply is replies.S552_TOO_BIG


def _helo_machine() -> ServerMachine:
    m = ServerMachine(_policy(), Session("192.0.2.1", "smtp"))
    m.handle("HELO client.test")
    m.handle("MAIL FROM:<x@remote.test>")
    assert m.handle("RCPT TO:<alice@example.org>").code == 250
    return m


def test_bdat_after_helo_is_refused_after_its_chunk():
    """
    RFC 5321 2.2.1: HELO offers no extension, so no CHUNKING.  The chunk is
    pipelined behind the BDAT: it is read and thrown away, not taken as
    commands, then the refusal answers.
    """
    m = _helo_machine()
    assert m.handle("BDAT 8 LAST") == ReadChunk(8, True, keep=False)
    reply = m.chunk_received(b"RSET\r\nXY")
    assert (reply.code, reply.enhanced) == (503, "5.5.1") and "EHLO" in reply.text
    assert m.state is State.RCPT
    assert m.handle("DATA").reply.code == 354    # DATA still works after HELO


def test_bdat_after_helo_with_a_bad_size_closes():
    action = _helo_machine().handle("BDAT x LAST")
    assert isinstance(action, Close) and action.reply.code == 501


@pytest.mark.parametrize("lines, reply", [
    ((), (503, "5.5.1")),                                  # before EHLO
    (("EHLO client.test",), (503, "5.5.1")),               # need MAIL
    (("EHLO client.test", "MAIL FROM:<x@remote.test>",
      "RCPT TO:<nobody@example.org>"), (503, "5.5.1")),     # every RCPT refused
])
def test_out_of_sequence_bdat_still_reads_its_chunk(lines, reply):
    """RFC 3030 2: a pipelined BDAT's chunk follows whatever its reply."""
    m = ServerMachine(_policy(), Session("192.0.2.1", "smtp"))
    for line in lines:
        m.handle(line)
    state = m.state
    assert m.handle("BDAT 6") == ReadChunk(6, False, keep=False)
    action = m.chunk_received(b"QUIT\r\n")
    assert (action.code, action.enhanced) == reply and m.state is state


def test_rcpt_parameters_after_helo():
    """RFC 5321 4.1.1.11: DSN's RCPT parameters need EHLO too."""
    m = ServerMachine(_policy(), Session("192.0.2.1", "smtp"))
    m.handle("HELO client.test")
    m.handle("MAIL FROM:<x@remote.test>")
    reply = m.handle("RCPT TO:<alice@example.org> NOTIFY=SUCCESS")
    assert (reply.code, reply.enhanced) == (555, "5.5.4")


def _turn(offered: bool) -> TurnMachine:
    return TurnMachine(_policy(), Session("192.0.2.1", "smtp", esmtp=True), offered=offered)


def test_reversed_turn_after_a_helo_notification_refuses_bdat():
    """SPEC 4: the SMTA notified after HELO, so it saw no CHUNKING."""
    m = _turn(offered=False)
    assert m.handle("MAIL FROM:<x@remote.test> SIZE=10 BODY=8BITMIME").code == 250
    assert m.handle("RCPT TO:<alice@example.org>").code == 250
    assert m.handle("BDAT 2 LAST") == ReadChunk(2, True, keep=False)
    reply = m.chunk_received(b"ab")
    assert (reply.code, reply.enhanced) == (503, "5.5.1") and m.state is State.RCPT


@pytest.mark.parametrize("line", [
    "MAIL FROM:<x@remote.test> RET=HDRS", "MAIL FROM:<x@remote.test> SMTPUTF8",
])
def test_reversed_turn_after_a_helo_notification_takes_only_size_and_body(line):
    assert _turn(offered=False).handle(line).code == 555
    assert _turn(offered=True).handle(line).code == 250
