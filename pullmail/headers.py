"""
Completing a submitted message's header (RFC 6409 8.2, 8.3): a message
from a user's client that lacks ``Message-ID`` or ``Date`` gets them.
Pure: the time and the id's random part are inputs.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from typing import Sequence

__all__ = ["complete_submission"]

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


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
        moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        added.append(f"Date: {email.utils.format_datetime(moment)}\r\n".encode())
    if b"message-id" not in names:
        added.append(f"Message-ID: <{unique}@{hostname}>\r\n".encode())
    return added + list(chunks)
