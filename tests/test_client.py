"""
Tests for L{pullmail.smtp.client}: the reply reader, dot-stuffing, and the
client dialogues against a scripted channel.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from pullmail.smtp.client import (
    MAX_REPLY_LINES,
    EHLOResult,
    ProtocolError,
    Refused,
    ReplyReader,
    dot_stuff,
    open_session,
    parse_ehlo,
    send_notification,
    send_transaction,
)
from pullmail.smtp.data import DataReader
from pullmail.smtp.replies import Reply
from pullmail.testing import failure_of, result_of

OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
NO_USER = Reply(550, "5.1.1", "No such user")
MAILBOX_BUSY = Reply(450, "4.2.1", "Mailbox busy")
BAD_SEQ = Reply(503, "5.5.1", "Need MAIL command")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error")


class ScriptedChannel:
    """A Channel whose replies come from a script, one per reply() call."""

    def __init__(self, replies) -> None:
        self.script = list(replies)
        self.sent: list[bytes] = []
        self.events: list[tuple[str, object]] = []
        self.tls: list = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.events.append(("send", data))

    def reply(self) -> defer.Deferred:
        if not self.script:
            return defer.fail(AssertionError("the script has no more replies"))
        reply = self.script.pop(0)
        self.events.append(("reply", reply.code))
        return defer.succeed(reply)

    def start_tls(self, options) -> None:
        self.tls.append(options)
        self.events.append(("tls", options))

    @property
    def wire(self) -> bytes:
        return b"".join(self.sent)


def run(coroutine):
    return defer.Deferred.fromCoroutine(coroutine)


# -- ReplyReader ---------------------------------------------------------------------


class TestReplyReader:
    def read(self, data: bytes) -> list[Reply]:
        reader = ReplyReader()
        reader.feed(data)
        found = []
        while (reply := reader.next_reply()) is not None:
            found.append(reply)
        return found

    def test_single_line_with_enhanced_code(self) -> None:
        """A one-line reply splits into code, enhanced code and text."""
        assert self.read(b"250 2.1.0 Sender ok\r\n") == [Reply(250, "2.1.0", "Sender ok")]

    def test_without_enhanced_code(self) -> None:
        """A reply without an enhanced code keeps its whole text."""
        assert self.read(b"220 mx.example ESMTP\r\n") == [Reply(220, "", "mx.example ESMTP")]

    def test_enhanced_code_of_another_class_is_text(self) -> None:
        """An enhanced code whose class differs from the reply's is not one."""
        assert self.read(b"250 5.1.1 odd\r\n") == [Reply(250, "", "5.1.1 odd")]

    def test_multi_line(self) -> None:
        """RFC 5321 4.2.1: 'code-' lines continue, 'code ' ends."""
        data = b"250-mx.example Hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
        assert self.read(data) == [Reply(250, "", "mx.example Hello\nPIPELINING\nSIZE 1000")]

    def test_multi_line_enhanced(self) -> None:
        """The enhanced code is taken off every line of a multi-line reply."""
        data = b"550-5.7.1 first line\r\n550 5.7.1 second line\r\n"
        assert self.read(data) == [Reply(550, "5.7.1", "first line\nsecond line")]

    def test_bare_code(self) -> None:
        """A reply of only the code has empty text."""
        assert self.read(b"250\r\n") == [Reply(250, "", "")]

    def test_split_across_chunks(self) -> None:
        """A reply fed one byte at a time appears only once complete."""
        reader = ReplyReader()
        data = b"250-first\r\n250 2.0.0 last\r\n"
        for i, byte in enumerate(data):
            assert reader.next_reply() is None
            reader.feed(bytes([byte]))
        assert reader.next_reply() == Reply(250, "", "first\n2.0.0 last")
        assert reader.next_reply() is None

    def test_two_replies_in_one_chunk(self) -> None:
        """Pipelined replies arriving together come out one at a time."""
        assert self.read(b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n") == \
            [Reply(250, "2.1.0", "Ok"), Reply(550, "5.1.1", "No")]

    def test_take_rest(self) -> None:
        """take_rest gives back what follows the last reply taken."""
        reader = ReplyReader()
        reader.feed(b"250 2.0.0 x follows\r\nMAIL FROM:<a@b.example>\r\n")
        assert reader.next_reply().code == 250
        assert reader.take_rest() == b"MAIL FROM:<a@b.example>\r\n"
        assert reader.next_reply() is None

    def test_garbage(self) -> None:
        """Lines that are not replies raise ProtocolError."""
        for data in [b"hello\r\n", b"25\r\n", b"2x0 ok\r\n", b"250Xok\r\n", b"\r\n"]:
            with pytest.raises(ProtocolError):
                self.read(data)

    def test_code_change_inside_multi_line(self) -> None:
        """All lines of one reply carry the same code."""
        with pytest.raises(ProtocolError):
            self.read(b"250-first\r\n251 second\r\n")

    def test_endless_line(self) -> None:
        """An unfinished line over 512 octets is refused before it grows."""
        reader = ReplyReader()
        reader.feed(b"250 " + b"x" * 600)
        with pytest.raises(ProtocolError):
            reader.next_reply()

    def test_long_unfinished_line_within_limit(self) -> None:
        """An unfinished line within the limit is waited for."""
        reader = ReplyReader()
        reader.feed(b"250 " + b"x" * 500)
        assert reader.next_reply() is None

    def test_long_complete_line(self) -> None:
        """A complete reply line over 512 octets is refused too (RFC 5321 4.5.3.1.5)."""
        with pytest.raises(ProtocolError):
            self.read(b"250 " + b"x" * 1000 + b"\r\n")

    def test_too_many_lines(self) -> None:
        """A multi-line reply of more than MAX_REPLY_LINES lines is hostile."""
        data = b"250-x\r\n" * (MAX_REPLY_LINES + 1) + b"250 end\r\n"
        with pytest.raises(ProtocolError):
            self.read(data)

    def test_many_lines_within_limit(self) -> None:
        data = b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 end\r\n"
        assert len(self.read(data)[0].text.split("\n")) == MAX_REPLY_LINES


# -- dot-stuffing --------------------------------------------------------------------

_line = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_dotted_line = st.one_of(_line, _line.map(lambda b: b"." + b), st.just(b"."), st.just(b".."))


def _unstuff(stuffed: bytes, cuts: list[int]):
    reader = DataReader(max_size=10**7)
    points = sorted({c % (len(stuffed) + 1) for c in cuts}) + [len(stuffed)]
    start, done = 0, None
    for point in points:
        if done is not None:
            break
        done = reader.feed(stuffed[start:point])
        start = point
    return done, stuffed[start:]


class TestDotStuff:
    @settings(max_examples=200, deadline=None)
    @given(lines=st.lists(_dotted_line, min_size=1, max_size=20),
           cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6))
    def test_round_trip(self, lines, cuts) -> None:
        """What dot_stuff sends, DataReader reads back unchanged, in any chunking."""
        message = b"".join(line + b"\r\n" for line in lines)
        stuffed = dot_stuff([message])
        done, unread = _unstuff(stuffed, cuts)
        assert done is not None
        assert done.error is None
        assert b"".join(done.chunks) == message
        assert done.rest + unread == b""

    @settings(max_examples=100, deadline=None)
    @given(lines=st.lists(_dotted_line, min_size=1, max_size=10),
           splits=st.lists(st.integers(min_value=0, max_value=2000), max_size=4))
    def test_chunks_joined(self, lines, splits) -> None:
        """dot_stuff treats its chunks as one message wherever they are cut."""
        message = b"".join(line + b"\r\n" for line in lines)
        points = sorted({s % (len(message) + 1) for s in splits})
        chunks = [message[a:b] for a, b in zip([0] + points, points + [len(message)])]
        assert dot_stuff(chunks) == dot_stuff([message])

    def test_examples(self) -> None:
        assert dot_stuff([b".a\r\nb\r\n"]) == b"..a\r\nb\r\n.\r\n"
        assert dot_stuff([b"a\r\n.\r\n"]) == b"a\r\n..\r\n.\r\n"
        assert dot_stuff([b"a\r\n", b".b\r\n"]) == b"a\r\n..b\r\n.\r\n"

    def test_missing_final_crlf(self) -> None:
        """A message not ending with CRLF gets one before the terminator."""
        assert dot_stuff([b"a"]) == b"a\r\n.\r\n"


