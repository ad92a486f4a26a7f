"""
Tests for L{pullmail.smtp.connection}: the server side's framing, bytes in
and events out, without Twisted.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pullmail.smtp import replies
from pullmail.smtp.connection import (
    MAX_COMMAND_LINE,
    NEED_DATA,
    BareLineEnding,
    CommandLine,
    Connection,
    LineTooLong,
    MessageEnd,
    Mode,
    Octets,
)


def events(connection: Connection, max_line: int = MAX_COMMAND_LINE) -> list:
    """Every event the connection has for now."""
    out = []
    while (event := connection.next_event(max_line)) is not NEED_DATA:
        out.append(event)
    return out


def feed(data: bytes, max_line: int = MAX_COMMAND_LINE) -> list:
    connection = Connection()
    connection.receive_data(data)
    return events(connection, max_line)


# -- command lines ----------------------------------------------------------------


def test_lines_in_order():
    assert feed(b"EHLO a\r\nMAIL FROM:<x@y>\r\nNOOP\r\n") == [
        CommandLine(b"EHLO a"), CommandLine(b"MAIL FROM:<x@y>"), CommandLine(b"NOOP"),
    ]


def test_partial_line_waits():
    connection = Connection()
    connection.receive_data(b"NO")
    assert connection.next_event() is NEED_DATA
    assert connection.partial_line
    connection.receive_data(b"OP\r")
    assert connection.next_event() is NEED_DATA
    connection.receive_data(b"\n")
    assert events(connection) == [CommandLine(b"NOOP")]
    assert not connection.partial_line
    assert connection.buffered == 0


def test_empty_line():
    assert feed(b"\r\n") == [CommandLine(b"")]


@pytest.mark.parametrize("data, bad", [
    (b"MAIL FROM:<a@x>\nRCPT TO:<b@y>\r\n", b"MAIL FROM:<a@x>\nRCPT TO:<b@y>"),
    (b"NOOP\rRSET\r\n", b"NOOP\rRSET"),
    (b"NOOP\n\r\n", b"NOOP\n"),
    (b"NOOP\r\r\n", b"NOOP\r"),
])
def test_bare_cr_or_lf_is_one_bad_line(data, bad):
    """
    RFC 5321 2.3.8: only CRLF ends a line.  A bare LF inside is not a line
    end, so what follows it never runs as a second command (issue 18
    item 5, chasquid, Postfix smtpd_forbid_bare_newline).
    """
    assert feed(data + b"NOOP\r\n") == [BareLineEnding(bad), CommandLine(b"NOOP")]


def test_longest_line_allowed():
    line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7)
    assert len(line) + 2 == MAX_COMMAND_LINE
    assert feed(line + b"\r\n") == [CommandLine(line)]


def test_line_one_over_the_limit():
    line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6)
    assert feed(line + b"\r\nNOOP\r\n") == [LineTooLong(), CommandLine(b"NOOP")]


def test_endless_line_is_refused_once_and_skipped():
    """An over-long line is refused as soon as it is too long, skipped to its CRLF."""
    connection = Connection()
    connection.receive_data(b"x" * (MAX_COMMAND_LINE + 1))
    assert events(connection) == [LineTooLong()]
    assert connection.buffered == 0
    connection.receive_data(b"y" * 5000 + b"\r")
    assert events(connection) == []
    connection.receive_data(b"\nNOOP\r\n")
    assert events(connection) == [CommandLine(b"NOOP")]


def test_max_line_per_call():
    """The machine says how long a line may be (a SASL line, RFC 4954 4)."""
    line = b"A" * 1000
    assert feed(line + b"\r\n", max_line=12288) == [CommandLine(line)]
    assert feed(line + b"\r\n") == [LineTooLong()]


def test_discard():
    """STARTTLS and a change of turn drop what is buffered, and say how much."""
    connection = Connection()
    connection.receive_data(b"RSET\r\nNOOP\r\n")
    assert connection.next_event() == CommandLine(b"RSET")
    assert connection.discard() == 6
    assert connection.buffered == 0
    assert connection.next_event() is NEED_DATA


def test_discard_ends_skipping_an_overlong_line():
    connection = Connection()
    connection.receive_data(b"x" * 600)
    assert events(connection) == [LineTooLong()]
    connection.discard()
    connection.receive_data(b"NOOP\r\n")
    assert events(connection) == [CommandLine(b"NOOP")]


# -- DATA -------------------------------------------------------------------------


def test_data_mode_then_commands():
    connection = Connection()
    connection.receive_data(b"DATA\r\n")
    assert connection.next_event() == CommandLine(b"DATA")
    connection.read_message(1000)
    assert connection.mode is Mode.DATA
    connection.receive_data(b"Subject: x\r\n\r\n..hi\r\n.\r\nQUIT\r\n")
    assert events(connection) == [
        MessageEnd([b"Subject: x\r\n\r\n.hi\r\n"], 19, None), CommandLine(b"QUIT"),
    ]
    assert connection.mode is Mode.COMMAND
    assert connection.data_octets == len(b"Subject: x\r\n\r\n..hi\r\n.\r\n")


def test_data_not_read_as_commands_before_the_switch():
    """Input behind DATA stays buffered until the glue switches modes."""
    connection = Connection()
    connection.receive_data(b"DATA\r\nbody\r\n.\r\n")
    assert connection.next_event() == CommandLine(b"DATA")
    assert connection.buffered == len(b"body\r\n.\r\n")
    connection.read_message(1000)
    assert events(connection) == [MessageEnd([b"body\r\n"], 6, None)]


def test_data_in_pieces():
    connection = Connection()
    connection.read_message(1000)
    for piece in (b"ab", b"c\r", b"\n.", b"\r", b"\n"):
        connection.receive_data(piece)
        found = events(connection)
    assert found == [MessageEnd([b"abc\r\n"], 5, None)]


def test_data_smuggling_refused_whole():
    connection = Connection()
    connection.read_message(1000)
    connection.receive_data(b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n")
    [end] = events(connection)
    assert (end.chunks, end.error) == ([], replies.S550_BARE_LINE_ENDING)


def test_data_too_big():
    connection = Connection()
    connection.read_message(10)
    connection.receive_data(b"x" * 20 + b"\r\n.\r\n")
    [end] = events(connection)
    assert end.error == replies.S552_TOO_BIG


def test_partial_line_is_false_in_data_mode():
    """The command deadline does not run over a message."""
    connection = Connection()
    connection.read_message(1000)
    connection.receive_data(b"no line end yet")
    assert not connection.partial_line


# -- exactly N octets (BDAT, RFC 3030) ------------------------------------------


def test_octets_exact_then_commands():
    connection = Connection()
    connection.read_octets(5)
    assert connection.mode is Mode.OCTETS
    connection.receive_data(b"ab")
    assert events(connection) == [Octets(b"ab", False)]
    connection.receive_data(b"c\r\nBDAT 0 LAST\r\n")
    assert events(connection) == [Octets(b"c\r\n", True), CommandLine(b"BDAT 0 LAST")]
    assert connection.mode is Mode.COMMAND
    assert connection.data_octets == 5


def test_octets_hold_anything():
    """A chunk is not framed: CRLF . CRLF and bare LFs are just octets."""
    connection = Connection()
    connection.read_octets(7)
    connection.receive_data(b"\r\n.\r\n\n\r")
    assert events(connection) == [Octets(b"\r\n.\r\n\n\r", True)]


def test_zero_octets():
    connection = Connection()
    connection.read_octets(0)
    assert events(connection) == [Octets(b"", True)]
    assert connection.mode is Mode.COMMAND


def test_negative_octets():
    with pytest.raises(ValueError):
        Connection().read_octets(-1)


# -- properties -----------------------------------------------------------------

_line_text = st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_line_text, max_size=10), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_framing_does_not_depend_on_how_bytes_arrive(lines, cuts):
    """The same events whatever the read boundaries; each line comes back whole."""
    stream = b"".join(line + b"\r\n" for line in lines)
    connection = Connection()
    got = []
    previous = 0
    for cut in sorted({min(c, len(stream)) for c in cuts} | {len(stream)}):
        connection.receive_data(stream[previous:cut])
        previous = cut
        got.extend(events(connection))
    assert got == [CommandLine(line) for line in lines]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), split=st.integers(0, 3000))
def test_no_line_with_a_bare_line_ending_becomes_a_command(data, split):
    """
    Whatever the input: every command handed out is at most the limit and
    holds no CR or LF, and the number of events never exceeds the number of
    CRLFs plus the over-long lines refused early.
    """
    connection = Connection()
    connection.receive_data(data[:split])
    found = events(connection)
    connection.receive_data(data[split:])
    found += events(connection)
    for event in found:
        assert isinstance(event, (CommandLine, BareLineEnding, LineTooLong))
        if isinstance(event, CommandLine):
            assert b"\r" not in event.line and b"\n" not in event.line
            assert len(event.line) + 2 <= MAX_COMMAND_LINE
    commands = [e for e in found if not isinstance(e, LineTooLong)]
    assert len(commands) <= data.count(b"\r\n")


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=500), count=st.integers(0, 600), split=st.integers(0, 700))
def test_octets_take_exactly_count(body, count, split):
    """An exact-count read takes min(count, received) octets, never more."""
    stream = body + b"NOOP\r\n"
    connection = Connection()
    connection.read_octets(count)
    connection.receive_data(stream[:split])
    found = events(connection)
    connection.receive_data(stream[split:])
    found += events(connection)
    octets = b"".join(e.data for e in found if isinstance(e, Octets))
    assert octets == stream[:count]
    if count <= len(stream):
        assert [e for e in found if isinstance(e, Octets)][-1].last
