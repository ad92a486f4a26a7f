"""
The server side's framing of the byte stream, without I/O (the h11 pattern).

``receive_data(bytes)`` takes what the peer sent; ``next_event()`` hands
out one event at a time: a L{CommandLine}, a L{LineTooLong} or a
L{BareLineEnding} in command mode, a L{MessageEnd} in DATA mode, L{Octets}
in the exact-count mode BDAT (RFC 3030) reads its chunks with, or
L{NEED_DATA}.  The glue asks for the next event only when it is ready for
it, so pipelined input waits here, in order, while a request runs.

What the SMTP rules say about the stream itself lives here too:
  - RFC 5321 2.3.8: lines end with CRLF and nothing else.  A command line
    holding a bare CR or LF is refused whole (chasquid; Postfix's
    ``smtpd_forbid_bare_newline``), so ``MAIL ...\\nRCPT ...\\r\\n`` is one
    bad line, never two commands.
  - RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF
    (the machine says how long, per state: a SASL line may be longer);
    the rest of an over-long line is skipped up to its CRLF.
  - ``discard()``: input pipelined behind STARTTLS (CVE-2011-0411) or
    behind the input that changes roles (SPEC 4) is thrown away.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pullmail.smtp.data import DataReader
from pullmail.smtp.replies import Reply

__all__ = [
    "Connection",
    "Mode",
    "CommandLine",
    "LineTooLong",
    "BareLineEnding",
    "MessageEnd",
    "Octets",
    "NEED_DATA",
    "MAX_COMMAND_LINE",
]

_CRLF = b"\r\n"
# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE = 512


class Mode(enum.Enum):
    COMMAND = "command"   # CRLF-terminated command lines
    DATA = "data"         # a DATA message, up to CRLF . CRLF
    OCTETS = "octets"     # exactly N octets (a BDAT chunk, RFC 3030 2)


@dataclass(frozen=True)
class CommandLine:
    """One command line, without its CRLF."""

    line: bytes


@dataclass(frozen=True)
class LineTooLong:
    """A command line over the limit; it is skipped up to its CRLF."""


@dataclass(frozen=True)
class BareLineEnding:
    """A command line holding a bare CR or LF (RFC 5321 2.3.8)."""

    line: bytes


@dataclass(frozen=True)
class MessageEnd:
    """
    The end of a DATA message: its unstuffed C{chunks} (empty when refused)
    and C{size}, or the refusal in C{error}.  Command mode again.
    """

    chunks: list
    size: int
    error: Reply | None


@dataclass(frozen=True)
class Octets:
    """Part of an exact-count read; C{last} on its final part."""

    data: bytes
    last: bool


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Connection:
    """One connection's input, framed into events.  No I/O, no clock."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._discarding = False    # skipping the rest of an over-long line
        self._reader: DataReader | None = None
        self._octets_left = 0
        self.mode = Mode.COMMAND
        # Octets taken in the current DATA or exact-count read (for the
        # data rate, RFC 5321 4.5.3.2.5).
        self.data_octets = 0

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Octets received and not yet handed out as events."""
        return len(self._buffer)

    @property
    def partial_line(self) -> bool:
        """Command mode with the start of a line, but not its end, received."""
        return self.mode is Mode.COMMAND and bool(self._buffer) and _CRLF not in self._buffer

    def discard(self) -> int:
        """Drop everything buffered (STARTTLS, a change of turn); the count."""
        dropped = len(self._buffer)
        self._buffer.clear()
        self._discarding = False
        return dropped

    # -- mode switches ---------------------------------------------------------

    def read_message(self, max_size: int) -> None:
        """After ``354``: read a DATA message (RFC 5321 4.1.1.4)."""
        self._reader = DataReader(max_size)
        self.mode = Mode.DATA
        self.data_octets = 0

    def read_octets(self, count: int) -> None:
        """Read exactly C{count} octets, as L{Octets} (BDAT, RFC 3030 2)."""
        if count < 0:
            raise ValueError("negative octet count")
        self._octets_left = count
        self.mode = Mode.OCTETS
        self.data_octets = 0

    # -- events ----------------------------------------------------------------

    def next_event(self, max_line: int = MAX_COMMAND_LINE) -> object:
        """The next event, or L{NEED_DATA}; C{max_line} counts the CRLF."""
        if self.mode is Mode.DATA:
            return self._message_event()
        if self.mode is Mode.OCTETS:
            return self._octets_event()
        while self._discarding:
            if not self._skip_to_line_end():
                return NEED_DATA
        end = self._buffer.find(_CRLF)
        if end < 0:
            if len(self._buffer) > max_line:
                self._discarding = True
                self._skip_to_line_end()
                return LineTooLong()
            return NEED_DATA
        line = bytes(self._buffer[:end])
        del self._buffer[:end + len(_CRLF)]
        if len(line) + len(_CRLF) > max_line:
            return LineTooLong()
        if b"\n" in line or b"\r" in line:
            return BareLineEnding(line)
        return CommandLine(line)

    def _skip_to_line_end(self) -> bool:
        """Skip input up to and with the next CRLF; True once it was seen."""
        end = self._buffer.find(_CRLF)
        if end < 0:
            # Keep a final CR: its LF may come in the next read.
            keep = 1 if self._buffer.endswith(b"\r") else 0
            del self._buffer[:len(self._buffer) - keep]
            return False
        del self._buffer[:end + len(_CRLF)]
        self._discarding = False
        return True

    def _message_event(self) -> object:
        if not self._buffer:
            return NEED_DATA
        data = bytes(self._buffer)
        self._buffer.clear()
        self.data_octets += len(data)
        done = self._reader.feed(data)
        if done is None:
            return NEED_DATA
        self._reader = None
        self.mode = Mode.COMMAND
        self._buffer += done.rest
        self.data_octets -= len(done.rest)
        return MessageEnd(done.chunks, done.size, done.error)

    def _octets_event(self) -> object:
        if self._octets_left and not self._buffer:
            return NEED_DATA
        part = bytes(self._buffer[:self._octets_left])
        del self._buffer[:len(part)]
        self._octets_left -= len(part)
        self.data_octets += len(part)
        last = self._octets_left == 0
        if last:
            self.mode = Mode.COMMAND
        return Octets(part, last)