# -- parse_ehlo ----------------------------------------------------------------------


class TestParseEHLO:
    def test_keywords(self) -> None:
        """Keywords after the first line, upper-cased, with their parameters."""
        reply = Reply(250, "", "mx.example Hello\nPIPELINING\nsize 1000\nAUTH PLAIN LOGIN\nGDEL")
        assert parse_ehlo(reply) == \
            {"PIPELINING": "", "SIZE": "1000", "AUTH": "PLAIN LOGIN", "GDEL": ""}

    def test_single_line(self) -> None:
        assert parse_ehlo(Reply(250, "", "mx.example")) == {}


# -- send_transaction ----------------------------------------------------------------

A, B = "a@receiver.example", "b@receiver.example"
MESSAGE = [b"Subject: hi\r\n\r\n.dot line\r\n"]
STUFFED = b"Subject: hi\r\n\r\n..dot line\r\n.\r\n"


class TestSendTransaction:
    def transact(self, script, recipients=(A, B), **kw):
        channel = ScriptedChannel(script)
        result = result_of(
            run(send_transaction(channel, "s@sender.example", list(recipients), MESSAGE, **kw))
        )
        assert channel.script == [], "every scripted reply was read"
        return channel, result

    def test_pipelined(self) -> None:
        """MAIL and every RCPT go in one write (RFC 2920); then DATA, then the message."""
        final = Reply(250, "2.0.0", "Ok: queued")
        channel, result = self.transact([SENDER_OK, RCPT_OK, RCPT_OK, GO_AHEAD, final])
        assert channel.sent == [
            b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<a@receiver.example>\r\n"
            b"RCPT TO:<b@receiver.example>\r\n",
            b"DATA\r\n",
            STUFFED,
        ]
        assert result.mail == SENDER_OK
        assert result.final == final
        assert result.recipients == {A: final, B: final}
        assert result.accepted() == [A, B]

    def test_not_pipelined(self) -> None:
        """Without PIPELINING each command waits for the previous reply."""
        channel, result = self.transact([SENDER_OK, RCPT_OK, RCPT_OK, GO_AHEAD, OK],
                                        pipelining=False)
        assert channel.events[:6] == [
            ("send", b"MAIL FROM:<s@sender.example>\r\n"), ("reply", 250),
            ("send", b"RCPT TO:<a@receiver.example>\r\n"), ("reply", 250),
            ("send", b"RCPT TO:<b@receiver.example>\r\n"), ("reply", 250),
        ]
        assert channel.sent[-2:] == [b"DATA\r\n", STUFFED]
        assert result.accepted() == [A, B]

    def test_mail_parameters(self) -> None:
        """SIZE, BODY and SMTPUTF8 go on MAIL when asked for."""
        channel, _ = self.transact([SENDER_OK, RCPT_OK, GO_AHEAD, OK], recipients=[A],
                                   size=123, body="8BITMIME", smtputf8=True)
        assert channel.sent[0].startswith(
            b"MAIL FROM:<s@sender.example> SIZE=123 BODY=8BITMIME SMTPUTF8\r\n")

    def test_chunking_sends_one_bdat_last_unstuffed(self) -> None:
        """RFC 3030: the peer offers CHUNKING: one BDAT <n> LAST, no dot-stuffing."""
        final = Reply(250, "2.0.0", "Ok: queued")
        channel, result = self.transact([SENDER_OK, RCPT_OK, final], recipients=[A],
                                        chunking=True)
        assert channel.sent[-1] == b"BDAT 26 LAST\r\n" + b"".join(MESSAGE)
        assert b"DATA\r\n" not in channel.sent
        assert result.recipients == {A: final}

    def test_chunking_refused_chunk_refuses_everyone(self) -> None:
        refusal = Reply(552, "5.3.4", "Too big")
        channel, result = self.transact([SENDER_OK, RCPT_OK, RCPT_OK, refusal], chunking=True)
        assert result.refused(permanent=True) == [A, B]

    def test_mail_refused_pipelined(self) -> None:
        """MAIL refused: every recipient has MAIL's reply, RSET ends it, no DATA."""
        refusal = Reply(550, "5.7.1", "Sender refused")
        rset = Reply(250, "2.0.0", "Reset")
        channel, result = self.transact([refusal, BAD_SEQ, BAD_SEQ, rset])
        assert channel.sent[-1] == b"RSET\r\n"
        assert b"DATA\r\n" not in channel.sent
        assert result.recipients == {A: refusal, B: refusal}
        assert result.final == rset
        assert result.accepted() == []
        assert result.refused(permanent=True) == [A, B]

    def test_mail_refused_not_pipelined(self) -> None:
        """Unpipelined, no RCPT follows a refused MAIL."""
        refusal = Reply(451, "4.3.0", "Try later")
        channel, result = self.transact([refusal, OK], pipelining=False)
        assert channel.sent == [b"MAIL FROM:<s@sender.example>\r\n", b"RSET\r\n"]
        assert result.refused(permanent=False) == [A, B]

    def test_no_recipient_accepted(self) -> None:
        """Every RCPT refused: RSET, and each recipient keeps its own refusal."""
        channel, result = self.transact([SENDER_OK, NO_USER, MAILBOX_BUSY, OK])
        assert channel.sent[-1] == b"RSET\r\n"
        assert b"DATA\r\n" not in channel.sent
        assert result.recipients == {A: NO_USER, B: MAILBOX_BUSY}
        assert result.refused(permanent=True) == [A]
        assert result.refused(permanent=False) == [B]

    def test_go_ahead_refused(self) -> None:
        """A reply other than 354 to DATA decides the accepted recipients; no message sent."""
        channel, result = self.transact([SENDER_OK, RCPT_OK, NO_USER, LOCAL_ERROR])
        assert channel.sent[-1] == b"DATA\r\n"
        assert result.recipients == {A: LOCAL_ERROR, B: NO_USER}
        assert result.final == LOCAL_ERROR
        assert result.refused(permanent=False) == [A]

    def test_per_recipient_results(self) -> None:
        """Accepted recipients take the end-of-data reply; refused ones their RCPT reply."""
        final = Reply(250, "2.0.0", "Stored")
        channel, result = self.transact([SENDER_OK, NO_USER, RCPT_OK, GO_AHEAD, final])
        assert result.recipients == {A: NO_USER, B: final}
        assert result.accepted() == [B]
        assert result.refused(permanent=True) == [A]

    def test_final_refusal(self) -> None:
        """A 4xx to end-of-data defers every accepted recipient."""
        channel, result = self.transact([SENDER_OK, RCPT_OK, RCPT_OK, GO_AHEAD, LOCAL_ERROR])
        assert result.refused(permanent=False) == [A, B]
        assert result.accepted() == []


