"""
Tests for L{pullmail.smtp.data}: framing the message after 354, including
the SMTP smuggling regressions (RFC 5321 2.3.8 and 4.1.1.4).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pullmail.smtp import replies
from pullmail.smtp.data import MAX_TEXT_LINE, DataComplete, DataReader

LIMIT = 100_000


def feed_all(data: bytes, cuts=(), max_size: int = LIMIT) -> DataComplete | None:
    """
    Feed C{data} split at the offsets C{cuts}; return the final result.
    Chunks after the end of data are not fed: like the protocol, the
    caller reads them as commands, so they are added to C{rest}.
    """
    reader = DataReader(max_size)
    result = None
    start = 0
    for cut in list(cuts) + [len(data)]:
        if result is not None:
            result.rest += data[start:cut]
        else:
            result = reader.feed(data[start:cut])
        start = cut
    return result


def stuff(text: bytes) -> bytes:
    """Dot-stuff CRLF text (RFC 5321 4.5.2) and add the terminator."""
    lines = text.split(b"\r\n")
    assert lines[-1] == b""
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines[:-1]]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


class TestFraming:
    """The end of data is CRLF . CRLF and nothing else."""

    def test_simple(self):
        """A message and its terminator give the message, CRLF-ended."""
        done = feed_all(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        assert done.error is None
        assert b"".join(done.chunks) == b"Subject: hi\r\n\r\nbody\r\n"
        assert done.size == len(b"Subject: hi\r\n\r\nbody\r\n")
        assert done.rest == b""

    def test_empty_message(self):
        """A terminator right away is an empty message."""
        done = feed_all(b".\r\n")
        assert done.error is None
        assert b"".join(done.chunks) == b""
        assert done.size == 0

    def test_one_empty_line(self):
        """An empty line then the terminator is one empty line."""
        done = feed_all(b"\r\n.\r\n")
        assert b"".join(done.chunks) == b"\r\n"

    def test_not_finished(self):
        """Without the terminator the reader keeps waiting."""
        reader = DataReader(LIMIT)
        for chunk in (b"a\r\n", b".\r", b"x\r\n", b"..\r\n"):
            assert reader.feed(chunk) is None

    def test_terminator_split_everywhere(self):
        """The terminator is found wherever the chunk boundaries fall."""
        data = b"line one\r\n..dotted\r\nlast\r\n.\r\nQUIT\r\n"
        expected = b"line one\r\n.dotted\r\nlast\r\n"
        for cut in range(1, len(data)):
            done = feed_all(data, [cut])
            assert done is not None, cut
            assert done.error is None, cut
            assert b"".join(done.chunks) == expected, cut
            assert done.rest == b"QUIT\r\n", cut

    def test_terminator_byte_by_byte(self):
        """One byte per chunk works too."""
        data = b"a\r\n.b\r\n\r\n.\r\nNOOP\r\n"
        done = feed_all(data, range(1, data.index(b"NOOP")))
        assert b"".join(done.chunks) == b"a\r\nb\r\n\r\n"
        assert done.rest == b"NOOP\r\n"

    def test_two_cuts(self):
        """Any two boundaries around and inside the terminator."""
        data = b"x\r\n.\r\n"
        for a in range(1, len(data)):
            for b in range(a, len(data)):
                done = feed_all(data, [a, b])
                assert b"".join(done.chunks) == b"x\r\n", (a, b)

    def test_dot_unstuffing(self):
        """A leading dot is removed from every line that has one (4.5.2)."""
        done = feed_all(b"..\r\n...\r\n.x\r\nx.\r\n.\r\n")
        assert b"".join(done.chunks) == b".\r\n..\r\nx\r\nx.\r\n"

    def test_dot_first_line(self):
        """A stuffed dot on the very first line is removed too."""
        done = feed_all(b"..first\r\n.\r\n")
        assert b"".join(done.chunks) == b".first\r\n"

    def test_pipelined_rest(self):
        """Everything after the terminator is handed back untouched."""
        done = feed_all(b"a\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n.\r\n")
        assert b"".join(done.chunks) == b"a\r\n"
        assert done.rest == b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n.\r\n"

    @settings(max_examples=150, deadline=None)
    @given(
        lines=st.lists(
            st.binary(max_size=40).map(
                lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
            ),
            max_size=20,
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
    )
    def test_roundtrip(self, lines, cuts):
        """Dot-stuffed CRLF text fed in random chunks comes back unchanged."""
        text = b"".join(line + b"\r\n" for line in lines)
        wire = stuff(text)
        points = sorted({c % (len(wire) + 1) for c in cuts} - {0, len(wire)})
        done = feed_all(wire + b"NEXT", points)
        assert done is not None
        assert done.error is None
        assert b"".join(done.chunks) == text
        assert done.size == len(text)
        assert done.rest == b"NEXT"


# (data, what ends it): each has a real terminator after the sequence under test.
SMUGGLING = [
    b"a\n.\nMAIL FROM:<evil@x.test>\r\n",
    b"a\n.\r\nMAIL FROM:<evil@x.test>\r\n",
    b"a\r.\rMAIL FROM:<evil@x.test>\r\n",
    b"a\r\n.\rMAIL FROM:<evil@x.test>\r\n",
    b"a\r.\r\nMAIL FROM:<evil@x.test>\r\n",
    b"a\r\n.\nMAIL FROM:<evil@x.test>\r\n",
    b"a\n.\r\n",
    b"a\r.\r\n",
]


class TestSmuggling:
    """A bare CR or LF never ends the data and makes the message refused."""

    def test_sequences_do_not_end_data(self):
        """None of the smuggling sequences is taken as the end of data."""
        for sequence in SMUGGLING:
            for cut in range(len(sequence) + 1):
                reader = DataReader(LIMIT)
                assert reader.feed(sequence[:cut]) is None, (sequence, cut)
                assert reader.feed(sequence[cut:]) is None, (sequence, cut)

    def test_sequences_refused_then_real_end(self):
        """After a smuggling sequence the real terminator ends a refused message."""
        for sequence in SMUGGLING:
            done = feed_all(sequence + b"more\r\n.\r\nNOOP\r\n")
            assert done is not None, sequence
            assert done.error == replies.S550_BARE_LINE_ENDING, sequence
            assert done.chunks == [], sequence
            assert done.rest == b"NOOP\r\n", sequence

    def test_bare_cr_lf_anywhere(self):
        """A bare CR or LF at any position of a line refuses the message."""
        line = b"abcdef"
        for bare in (b"\r", b"\n"):
            for position in range(len(line) + 1):
                bad = line[:position] + bare + line[position:]
                for data in (bad + b"\r\n.\r\n", b"ok\r\n" + bad + b"\r\n.\r\n"):
                    done = feed_all(data)
                    assert done is not None, data
                    assert done.error == replies.S550_BARE_LINE_ENDING, data
                    assert done.chunks == [], data

    def test_bare_before_terminator_split(self):
        """A bare CR just before the real terminator, split anywhere, is refused."""
        data = b"abc\r\r\n.\r\n"
        for cut in range(1, len(data)):
            done = feed_all(data, [cut])
            assert done.error == replies.S550_BARE_LINE_ENDING, cut

    def test_bare_lf_alone_line(self):
        """A bare LF as the whole first octet refuses the message."""
        assert feed_all(b"\n\r\n.\r\n").error == replies.S550_BARE_LINE_ENDING
        assert feed_all(b"\r\r\n.\r\n").error == replies.S550_BARE_LINE_ENDING


class TestLimit:
    """Line length (RFC 5321 4.5.3.1.6) and size (RFC 1870) limits."""

    def test_longest_line(self):
        """998 octets plus CRLF is the longest line allowed."""
        line = b"x" * (MAX_TEXT_LINE - 2)
        done = feed_all(line + b"\r\n.\r\n")
        assert done.error is None
        assert b"".join(done.chunks) == line + b"\r\n"

    def test_line_too_long(self):
        """999 octets plus CRLF refuses the message with 550 5.6.0."""
        line = b"x" * (MAX_TEXT_LINE - 1)
        done = feed_all(b"ok\r\n" + line + b"\r\nafter\r\n.\r\nQUIT\r\n")
        assert done.error == replies.S550_DATA_LINE_TOO_LONG
        assert done.chunks == []
        assert done.rest == b"QUIT\r\n"

    def test_endless_line_in_chunks(self):
        """A huge line fed in pieces is refused, and the real end still ends it."""
        reader = DataReader(10_000_000)
        for _ in range(100):
            assert reader.feed(b"y" * 1000) is None
        done = reader.feed(b"\r\n.\r\nNOOP\r\n")
        assert done.error == replies.S550_DATA_LINE_TOO_LONG
        assert done.rest == b"NOOP\r\n"

    def test_endless_line_terminator_split(self):
        """After a too-long line, a terminator split across chunks still ends it."""
        for cut in range(1, 5):
            reader = DataReader(10_000_000)
            reader.feed(b"z" * 5000)
            tail = b"\r\n.\r\nREST"
            assert reader.feed(tail[:cut]) is None
            done = reader.feed(tail[cut:])
            assert done is not None, cut
            assert done.error == replies.S550_DATA_LINE_TOO_LONG
            assert done.rest == b"REST"

    def test_size_exact(self):
        """A message of exactly the limit is accepted."""
        body = b"a" * 8 + b"\r\n"
        done = feed_all(body + b".\r\n", max_size=len(body))
        assert done.error is None

    def test_size_over(self):
        """One octet over the limit is 552 5.3.4, after the real end of data."""
        body = b"a" * 9 + b"\r\n"
        done = feed_all(body + b".\r\nRSET\r\n", max_size=len(body) - 1)
        assert done.error == replies.S552_TOO_BIG
        assert done.chunks == []
        assert done.rest == b"RSET\r\n"

    def test_size_over_in_chunks(self):
        """A big message in many chunks is refused and not kept."""
        reader = DataReader(1000)
        for _ in range(50):
            assert reader.feed(b"x" * 98 + b"\r\n") is None
        done = reader.feed(b".\r\n")
        assert done.error == replies.S552_TOO_BIG
        assert done.chunks == []
        assert done.size > 1000


def reference(data: bytes, max_size: int = LIMIT):
    """
    A slow, obviously right reader: (message, error, rest), or None when
    the data has not ended.
    """
    framed = b"\r\n" + data
    end = framed.find(b"\r\n.\r\n")
    if end < 0:
        return None
    region, rest = framed[2:end + 2], framed[end + 5:]
    lines = region.split(b"\r\n")[:-1] if region else []
    error = None
    if any(b"\r" in line or b"\n" in line for line in lines):
        error = replies.S550_BARE_LINE_ENDING
    elif any(len(line) > MAX_TEXT_LINE - 2 for line in lines):
        error = replies.S550_DATA_LINE_TOO_LONG
    text = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    if error is None and len(text) > max_size:
        error = replies.S552_TOO_BIG
    return (b"" if error else text), error, rest


class TestReference:
    """The reader agrees with a simple reference on arbitrary input."""

    @settings(max_examples=300, deadline=None)
    @given(
        data=st.lists(
            st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\r\n.\r\n", b"\r\n.", b"x" * 7]),
            max_size=40,
        ).map(b"".join),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    )
    def test_agrees_with_reference(self, data, cuts):
        """Message, refusal and rest match the reference, however the input is cut."""
        expected = reference(data)
        points = sorted({c % (len(data) + 1) for c in cuts} - {0, len(data)})
        done = feed_all(data, points)
        if expected is None:
            assert done is None
            return
        assert done is not None
        message, error, rest = expected
        assert done.error == error
        assert b"".join(done.chunks) == message
        assert done.rest == rest
