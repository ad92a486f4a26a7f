"""
The client side of SMTP: a reply reader without I/O, and the client
dialogues written once as coroutines over a L{Channel}.

The same L{send_transaction} serves classic push (on an outbound
connection) and the SMTA's reversed turn after ``RETR`` (on the connection
the RMTA opened); L{send_notification} is the transaction form of ``GDEL``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from twisted.internet.defer import Deferred

from pullmail.logsafe import printable
from pullmail.smtp.dsn import mail_parameters, rcpt_parameters
from pullmail.smtp.replies import Reply

__all__ = [
    "ReplyReader",
    "ProtocolError",
    "Channel",
    "TransactionResult",
    "envelope_commands",
    "send_transaction",
    "send_notification",
    "parse_ehlo",
    "dot_stuff",
    "EHLOResult",
    "open_session",
    "open_lmtp_session",
    "send_lmtp_transaction",
]

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
# A reply line is at most 512 octets (RFC 5321 4.5.3.1.5); a multi-line
# reply of more than this many lines is hostile.
MAX_REPLY_LINE = 512
MAX_REPLY_LINES = 100


class ProtocolError(Exception):
    """The peer sent something that is not an SMTP reply."""


class ReplyReader:
    """Bytes in, complete L{Reply} values out (RFC 5321 4.2)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_rest(self) -> bytes:
        """What arrived after the last complete reply taken."""
        rest, self._buffer = self._buffer, b""
        self._lines = []
        return rest

    def next_reply(self) -> Reply | None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise ProtocolError("reply line too long")
                return None
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            if len(raw) + 1 > MAX_REPLY_LINE:
                raise ProtocolError("reply line too long")
            # RFC 5321 4.2: reply text is printable; a peer's escape
            # sequences would otherwise reach logs and bounces as they are.
            line = printable(raw.removesuffix(b"\r"), limit=MAX_REPLY_LINE)
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                raise ProtocolError(f"not a reply: {line[:60]!r}")
            if self._lines and self._lines[0][:3] != line[:3]:
                raise ProtocolError("reply code changed inside a multi-line reply")
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                raise ProtocolError("reply has too many lines")
            if line[3:4] != "-":
                lines, self._lines = self._lines, []
                return _reply_from_lines(lines)