class TestSendNotification:
    GDEL_ID = "x" * 32

    def notify(self, script, **kw):
        channel = ScriptedChannel(script)
        result = result_of(
            run(send_notification(channel, "s@sender.example", [A, B], self.GDEL_ID, **kw))
        )
        assert channel.script == []
        return channel, result

    def test_gdel_in_place_of_data(self) -> None:
        """SPEC 3: MAIL, RCPT..., then GDEL <id>; no DATA, no content."""
        accepted = Reply(250, "2.0.0", f"{self.GDEL_ID} notification accepted")
        channel, result = self.notify([SENDER_OK, RCPT_OK, NO_USER, accepted], size=99)
        assert channel.sent == [
            b"MAIL FROM:<s@sender.example> SIZE=99\r\nRCPT TO:<a@receiver.example>\r\n"
            b"RCPT TO:<b@receiver.example>\r\n",
            f"GDEL {self.GDEL_ID}\r\n".encode(),
        ]
        assert result.recipients == {A: accepted, B: NO_USER}
        assert result.final == accepted

    def test_gdel_refused(self) -> None:
        """A 5xx to GDEL refuses every accepted recipient permanently."""
        refusal = Reply(550, "5.7.23", "SPF fail")
        _, result = self.notify([SENDER_OK, RCPT_OK, RCPT_OK, refusal], pipelining=False)
        assert result.refused(permanent=True) == [A, B]

    def test_nobody_accepted(self) -> None:
        """No RCPT accepted: RSET instead of GDEL."""
        channel, result = self.notify([SENDER_OK, NO_USER, NO_USER, OK])
        assert channel.sent[-1] == b"RSET\r\n"
        assert not any(s.startswith(b"GDEL") for s in channel.sent)


