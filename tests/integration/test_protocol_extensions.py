"""
Issue 14 against real nodes: mail loops (RFC 5321 6.3) and the
Return-Path:/Delivered-To: local delivery writes.
"""

from __future__ import annotations

import smtplib

import pytest

from .harness import RawSMTP, submit

ALICE = "alice@example.org"
BOB = "bob@example.org"
SENDER = "sender@outside.test"
HOPS = 5


@pytest.fixture(scope="module")
def node(make_module_node):
    """mx.example.org on 127.0.0.101 with [limits] max_received = 5."""
    return make_module_node(
        "extensions", "127.0.0.101", ["example.org"], "mx.example.org",
        users={ALICE: "alice-password", BOB: "bob-password"},
        settings={"limits": {"max_received": HOPS}},
    )


def _message(hops: int, extra: bytes = b"") -> bytes:
    return (b"Received: from a.test by b.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * hops
            + extra + b"From: <sender@outside.test>\r\nSubject: loop\r\n\r\nbody\r\n")


def _mx(node, message: bytes, recipients=(ALICE,)) -> tuple[int, list[str]]:
    with RawSMTP(node.address) as client:
        client.ehlo()
        return client.sendmail(SENDER, recipients, message)


def test_too_many_received_fields_are_refused_and_nothing_stored(node):
    before = node.mail_snapshot()
    code, texts = _mx(node, _message(HOPS + 1))
    assert (code, texts[0][:5]) == (554, "5.4.6")
    assert node.mail_snapshot().new_since(before) == {}


def test_at_the_limit_is_delivered_with_return_path_and_delivered_to(node):
    before = len(node.delivered(BOB))
    code, _ = _mx(node, _message(HOPS), [BOB])
    assert code == 250
    [stored] = node.wait_delivered(BOB, before + 1)[before:]
    assert stored.startswith(b"Return-Path: <sender@outside.test>\r\n"
                             b"Delivered-To: bob@example.org\r\nReceived: from ")


def test_a_copy_coming_back_to_its_mailbox_is_a_loop(node):
    """The stored copy, sent again to the same mailbox, carries our Delivered-To:."""
    code, _ = _mx(node, _message(0, b"Delivered-To: alice@example.org\r\n"))
    assert (code, ) == (554,)
    code, _ = _mx(node, _message(0, b"Delivered-To: alice@example.org\r\n"), [BOB])
    assert code == 250


def test_submission_refuses_loops_too(node):
    before = node.mail_snapshot()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(node, ALICE, "alice-password", [BOB], _message(HOPS + 1))
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error.startswith(b"5.4.6")
    assert node.mail_snapshot().new_since(before) == {}
