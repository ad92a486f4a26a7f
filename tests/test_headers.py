"""Tests for L{pullmail.inbound.headers}: the dates we write, completing a submission."""

from __future__ import annotations

import email.utils

from pullmail.inbound.headers import complete_submission, rfc5322_date

NOON = 1751371200.0  # Tue, 01 Jul 2025 12:00:00 +0000


def test_rfc5322_date_in_utc() -> None:
    assert rfc5322_date(NOON) == "Tue, 01 Jul 2025 12:00:00 +0000"
    assert rfc5322_date(NOON + 0.999) == "Tue, 01 Jul 2025 12:00:00 +0000"
    assert rfc5322_date(NOON + 1.0) == "Tue, 01 Jul 2025 12:00:01 +0000"
    assert rfc5322_date(NOON - 0.5) == "Tue, 01 Jul 2025 11:59:59 +0000"
    parsed = email.utils.parsedate_to_datetime(rfc5322_date(NOON + 86400 * 200 + 7))
    assert parsed.timestamp() == NOON + 86400 * 200 + 7


def test_submission_gets_date_and_message_id() -> None:
    chunks = [b"Subject: hi\r\n", b"\r\nbody\r\n"]
    added = complete_submission(chunks, "mx.example.org", NOON, "abc123")
    assert added == [b"Date: Tue, 01 Jul 2025 12:00:00 +0000\r\n",
                     b"Message-ID: <abc123@mx.example.org>\r\n"] + chunks


def test_submission_keeps_its_own_fields() -> None:
    chunks = [b"date: Mon, 30 Jun 2025 08:00:00 +0200\r\nMessage-Id: <x@y>\r\n\r\nbody\r\n"]
    assert complete_submission(chunks, "mx.example.org", NOON, "abc123") == chunks


def test_fields_in_the_body_do_not_count() -> None:
    chunks = [b"Subject: hi\r\n\r\nDate: not a header\r\nMessage-ID: <nor@this>\r\n"]
    added = complete_submission(chunks, "mx.example.org", NOON, "u")
    assert [line.split(b":")[0] for line in added[:2]] == [b"Date", b"Message-ID"]