# -- open_session --------------------------------------------------------------------

GREETING = Reply(220, "", "mx.example ESMTP")
EHLO = Reply(250, "", "mx.example Hello\nPIPELINING\nSTARTTLS\nGDEL")
EHLO_NO_TLS = Reply(250, "", "mx.example Hello\nPIPELINING\nGDEL")


class TestOpenSession:
    def session(self, script, tls_options=None):
        channel = ScriptedChannel(script)
        d = run(open_session(channel, "me.example", tls_options))
        return channel, d

    def test_greeting_refused(self) -> None:
        """A greeting other than 220 raises Refused carrying it; nothing is sent."""
        busy = Reply(554, "5.3.2", "No service")
        channel, d = self.session([busy])
        failure = failure_of(d, Refused)
        assert failure.value.reply == busy
        assert channel.sent == []

    def test_ehlo(self) -> None:
        channel, d = self.session([GREETING, EHLO_NO_TLS])
        assert result_of(d) == EHLOResult({"PIPELINING": "", "GDEL": ""}, tls=False)
        assert channel.sent == [b"EHLO me.example\r\n"]

    def test_ehlo_refused_helo(self) -> None:
        """EHLO refused: HELO, and no keywords."""
        channel, d = self.session([GREETING, Reply(500, "5.5.1", "What?"), OK])
        assert result_of(d) == EHLOResult({}, tls=False)
        assert channel.sent == [b"EHLO me.example\r\n", b"HELO me.example\r\n"]

    def test_helo_refused(self) -> None:
        refusal = Reply(550, "5.7.1", "Go away")
        _, d = self.session([GREETING, Reply(500, "5.5.1", "What?"), refusal])
        assert failure_of(d, Refused).value.reply == refusal

    def test_starttls(self) -> None:
        """STARTTLS offered and options given: STARTTLS, handshake, EHLO again."""
        options = object()
        after = Reply(250, "", "mx.example Hello\nPIPELINING\nGDEL\nRETR")
        channel, d = self.session(
            [GREETING, EHLO, Reply(220, "2.0.0", "Ready"), after], tls_options=options
        )
        session = result_of(d)
        assert session == EHLOResult({"PIPELINING": "", "GDEL": "", "RETR": ""}, tls=True)
        assert session.offers("retr")
        assert channel.events == [
            ("reply", 220),
            ("send", b"EHLO me.example\r\n"), ("reply", 250),
            ("send", b"STARTTLS\r\n"), ("reply", 220),
            ("tls", options),
            ("send", b"EHLO me.example\r\n"), ("reply", 250),
        ]

    def test_no_starttls_without_options(self) -> None:
        channel, d = self.session([GREETING, EHLO])
        assert not result_of(d).tls
        assert channel.tls == []
        assert b"STARTTLS\r\n" not in channel.sent

    def test_no_starttls_when_not_offered(self) -> None:
        channel, d = self.session([GREETING, EHLO_NO_TLS], tls_options=object())
        assert not result_of(d).tls
        assert channel.tls == []

    def test_starttls_refused(self) -> None:
        refusal = Reply(454, "4.7.0", "TLS not available")
        channel, d = self.session([GREETING, EHLO, refusal], tls_options=object())
        assert failure_of(d, Refused).value.reply == refusal
        assert channel.tls == []


def test_reply_text_from_a_peer_is_printable():
    """
    Issue 18 item 14: a peer's escape sequences (RFC 5321 4.2 allows only
    printable text) are escaped as the reply is read, so they reach no log
    or bounce as they are.
    """
    reader = ReplyReader()
    reader.feed(b"550 5.1.1 \x1b[2Jgone\x08 \xff\r\n")
    reply = reader.next_reply()
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert reply.text == "\\x1b[2Jgone\\x08 \\xff"