def _reply_from_lines(lines: list[str]) -> Reply:
    code = int(lines[0][:3])
    texts = [line[4:] for line in lines]
    match = _ENHANCED.match(texts[0])
    enhanced = ""
    if match and match.group(1) == str(code)[0]:
        enhanced = match.group(0).strip()
        texts = [t[len(enhanced):].lstrip(" ") if _ENHANCED.match(t) else t for t in texts]
    return Reply(code, enhanced, "\n".join(texts))


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> their parameters."""
    keywords = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, parameters = line.partition(" ")
        keywords[keyword.upper()] = parameters
    return keywords


class Channel(Protocol):
    """A connection in the client role."""

    def send(self, data: bytes) -> None:
        ...

    def reply(self) -> Deferred:
        """The next reply from the peer, as a Deferred L{Reply}."""


@dataclass
class TransactionResult:
    """
    The outcome of one mail transaction.  C{recipients} maps each address
    to the reply that decided it: the RCPT reply if it was refused, else
    the reply to end-of-data (or to GDEL).  C{unanswered} (LMTP): the
    addresses whose reply to the data never came, the data sent.
    """

    mail: Reply | None = None
    recipients: dict[str, Reply] = field(default_factory=dict)
    final: Reply | None = None
    unanswered: list[str] = field(default_factory=list)

    def accepted(self) -> list[str]:
        return [r for r, reply in self.recipients.items() if reply.positive]

    def refused(self, permanent: bool) -> list[str]:
        return [
            r for r, reply in self.recipients.items()
            if (reply.permanent if permanent else reply.transient)
        ]


def dot_stuff(chunks: Sequence[bytes]) -> bytes:
    """RFC 5321 4.5.2: double a leading dot; end with CRLF . CRLF."""
    message = b"".join(chunks)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]
    return stuffed + b".\r\n"


def _mail_command(sender: str, size: int | None, body: str | None, smtputf8: bool,
                  dsn: Mapping | None = None) -> bytes:
    parameters = ""
    if size is not None:
        parameters += f" SIZE={size}"
    if body:
        parameters += f" BODY={body}"
    if smtputf8:
        parameters += " SMTPUTF8"
    if dsn:
        parameters += mail_parameters(dsn)
    return f"MAIL FROM:<{sender}>{parameters}\r\n".encode("utf-8")


def envelope_commands(sender: str, recipients: Sequence[str], size: int | None = None,
                      body: str | None = None, smtputf8: bool = False,
                      dsn: Mapping | None = None) -> list[bytes]:
    """MAIL and its RCPTs, one command line each (with DSN's parameters when given)."""
    return [_mail_command(sender, size, body, smtputf8, dsn)] + [
        f"RCPT TO:<{r}>{rcpt_parameters(dsn, r) if dsn else ''}\r\n".encode("utf-8")
        for r in recipients
    ]


async def _envelope(
    channel: Channel, sender: str, recipients: Sequence[str], size: int | None,
    body: str | None, smtputf8: bool, pipelining: bool, dsn: Mapping | None = None,
) -> TransactionResult:
    """
    MAIL and RCPT, pipelined when allowed (RFC 2920); with C{dsn} (the
    peer offers DSN) their DSN parameters (RFC 3461).
    """
    result = TransactionResult()
    commands = envelope_commands(sender, recipients, size, body, smtputf8, dsn)
    if pipelining:
        channel.send(b"".join(commands))
        result.mail = await channel.reply()
        for recipient in recipients:
            result.recipients[recipient] = await channel.reply()
        return result
    channel.send(commands[0])
    result.mail = await channel.reply()
    if not result.mail.positive:
        return result
    for recipient, command in zip(recipients, commands[1:]):
        channel.send(command)
        result.recipients[recipient] = await channel.reply()
    return result


def _refuse_all(result: TransactionResult, recipients: Sequence[str], reply: Reply) -> None:
    for recipient in recipients:
        result.recipients[recipient] = reply


async def _reset_after_refusal(channel: Channel, result: TransactionResult,
                               recipients: Sequence[str]) -> bool:
    """
    When MAIL or every RCPT was refused, say RSET and report the refusal;
    True when the transaction cannot go on.
    """
    if result.mail.positive and result.accepted():
        return False
    if not result.mail.positive:
        _refuse_all(result, recipients, result.mail)
    channel.send(b"RSET\r\n")
    result.final = await channel.reply()
    return True


async def send_transaction(
    channel: Channel, sender: str, recipients: Sequence[str], chunks: Sequence[bytes],
    *, size: int | None = None, body: str | None = None, smtputf8: bool = False,
    pipelining: bool = True, chunking: bool = False, dsn: Mapping | None = None,
) -> TransactionResult:
    """
    MAIL, RCPT..., DATA, message; or RSET when nobody is accepted.  With
    C{chunking} (the peer offers CHUNKING) the message goes as one
    ``BDAT <n> LAST`` (RFC 3030), as it is: no dot-stuffing.  C{dsn}: the
    DSN parameters to pass on (only to a peer that offers DSN).
    """
    result, accepted = await _send_with_data(
        channel, sender, recipients, chunks, size, body, smtputf8, pipelining, chunking, dsn
    )
    if accepted:
        result.final = await channel.reply()
        _refuse_all(result, accepted, result.final)
    return result


async def _send_with_data(
    channel: Channel, sender: str, recipients: Sequence[str], chunks: Sequence[bytes],
    size: int | None, body: str | None, smtputf8: bool, pipelining: bool,
    chunking: bool = False, dsn: Mapping | None = None,
) -> tuple[TransactionResult, list[str]]:
    """
    MAIL, RCPT..., then DATA and the message after its 354 (RSET when
    nobody is accepted).  Returns the result so far and the recipients
    whose outcome the reply to the data decides: none when no data went.
    """
    result = await _envelope(channel, sender, recipients, size, body, smtputf8, pipelining, dsn)
    if await _reset_after_refusal(channel, result, recipients):
        return result, []
    accepted = result.accepted()
    if chunking:
        # RFC 3030 2: one chunk, exactly its octets; its one reply (or,
        # over LMTP, one per recipient) is the reply to the data.
        data = b"".join(chunks)
        channel.send(b"BDAT %d LAST\r\n" % len(data) + data)
        return result, accepted
    channel.send(b"DATA\r\n")
    go_ahead = await channel.reply()
    if go_ahead.code != 354:
        if go_ahead.positive:
            # Only 354 lets the data go: a 2xx here means the replies are
            # out of step, and taking it would mark unsent mail delivered.
            raise ProtocolError(f"unexpected reply to DATA: {go_ahead}")
        _refuse_all(result, accepted, go_ahead)
        result.final = go_ahead
        return result, []
    channel.send(dot_stuff(chunks))
    return result, accepted


async def send_notification(
    channel: Channel, sender: str, recipients: Sequence[str], gdel_id: str,
    *, size: int | None = None, pipelining: bool = True, smtputf8: bool = False,
    dsn: Mapping | None = None,
) -> TransactionResult:
    """SPEC 3: MAIL, RCPT..., then GDEL <id> in place of DATA."""
    result = await _envelope(channel, sender, recipients, size, None, smtputf8, pipelining, dsn)
    if await _reset_after_refusal(channel, result, recipients):
        return result
    channel.send(f"GDEL {gdel_id}\r\n".encode("ascii"))
    result.final = await channel.reply()
    _refuse_all(result, result.accepted(), result.final)
    return result


class Refused(Exception):
    """The peer refused the session itself (greeting, EHLO, STARTTLS)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class EHLOResult:
    """
    What a session opened with: the peer's EHLO keywords (upper case ->
    parameters; empty after HELO) and whether TLS is up.
    """

    keywords: Mapping[str, str]
    tls: bool = False

    def offers(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords


async def open_session(channel, hostname: str, tls_options=None,
                       require_tls: bool = False) -> EHLOResult:
    """
    Read the greeting, say EHLO (HELO when EHLO is refused), and start TLS
    when the peer offers it and C{tls_options} is given (RFC 3207: EHLO
    again after the handshake).  With C{require_tls}, a peer without
    STARTTLS is refused.
    """
    await _greeted(channel)
    keywords = await _hello(channel, hostname)
    if require_tls and "STARTTLS" not in keywords:
        raise Refused(Reply(454, "4.7.0", "peer does not offer STARTTLS (tls = verify)"))
    if tls_options is not None and "STARTTLS" in keywords:
        channel.send(b"STARTTLS\r\n")
        ready = await channel.reply()
        if ready.code != 220:
            raise Refused(ready)
        channel.start_tls(tls_options)
        return EHLOResult(await _hello(channel, hostname), tls=True)
    return EHLOResult(keywords)


async def _greeted(channel) -> None:
    """RFC 5321 3.1 (and RFC 2033 4.1): anything but a 220 greeting refuses the session."""
    greeting = await channel.reply()
    if greeting.code != 220:
        raise Refused(greeting)


async def _hello(channel, hostname: str) -> dict[str, str]:
    channel.send(f"EHLO {hostname}\r\n".encode("ascii"))
    reply = await channel.reply()
    if reply.code == 250:
        return parse_ehlo(reply)
    channel.send(f"HELO {hostname}\r\n".encode("ascii"))
    reply = await channel.reply()
    if reply.code != 250:
        raise Refused(reply)
    return {}


# -- LMTP (RFC 2033): the same dialogue, LHLO and one reply per recipient ------


async def open_lmtp_session(channel: Channel, hostname: str) -> dict[str, str]:
    """
    RFC 2033 4.1: read the greeting and say LHLO (there is no HELO to fall
    back to).  Returns the LHLO keywords.
    """
    await _greeted(channel)
    channel.send(f"LHLO {hostname}\r\n".encode("ascii"))
    reply = await channel.reply()
    if reply.code != 250:
        raise Refused(reply)
    return parse_ehlo(reply)


async def send_lmtp_transaction(
    channel: Channel, sender: str, recipients: Sequence[str], chunks: Sequence[bytes],
    *, size: int | None = None, body: str | None = None, smtputf8: bool = False,
    pipelining: bool = True,
) -> TransactionResult:
    """
    MAIL, RCPT..., DATA, message, as L{send_transaction}; but the server
    answers the data once for each recipient whose RCPT it accepted, in
    RCPT order (RFC 2033 4.2), and each reply decides its own recipient.
    When the connection breaks (or times out, or sends what is not a
    reply) among these replies, the recipients still waiting for theirs
    are C{unanswered}: the store may have delivered to them or not, and
    no reply of ours can say which.  C{final} is the last reply read, or
    a 451 saying why the rest never came.
    """
    result, accepted = await _send_with_data(
        channel, sender, recipients, chunks, size, body, smtputf8, pipelining
    )
    for position, recipient in enumerate(accepted):
        try:
            result.final = await channel.reply()
        except Exception as e:  # lost, timed out, or not a reply: the rest never came
            result.final = Reply(451, "4.4.2", f"no reply after the data: {e or type(e).__name__}")
            result.unanswered = accepted[position:]
            for unanswered in result.unanswered:   # their RCPT's 250 decides nothing
                del result.recipients[unanswered]
            break
        result.recipients[recipient] = result.final
    return result
