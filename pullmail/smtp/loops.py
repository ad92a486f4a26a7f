# -*- test-case-name: tests.test_loops -*-
"""
Mail loops (RFC 5321 6.3), judged on the message header only.

A message that has passed through more than ``[limits] max_received``
relays (its ``Received:`` fields) is circling: ``554 5.4.6``, as Postfix
(``hopcount_limit``) and chasquid do.  Local delivery writes
``Return-Path:`` and ``Delivered-To:`` at the top, as Postfix's virtual(8)
does, and a message that already carries our ``Delivered-To:`` for the
mailbox it is going into has been here before.

The data path is hot: the header is found with ``bytes.find`` and its
fields are counted with one C-level regex scan, never line by line, and the
body is never looked at.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

__all__ = ["header_block", "received_count", "delivered_to", "delivery_fields",
           "too_many_hops"]

_BLANK_LINE = b"\r\n\r\n"
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DELIVERED_TO = re.compile(rb"^delivered-to[ \t]*:[ \t]*<?([^\r\n<>]*?)>?[ \t]*\r?$",
                           re.IGNORECASE | re.MULTILINE)


def header_block(chunks: Iterable[bytes]) -> bytes:
    """
    The header of a message given as chunks of CRLF-terminated text: up to
    and with the CRLF of its last field (RFC 5322 2.1).  Chunks are joined
    only until the blank line is seen.
    """
    head = bytearray(b"\r\n")   # a virtual line end before the first field
    for chunk in chunks:
        start = max(len(head) - 3, 0)
        head += chunk
        end = head.find(_BLANK_LINE, start)
        if end >= 0:
            return bytes(head[2:end + 2])
    return bytes(head[2:])


def received_count(header: bytes) -> int:
    """How many ``Received:`` fields the header holds (RFC 5321 4.4)."""
    return len(_RECEIVED.findall(header))


def too_many_hops(chunks: Sequence[bytes], limit: int) -> bool:
    """RFC 5321 6.3: more than C{limit} ``Received:`` fields."""
    return received_count(header_block(chunks)) > limit


def delivered_to(header: bytes) -> set[str]:
    """The addresses of the header's ``Delivered-To:`` fields, lower-cased."""
    return {
        match.decode("utf-8", "replace").strip().lower()
        for match in _DELIVERED_TO.findall(header)
    }


def delivery_fields(sender: str, address: str | None) -> bytes:
    """
    What local delivery puts at the top of a message for C{address}
    (Postfix's virtual(8)): the envelope sender (RFC 5321 4.4) and the
    mailbox it was delivered to (left out when C{address} is None).
    """
    fields = f"Return-Path: <{sender}>\r\n"
    if address is not None:
        fields += f"Delivered-To: {address}\r\n"
    return fields.encode("utf-8")
