# -*- test-case-name: tests.test_chunking -*-
"""
CHUNKING (RFC 3030): the ``BDAT`` argument and the message its chunks build.
Pure; the machine (L{pullmail.smtp.server}) and the framing
(L{pullmail.smtp.connection}, exact-octet reads) use them.

A chunk is read as exactly the announced number of octets, never as lines,
so nothing inside it can pass for a command (no smuggling), and there is no
dot-stuffing.  The size limit is checked as each ``BDAT`` is announced; a
chunk over it is still read (the framing must stay in step) but thrown away,
and every later chunk of the transaction gets the same refusal (RFC 3030 2:
one reply per chunk).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pullmail.smtp import replies
from pullmail.smtp.replies import Reply

__all__ = ["ReadChunk", "ChunkedMessage", "parse_bdat", "S501_BAD_BDAT", "S503_BDAT_NEEDS_EHLO"]

# RFC 3030 2: "BDAT" SP chunk-size [ SP end-marker ]; chunk-size is 1*DIGIT.
_BDAT_ARGUMENT = re.compile(r"([0-9]{1,20})(?: (LAST))?", re.IGNORECASE)
S501_BAD_BDAT = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
# RFC 5321 2.2.1, 4.1.1.1: extensions are offered only by the reply to
# EHLO.  Out of sequence like BDAT before EHLO (503 5.5.1); not 502, which
# says the server lacks the command (RFC 5321 4.2.4), while EHLO would get it.
S503_BDAT_NEEDS_EHLO = Reply(503, "5.5.1", "BDAT needs EHLO (CHUNKING, RFC 3030)")


@dataclass(frozen=True)
class ReadChunk:
    """
    Read exactly C{size} octets, then hand them to C{chunk_received};
    without C{keep} (the message is refused already) they are thrown away.
    """

    size: int
    last: bool
    keep: bool = True


def parse_bdat(argument: str) -> tuple[int, bool] | None:
    """``"100 LAST"`` -> (100, True); None when it is no BDAT argument."""
    match = _BDAT_ARGUMENT.fullmatch(argument)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) is not None


class ChunkedMessage:
    """The chunks of one BDAT transaction, and its refusal once it has one."""

    def __init__(self, max_size: int, error: Reply | None = None) -> None:
        self.max_size = max_size
        self.chunks: list[bytes] = []
        self.size = 0
        self.error = error
        self.last = False
        self._announced = 0

    def announce(self, size: int, last: bool) -> None:
        """A BDAT for C{size} octets: over the limit, the message is refused."""
        self._announced += size
        self.last = last
        if self._announced > self.max_size and self.error is None:
            self.error = replies.S552_TOO_BIG

    def add(self, data: bytes) -> Reply | None:
        """A whole chunk arrived: the reply for a chunk that is not the last."""
        self.size += len(data)
        if self.error is not None:
            self.chunks = []
            return self.error
        if data:
            self.chunks.append(data)
        return Reply(250, "2.0.0", f"{len(data)} octets received")

    def message(self) -> list[bytes]:
        """The whole message, ending with CRLF (RFC 5322 2.1) for the queue's sake."""
        if self.chunks and not self.chunks[-1].endswith(b"\r\n"):
            self.chunks.append(b"\r\n")
        return self.chunks
