# -*- test-case-name: tests.test_notify_row -*-
"""
Notifications in a row on one session, pipelined (SPEC 3, RFC 2920).

A notification is MAIL, RCPT..., then ``GDEL <id>`` in place of DATA.
GDEL may go only once its MAIL and at least one RCPT have been accepted:
sent blindly behind a MAIL that is refused, it would be read as the *bare*
form (SPEC 3: ``GDEL <id>`` outside a transaction; RFC 2920 3.1: each
command is answered as if it had been sent alone), a notification this
SMTA never meant to give.  So each write carries the command that ends one
transaction -- GDEL, or RSET when nobody was accepted -- together with the
whole envelope of the next one: one round trip and one write per
notification instead of two, and nothing on the wire that the peer could
read another way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pullmail.smtp.client import Channel, TransactionResult
from pullmail.storage.outbox import OutboxEntry

__all__ = ["Notice", "NotificationRow"]


@dataclass(frozen=True)
class Notice:
    """One notification to give: the entry, and its MAIL and RCPT lines."""

    entry: OutboxEntry
    envelope: list[bytes]


class NotificationRow:
    """
    Gives notifications one after another over C{channel}.

    @param next_notice: the next notification to give now, or None when
        there is none without waiting.
    @param done: records an entry's outcome as soon as its reply is in;
        False stops the row (the peer is struggling).
    @ivar on_the_wire: entries sent whose outcome is not recorded yet (if
        the connection breaks, theirs is the failure).
    @ivar untried: entries begun behind a transaction that stopped the row,
        reset without being notified.
    """

    def __init__(self, channel: Channel, next_notice: Callable[[], Notice | None],
                 done: Callable[[OutboxEntry, TransactionResult], bool]) -> None:
        self.channel = channel
        self.next_notice = next_notice
        self.done = done
        self.on_the_wire: list[OutboxEntry] = []
        self.untried: list[OutboxEntry] = []

    async def run(self, notice: Notice) -> bool:
        """Give C{notice} and those that follow it; False if the row was stopped."""
        self._send([], notice)
        current: Notice | None = notice
        while current is not None:
            result = await self._envelope_replies(current)
            accepted = result.accepted() if result.mail.positive else []
            closing = (f"GDEL {current.entry.id}\r\n".encode("ascii") if accepted
                       else b"RSET\r\n")
            following = self.next_notice()
            self._send([closing], following)
            result.final = await self.channel.reply()
            for recipient in accepted:
                result.recipients[recipient] = result.final
            self.on_the_wire.remove(current.entry)
            if not self.done(current.entry, result):
                if following is not None:
                    await self._reset(following)
                return False
            current = following
        return True

    def _send(self, lines: list[bytes], notice: Notice | None) -> None:
        if notice is not None:
            lines = lines + notice.envelope
            self.on_the_wire.append(notice.entry)
        self.channel.send(b"".join(lines))

    async def _envelope_replies(self, notice: Notice) -> TransactionResult:
        result = TransactionResult(mail=await self.channel.reply())
        for recipient in notice.entry.recipients:
            reply = await self.channel.reply()
            # MAIL refused: every RCPT behind it is too, for MAIL's reason.
            result.recipients[recipient] = reply if result.mail.positive else result.mail
        return result

    async def _reset(self, notice: Notice) -> None:
        """End the transaction begun behind a stopping reply; the entry is untried."""
        await self._envelope_replies(notice)
        self.channel.send(b"RSET\r\n")
        await self.channel.reply()
        self.on_the_wire.remove(notice.entry)
        self.untried.append(notice.entry)
