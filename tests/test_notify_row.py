"""
Tests for L{pullmail.outbound.notify.NotificationRow}: notifications in a
row, each GDEL in one write with the next envelope, and never a GDEL behind
a transaction the peer did not accept (SPEC 3, RFC 2920).
"""

from __future__ import annotations

from collections import deque

from test_client import ScriptedChannel as ClientScript
from twisted.internet import defer, error

from pullmail.outbound.notify import Notice, NotificationRow
from pullmail.smtp.client import envelope_commands
from pullmail.smtp.replies import Reply
from pullmail.testing import failure_of, make_entry, result_of

OK = Reply(250, "2.0.0", "Ok")
ACCEPTED = Reply(250, "2.0.0", "notification accepted")
BUSY = Reply(452, "4.3.1", "Too many pending notifications")
NO_USER = Reply(550, "5.1.1", "No such user")
NO_SENDER = Reply(553, "5.1.8", "Bad sender")


class ScriptedChannel(ClientScript):
    """test_client's scripted Channel; an exception in the script breaks the connection."""

    def __init__(self, *replies: Reply | Exception) -> None:
        super().__init__(replies)

    def reply(self) -> defer.Deferred:
        if self.script and isinstance(self.script[0], Exception):
            return defer.fail(self.script.pop(0))
        return super().reply()


def _notice(n: int, recipients=("bob@receiver.example",)) -> Notice:
    entry = make_entry(id=f"Notified_id_{n:08d}", recipients=list(recipients))
    return Notice(entry, envelope_commands(entry.sender, entry.recipients))


class Row:
    def __init__(self, channel: ScriptedChannel, notices: list[Notice],
                 stop_on=lambda result: False) -> None:
        self.queue = deque(notices[1:])
        self.first = notices[0]
        self.outcomes: list = []
        self.stop_on = stop_on
        self.row = NotificationRow(channel, self.next_notice, self.done)

    def next_notice(self):
        return self.queue.popleft() if self.queue else None

    def done(self, entry, result) -> bool:
        self.outcomes.append((entry.id, result))
        return not self.stop_on(result)

    def run(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.row.run(self.first))


def _mail(n: int) -> bytes:
    return b"".join(_notice(n).envelope)


def test_each_gdel_goes_with_the_next_envelope() -> None:
    """Three notifications: four writes, one round trip each, GDEL never blind."""
    channel = ScriptedChannel(OK, OK, ACCEPTED, OK, OK, ACCEPTED, OK, OK, ACCEPTED)
    row = Row(channel, [_notice(1), _notice(2), _notice(3)])
    assert result_of(row.run()) is True
    assert channel.sent == [
        _mail(1),
        b"GDEL Notified_id_00000001\r\n" + _mail(2),
        b"GDEL Notified_id_00000002\r\n" + _mail(3),
        b"GDEL Notified_id_00000003\r\n",
    ]
    assert [entry_id for entry_id, _ in row.outcomes] == [
        "Notified_id_00000001", "Notified_id_00000002", "Notified_id_00000003"]
    for _, result in row.outcomes:
        assert result.final == ACCEPTED
        assert result.accepted() == ["bob@receiver.example"]
    assert row.row.on_the_wire == []


def test_a_refused_mail_is_ended_by_rset_not_a_gdel() -> None:
    """
    A GDEL behind a refused MAIL would be the bare form (SPEC 3): the
    transaction is ended with RSET, and every recipient has MAIL's reply.
    """
    channel = ScriptedChannel(NO_SENDER, Reply(503, "5.5.1", "Need MAIL"), OK,
                              OK, OK, ACCEPTED)
    row = Row(channel, [_notice(1), _notice(2)])
    assert result_of(row.run()) is True
    assert channel.sent[1] == b"RSET\r\n" + _mail(2)
    assert not any(b"GDEL Notified_id_00000001" in write for write in channel.sent)
    (_, refused), (_, accepted) = row.outcomes
    assert refused.recipients == {"bob@receiver.example": NO_SENDER}
    assert refused.final == OK and refused.accepted() == []
    assert accepted.final == ACCEPTED


def test_some_recipients_refused() -> None:
    """GDEL when one RCPT was accepted; the refused one keeps its own reply."""
    both = ("bob@receiver.example", "nobody@receiver.example")
    channel = ScriptedChannel(OK, OK, NO_USER, ACCEPTED)
    row = Row(channel, [_notice(1, both)])
    result_of(row.run())
    assert channel.sent[1] == b"GDEL Notified_id_00000001\r\n"
    [(_, result)] = row.outcomes
    assert result.recipients == {"bob@receiver.example": ACCEPTED,
                                 "nobody@receiver.example": NO_USER}


def test_every_recipient_refused_is_ended_by_rset() -> None:
    channel = ScriptedChannel(OK, NO_USER, OK)
    row = Row(channel, [_notice(1)])
    result_of(row.run())
    assert channel.sent == [_mail(1), b"RSET\r\n"]
    [(_, result)] = row.outcomes
    assert result.refused(permanent=True) == ["bob@receiver.example"]


def test_a_struggling_peer_stops_the_row_and_the_next_is_reset_untried() -> None:
    """A 4xx to GDEL stops the row: the envelope sent behind it is reset, untried."""
    channel = ScriptedChannel(OK, OK, BUSY, OK, OK, OK)
    row = Row(channel, [_notice(1), _notice(2), _notice(3)],
              stop_on=lambda result: result.final.transient)
    assert result_of(row.run()) is False
    assert channel.sent == [_mail(1), b"GDEL Notified_id_00000001\r\n" + _mail(2), b"RSET\r\n"]
    assert [entry_id for entry_id, _ in row.outcomes] == ["Notified_id_00000001"]
    assert [entry.id for entry in row.row.untried] == ["Notified_id_00000002"]
    assert row.row.on_the_wire == []
    assert [n.entry.id for n in row.queue] == ["Notified_id_00000003"]


def test_a_broken_connection_leaves_what_was_on_the_wire() -> None:
    """The connection breaks after a GDEL and the next envelope went: both are on the wire."""
    channel = ScriptedChannel(OK, OK, error.ConnectionLost("gone"))
    row = Row(channel, [_notice(1), _notice(2)])
    failure = failure_of(row.run())
    assert failure.check(error.ConnectionLost)
    assert [entry.id for entry in row.row.on_the_wire] == [
        "Notified_id_00000001", "Notified_id_00000002"]
    assert row.outcomes == []
