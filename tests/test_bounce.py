"""
Tests for L{pullmail.outbound.bounce}: DSNs parsed back with the standard library's
C{email} package, and one compared byte for byte with an expected-output file.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import replace
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from pullmail.outbound.bounce import (
    FailedRecipient,
    build_dsn,
    is_bounce,
    should_bounce,
)

EXPECTED = Path(__file__).parent / "data" / "dsn-expected.eml"

ARRIVAL = 1751371200.0  # Tue, 01 Jul 2025 12:00:00 +0000
NOW = 1751544000.0  # Thu, 03 Jul 2025 12:00:00 +0000

# Bare LF line ends, as a message may sit in a file.
ORIGINAL = (
    b"From: alice@sender.test\n"
    b"To: bob@receiver.test, carol@far.test\n"
    b"Subject: lunch\n"
    b"Message-ID: <lunch.1@sender.test>\n"
    b"\n"
    b"Noon at the usual place?\n"
)

BOB = FailedRecipient(
    address="bob@receiver.test",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@receiver.test>: Recipient address rejected: User unknown",
    remote_mta="mx.receiver.test",
)
CAROL = FailedRecipient(address="carol@far.test", status="4.4.7", diagnostic=None, remote_mta=None)


def dsn(**changes) -> bytes:
    """A DSN for L{ORIGINAL} to alice about L{BOB} and L{CAROL}; C{changes} override."""
    arguments = dict(
        reporting_mta="mx.sender.test",
        original_sender="alice@sender.test",
        recipients=[BOB, CAROL],
        original=ORIGINAL,
        queue_id="5F3A9C01D2E4B677",
        arrival_date=ARRIVAL,
        now=NOW,
        boundary="=_pullmail_dsn_0001",
        message_id="dsn.5F3A9C01D2E4B677@mx.sender.test",
    )
    arguments.update(changes)
    return build_dsn(**arguments)


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def parts(message: EmailMessage) -> list[EmailMessage]:
    return list(message.iter_parts())


def report_blocks(message: EmailMessage) -> list[EmailMessage]:
    """The field blocks of the C{message/delivery-status} part: per-message first."""
    return parts(message)[1].get_payload()


class StructureTests:
    def test_multipartReport(self) -> None:
        """
        A DSN is a C{multipart/report; report-type=delivery-status} of a text
        part, the delivery status and the returned message, in that order.
        """
        message = parse(dsn())
        assert message.get_content_type() == "multipart/report"
        assert message.get_param("report-type") == "delivery-status"
        assert message.get_boundary() == "=_pullmail_dsn_0001"
        assert [part.get_content_type() for part in parts(message)] == [
            "text/plain", "message/delivery-status", "message/rfc822",
        ]
        assert message.defects == []

    def test_headers(self) -> None:
        """
        The DSN comes from MAILER-DAEMON at the reporting host, goes to the
        original sender, is dated C{now} and marked as an automatic reply.
        """
        message = parse(dsn())
        assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.sender.test>"
        assert message["To"] == "alice@sender.test"
        assert message["Subject"] == "Undelivered Mail Returned to Sender"
        assert message["Message-ID"] == "<dsn.5F3A9C01D2E4B677@mx.sender.test>"
        assert message["Auto-Submitted"] == "auto-replied"
        assert message["MIME-Version"] == "1.0"
        assert message["Date"].datetime.timestamp() == NOW

    def test_textNamesEveryRecipient(self) -> None:
        """The text part names each recipient with the remote reply or the status."""
        text = parts(parse(dsn()))[0].get_content()
        assert "<bob@receiver.test>: 550 5.1.1" in text
        assert "(from mx.receiver.test)" in text
        assert "<carol@far.test>: delivery time expired (4.4.7)" in text


class DeliveryStatusTests:
    def test_perMessageFields(self) -> None:
        """Reporting-MTA and Arrival-Date come first, in their own block."""
        per_message = report_blocks(parse(dsn()))[0]
        assert per_message["Reporting-MTA"] == "dns; mx.sender.test"
        assert per_message["X-Pullmail-Queue-ID"] == "5F3A9C01D2E4B677"
        assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL

    def test_perRecipientFields(self) -> None:
        """
        Each recipient has its own block with Final-Recipient, Action and
        Status; Remote-MTA and Diagnostic-Code only when a server replied.
        """
        bob, carol = report_blocks(parse(dsn()))[1:]
        assert bob["Final-Recipient"] == "rfc822; bob@receiver.test"
        assert bob["Action"] == "failed"
        assert bob["Status"] == "5.1.1"
        assert bob["Remote-MTA"] == "dns; mx.receiver.test"
        assert bob["Diagnostic-Code"] == (
            "smtp; 550 5.1.1 <bob@receiver.test>: Recipient address rejected: User unknown"
        )
        assert parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW
        assert carol["Final-Recipient"] == "rfc822; carol@far.test"
        assert carol["Status"] == "4.4.7"
        assert "Remote-MTA" not in carol
        assert "Diagnostic-Code" not in carol

    def test_multiLineReply(self) -> None:
        """
        A multi-line remote reply becomes one Diagnostic-Code value, folded
        to lines of at most 78 characters.
        """
        reply = (
            "550-5.7.1 This message was rejected\r\n"
            "550-5.7.1 " + "because " * 20 + "\r\n"
            "550 5.7.1 Bye"
        )
        data = dsn(recipients=[replace(BOB, status="5.7.1", diagnostic=reply)])
        bob = report_blocks(parse(data))[1]
        assert bob["Diagnostic-Code"] == "smtp; " + " ".join(reply.split())
        assert all(len(line) <= 78 for line in data.split(b"\r\n"))

    def test_delayed(self) -> None:
        """
        A delay warning has Action C{delayed}, says so in its Subject, and
        returns the message like a bounce does.
        """
        late = FailedRecipient(
            address="bob@receiver.test",
            status="4.4.1",
            diagnostic=None,
            remote_mta="mx.receiver.test",
            action="delayed",
        )
        message = parse(dsn(recipients=[late]))
        assert message["Subject"] == "Delayed Mail (still being retried)"
        bob = report_blocks(message)[1]
        assert bob["Action"] == "delayed"
        assert bob["Status"] == "4.4.1"
        assert "will keep trying" in parts(message)[0].get_content()
        assert parts(message)[2].get_content_type() == "message/rfc822"


class ReturnedMessageTests:
    def test_smallReturnedWhole(self) -> None:
        """An original no larger than the limit is returned whole, in CRLF."""
        data = dsn(full_message_limit=len(ORIGINAL))
        returned = parts(parse(data))[2]
        assert returned.get_content_type() == "message/rfc822"
        assert returned.get_content()["Subject"] == "lunch"
        assert ORIGINAL.replace(b"\n", b"\r\n") in data

    def test_largeReturnedAsHeaders(self) -> None:
        """
        A larger original is returned as C{text/rfc822-headers}: its header
        block and nothing of its body.
        """
        data = dsn(full_message_limit=len(ORIGINAL) - 1)
        returned = parts(parse(data))[2]
        assert returned.get_content_type() == "text/rfc822-headers"
        headers = ORIGINAL.split(b"\n\n")[0].replace(b"\n", b"\r\n") + b"\r\n"
        assert b"\r\n\r\n" + headers + b"\r\n--=_pullmail_dsn_0001--\r\n" in data
        assert b"Noon" not in data

    def test_crlfOnly(self) -> None:
        """
        Every line of the DSN ends in CRLF, even when the original mixes
        bare LF, bare CR and CRLF.
        """
        mixed = b"Subject: x\r\nTo: bob@receiver.test\n\rbody\rmore\n"
        data = dsn(original=mixed)
        assert re.search(rb"[^\r]\n|\r[^\n]", data) is None
        assert data.endswith(b"\r\n")
        assert b"Subject: x\r\nTo: bob@receiver.test\r\n\r\nbody\r\nmore\r\n" in data


class DeterminismTests:
    def test_sameInputsSameBytes(self) -> None:
        """The DSN depends on its inputs only."""
        assert dsn() == dsn()

    def test_expectedOutput(self) -> None:
        """The DSN matches the checked-in expected output, byte for byte."""
        assert dsn() == EXPECTED.read_bytes()


class ValidationTests:
    def test_boundaryInContent(self) -> None:
        """A boundary that occurs in the original is refused: pick another."""
        original = ORIGINAL + b"--=_pullmail_dsn_0001\n"
        with pytest.raises(ValueError):
            dsn(original=original)

    def test_invalidInputs(self) -> None:
        """Inputs that would make a malformed DSN are refused."""
        for changes in [
            dict(recipients=[]),
            dict(recipients=[replace(BOB, status="550")]),
            dict(recipients=[replace(BOB, action="expanded")]),
            dict(recipients=[replace(BOB, address="bob@receiver.test\r\nBcc: x@y")]),
            dict(original_sender=""),
            dict(boundary="ends in a space "),
        ]:
            with pytest.raises(ValueError):
                dsn(**changes)


class ShouldBounceTests:
    def test_nullSender(self) -> None:
        """The null reverse-path marks a bounce, and a bounce is never bounced."""
        assert is_bounce("")
        assert not should_bounce("")

    def test_sender(self) -> None:
        """Any other sender is told about failures."""
        assert not is_bounce("alice@sender.test")
        assert should_bounce("alice@sender.test")
