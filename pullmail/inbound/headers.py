"""
Header fields we write: the RFC 5322 date, and completing a submitted
message's header (RFC 6409 8.2, 8.3): a message from a user's client that
lacks ``Message-ID`` or ``Date`` gets them.  Pure: the time and the id's
random part are inputs.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import math
import re
from typing import Sequence

__all__ = ["complete_submission", "rfc5322_date"]

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


def rfc5322_date(timestamp: float) -> str:
    """
    An RFC 5322 3.3 date-time in UTC, e.g. ``Tue, 01 Jul 2025 12:00:00
    +0000`` ("-0000" would mean "zone unknown").  Every message received
    gets one in its trace header: the text is made once per second.
    """
    return _date_of_second(math.floor(timestamp))


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.timezone.utc))


def _header_names(message_start: bytes) -> set[bytes]:
    end = message_start.find(b"\r\n\r\n")
    header = message_start if end < 0 else message_start[: end + 2]
    if message_start.startswith(b"\r\n"):
        header = b""
    return {match.group(1).lower() for match in _FIELD.finditer(header)}


def complete_submission(
    chunks: Sequence[bytes], hostname: str, now: float, unique: str
) -> list[bytes]:
    """Prepend ``Date`` and ``Message-ID`` when the header has none."""
    start = b"".join(chunks[:4])[:65536]
    names = _header_names(start)
    added = []
    if b"date" not in names:
        added.append(f"Date: {rfc5322_date(now)}\r\n".encode())
    if b"message-id" not in names:
        added.append(f"Message-ID: <{unique}@{hostname}>\r\n".encode())
    return added + list(chunks)
