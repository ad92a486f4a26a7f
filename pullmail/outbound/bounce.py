# -*- test-case-name: tests.test_bounce -*-
"""
Delivery Status Notifications (RFC 3464): the bounce and the delay warning.

A pure builder.  The clock, the reporting host name, the MIME boundary and
the Message-ID are all inputs, so the same inputs give the same bytes and a
DSN can be checked against an expected-output file.  Sending it (with the
null reverse-path, RFC 5321 4.5.5) is the caller's job.

The message is a C{multipart/report; report-type=delivery-status}
(RFC 6522) of three parts (RFC 3464 2):

  1. C{text/plain}: what happened, for a person;
  2. C{message/delivery-status}: the same, for a program (RFC 3464 2.1);
  3. the original: C{message/rfc822} when it is small, otherwise
     C{text/rfc822-headers} with its header block only (RFC 3464 2, RFC 6522).

Every line ends in CRLF, including the lines of the returned original.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from pullmail.inbound.headers import rfc5322_date
from pullmail.smtp.dsn import xtext_decode

__all__ = [
    "FailedRecipient",
    "build_dsn",
    "is_bounce",
    "should_bounce",
    "FULL_MESSAGE_LIMIT",
]

# Originals up to this size are returned whole, larger ones as headers only.
FULL_MESSAGE_LIMIT = 64 * 1024

# The Action values this builder writes (RFC 3464 2.3.3): failures and
# delays, and the success reports NOTIFY=SUCCESS asks for (RFC 3461 4.1).
_ACTIONS = ("failed", "delayed", "delivered", "relayed")

# status-code = class "." subject "." detail; class is 2, 4 or 5, subject and
# detail are 1*3digit (RFC 3463 2).
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")

# boundary := 0*69<bchars> bcharsnospace (RFC 2046 5.1.1).
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")

# A remote reply is quoted in Diagnostic-Code and in the text part.  RFC 5321
# 4.5.3.1.5 allows 512 octets per reply line, but a multi-line reply has no
# limit; this cut keeps every line we write far below the 998 octets of
# RFC 5322 2.1.1 even when the reply has no space to fold at.
_DIAGNOSTIC_MAX = 900

# RFC 5322 2.1.1: lines SHOULD be no longer than 78 characters.
_FOLD_WIDTH = 78

# A few RFC 3463 3 subject.detail codes, for the person reading part 1 when
# there is no remote reply to quote (an expiry, a DNS failure).
_STATUS_TEXT = {
    "1.1": "no such mailbox",
    "1.2": "no such domain",
    "4.1": "no answer from the receiving host",
    "4.2": "connection dropped",
    "4.4": "no mail server for the domain",
    "4.7": "delivery time expired",
    "5.3": "too many recipients",
    "7.1": "delivery not authorized",
}

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}

_EXPLANATIONS = {
    "failed": (
        "Your message could not be delivered to the recipients below. "
        "The mail system has given up on them."
    ),
    "delayed": (
        "Your message has not yet been delivered to the recipients below. "
        "The mail system will keep trying; you do not need to send it again."
    ),
    "delivered": "Your message was delivered to the recipients below.",
    "relayed": (
        "Your message was passed on to the recipients below, to a system "
        "that will not report on them (no DSN support)."
    ),
}


@dataclass(frozen=True)
class FailedRecipient:
    """
    One recipient to report on: one per-recipient block (RFC 3464 2.3).

    @ivar address: the Final-Recipient (RFC 3464 2.3.2), a mailbox.
    @ivar status: the Status (RFC 3464 2.3.4), an RFC 3463 code such as
        ``"5.1.1"`` or, after the outbox lifetime ran out, ``"4.4.7"``.
    @ivar diagnostic: the remote SMTP reply, such as
        ``"550 5.1.1 No such user"``, written as C{Diagnostic-Code: smtp;}
        (RFC 3464 2.3.6); C{None} when no server replied.
    @ivar remote_mta: the host that gave C{diagnostic}, written as
        C{Remote-MTA: dns;} (RFC 3464 2.3.5), or C{None}.
    @ivar action: ``"failed"`` (a bounce) or ``"delayed"`` (a delay warning)
        (RFC 3464 2.3.3).
    """

    address: str
    status: str
    diagnostic: str | None
    remote_mta: str | None
    action: str = "failed"
    # ORCPT as given (RFC 3461 4.2: addr-type;xtext), for Original-Recipient.
    original_recipient: str | None = None


def is_bounce(sender: str) -> bool:
    """
    Whether a message with this envelope sender is itself a notification:
    DSNs are sent with the null reverse-path, ``""`` (RFC 5321 4.5.5,
    RFC 3464 2).
    """
    return sender == ""


def should_bounce(sender: str) -> bool:
    """
    Whether a failure may be reported to this envelope sender.  Never to the
    null reverse-path: that would bounce a bounce (RFC 5321 4.5.5).
    """
    return not is_bounce(sender)


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    recipients: list[FailedRecipient],
    original: bytes,
    queue_id: str,
    arrival_date: float,
    now: float,
    boundary: str,
    message_id: str,
    full_message_limit: int = FULL_MESSAGE_LIMIT,
    envid: str | None = None,
) -> bytes:
    """
    The complete DSN message, CRLF line ends throughout.

    @param reporting_mta: this host's name: the From address
        C{MAILER-DAEMON@reporting_mta} and C{Reporting-MTA} (RFC 3464 2.2.2).
    @param original_sender: the envelope sender of C{original}, the DSN's
        To.  Check L{should_bounce} first.
    @param recipients: at least one; failed and delayed ones may be mixed
        (RFC 3464 2.3.3), and the Subject then says "undelivered".
    @param original: the message as queued; any line ends.
    @param queue_id: the original's queue id, written as the extension field
        C{X-Pullmail-Queue-ID} (RFC 3464 2.4) so an operator can find its log.
    @param arrival_date: when the original was accepted, POSIX seconds
        (C{Arrival-Date}, RFC 3464 2.2.5).
    @param now: when the DSN is made, POSIX seconds: the C{Date} and each
        C{Last-Attempt-Date} (RFC 3464 2.3.7).
    @param boundary: the MIME boundary (RFC 2046 5.1.1); pick it at random.
    @param message_id: the DSN's Message-ID, without angle brackets.
    @param full_message_limit: originals of at most this many octets are
        returned whole, larger ones as headers only (0: RET=HDRS).
    @param envid: the ENVID the sender gave (RFC 3461 4.4), as xtext:
        echoed as C{Original-Envelope-Id} (RFC 3464 2.2.1).

    @raise ValueError: no recipients; an Action, Status or boundary that is
        not valid; a control character in a header value; or C{boundary}
        occurs in the content (choose another and call again).
    """
    if not recipients:
        raise ValueError("a DSN reports on at least one recipient")
    for name, value in [
        ("reporting_mta", reporting_mta),
        ("original_sender", original_sender),
        ("queue_id", queue_id),
        ("message_id", message_id),
    ]:
        _check_field(name, value)
    for rcpt in recipients:
        _check_recipient(rcpt)
    if _BOUNDARY.fullmatch(boundary) is None:
        raise ValueError(f"boundary {boundary!r} is not valid (RFC 2046 5.1.1)")
    if not should_bounce(original_sender):
        raise ValueError("never send a DSN to the null reverse-path")

    if any(rcpt.action == "failed" for rcpt in recipients):
        kind = "failed"
    elif any(rcpt.action == "delayed" for rcpt in recipients):
        kind = "delayed"
    else:
        kind = "delivered"

    normalized = _crlf(original)
    if len(original) <= full_message_limit:
        returned_type = b"message/rfc822"
        returned = normalized
    else:
        returned_type = b"text/rfc822-headers"
        returned = _header_block(normalized)
    if returned and not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    description = {"failed": b"Undelivered message", "delayed": b"Delayed message"}.get(
        kind, b"Delivered message")
    if returned_type == b"text/rfc822-headers":
        description += b" headers"

    text = _notification(reporting_mta, queue_id, recipients)
    charset = b"us-ascii" if text.isascii() else b"utf-8"
    parts = [
        _part(
            [
                b"Content-Type: text/plain; charset=" + charset,
                b"Content-Description: Notification",
            ],
            text,
        ),
        _part(
            [b"Content-Type: message/delivery-status", b"Content-Description: Delivery report"],
            _delivery_status(reporting_mta, queue_id, arrival_date, now, recipients, envid),
        ),
        _part(
            [b"Content-Type: " + returned_type, b"Content-Description: " + description],
            returned,
        ),
    ]
    delimiter = b"--" + boundary.encode("ascii")
    for part in parts:
        if delimiter in part:
            raise ValueError(f"boundary {boundary!r} occurs in the content")

    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{original_sender}>",
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: <{message_id}>",
        # RFC 3834 5: a machine answering, so no one answers it in turn.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        # RFC 3464 2 and RFC 6522: the report-type names the second part.
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    out = [_lines(headers), b"\r\n", b"This is a MIME-encapsulated message.\r\n"]
    for part in parts:
        out += [b"\r\n", delimiter, b"\r\n", part]
    # The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
    out += [b"\r\n", delimiter, b"--\r\n"]
    return b"".join(out)


def _notification(reporting_mta: str, queue_id: str, recipients) -> bytes:
    """Part 1: text for a person, grouped by Action."""
    paragraphs = [
        f"This is the mail system at {reporting_mta}.",
    ]
    for action in _ACTIONS:
        group = [rcpt for rcpt in recipients if rcpt.action == action]
        if not group:
            continue
        paragraphs.append(textwrap.fill(_EXPLANATIONS[action], width=72))
        for rcpt in group:
            item = f"<{rcpt.address}>: {_reason(rcpt)}"
            paragraphs.append(
                textwrap.fill(item, width=72, initial_indent="  ", subsequent_indent="    ")
            )
    paragraphs.append(f"The message's queue id is {queue_id}; its details follow.")
    return _lines("\n\n".join(paragraphs).split("\n"))


def _reason(rcpt: FailedRecipient) -> str:
    if rcpt.action in ("delivered", "relayed"):
        return f"{rcpt.action} ({rcpt.status})"
    if rcpt.diagnostic is not None:
        reason = _one_line(rcpt.diagnostic)
        if rcpt.remote_mta is not None:
            reason += f" (from {rcpt.remote_mta})"
        return reason
    _, subject_detail = rcpt.status.split(".", 1)
    return f"{_STATUS_TEXT.get(subject_detail, 'delivery failed')} ({rcpt.status})"


def _delivery_status(reporting_mta, queue_id, arrival_date, now, recipients,
                     envid: str | None = None) -> bytes:
    """
    Part 2, C{message/delivery-status} (RFC 3464 2.1): the per-message
    fields, then one block of per-recipient fields per recipient, each block
    after an empty line.
    """
    per_message = [f"Original-Envelope-Id: {_decoded(envid)}"] if envid else []  # 2.2.1
    per_message += [
        f"Reporting-MTA: dns; {reporting_mta}",  # RFC 3464 2.2.2
        f"X-Pullmail-Queue-ID: {queue_id}",  # extension field, RFC 3464 2.4
        f"Arrival-Date: {rfc5322_date(arrival_date)}",  # RFC 3464 2.2.5
    ]
    blocks = [_lines(per_message)]
    for rcpt in recipients:
        fields = []
        if rcpt.original_recipient:   # RFC 3464 2.3.1, from ORCPT (RFC 3461 4.2)
            addr_type, _, address = rcpt.original_recipient.partition(";")
            if addr_type != "utf-8":
                address = _decoded(address)
            # RFC 6533 3: a utf-8 one stays utf-8-addr-xtext in this 7-bit part.
            fields.append(f"Original-Recipient: {addr_type}; {address}")
        fields += [
            f"Final-Recipient: rfc822; {rcpt.address}",  # RFC 3464 2.3.2
            f"Action: {rcpt.action}",  # RFC 3464 2.3.3
            f"Status: {rcpt.status}",  # RFC 3464 2.3.4
        ]
        if rcpt.remote_mta is not None:
            fields.append(f"Remote-MTA: dns; {rcpt.remote_mta}")  # RFC 3464 2.3.5
        if rcpt.diagnostic is not None:
            # RFC 3464 2.3.6; long replies are folded (RFC 3464 2.1.1).
            fields.append(_fold(f"Diagnostic-Code: smtp; {_one_line(rcpt.diagnostic)}"))
        fields.append(f"Last-Attempt-Date: {rfc5322_date(now)}")  # RFC 3464 2.3.7
        blocks.append(_lines(fields))
    return b"\r\n".join(blocks)


def _decoded(xtext: str) -> str:
    """An xtext value as a header may hold it: decoded, controls dropped."""
    text = xtext_decode(xtext) or xtext
    return "".join(ch for ch in text if ch.isprintable())


def _part(headers: list[bytes], body: bytes) -> bytes:
    """One body part; 8-bit content is labelled so (RFC 2045 6.2)."""
    if any(byte >= 0x80 for byte in body):
        headers = headers + [b"Content-Transfer-Encoding: 8bit"]
    return b"".join(header + b"\r\n" for header in headers) + b"\r\n" + body


def _header_block(message: bytes) -> bytes:
    """The header lines of a CRLF message, up to its first empty line."""
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end == -1 else message[: end + 2]


def _crlf(data: bytes) -> bytes:
    """Every line end, bare LF and bare CR too, as CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _lines(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def _one_line(text: str) -> str:
    """
    Remote text as one line: whitespace runs (a multi-line reply's CRLFs too)
    become one space, other control characters go, and it is cut to
    C{_DIAGNOSTIC_MAX}.
    """
    text = " ".join(text.split())
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:_DIAGNOSTIC_MAX]


def _fold(line: str) -> str:
    """Fold a field at spaces to C{_FOLD_WIDTH} columns (RFC 5322 2.2.3)."""
    words = line.split(" ")
    folded = [words[0]]
    for word in words[1:]:
        if len(folded[-1]) + 1 + len(word) > _FOLD_WIDTH:
            folded.append(" " + word)
        else:
            folded[-1] += " " + word
    return "\r\n".join(folded)


def _check_field(name: str, value: str) -> None:
    """Values written into a header line must not break it."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{name} {value!r} contains a control character")


def _check_recipient(rcpt: FailedRecipient) -> None:
    _check_field("address", rcpt.address)
    if rcpt.remote_mta is not None:
        _check_field("remote_mta", rcpt.remote_mta)
    if rcpt.action not in _ACTIONS:
        raise ValueError(f"action {rcpt.action!r} is not one of {_ACTIONS}")
    if _STATUS.fullmatch(rcpt.status) is None:
        raise ValueError(f"status {rcpt.status!r} is not an RFC 3463 code")
