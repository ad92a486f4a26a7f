"""
The MX service end to end (SPEC 8): a real node, spoken to over TCP.

It receives mail for its domains into maildirs with a Received header, and
nothing else: no address trick opens a relay, no bare CR or LF ends the
data (SMTP smuggling), and over-long lines, over-size messages, too many
recipients, idle clients and too many connections get the proper replies,
leaving the connection usable where RFC 5321 says so.
"""

from __future__ import annotations

import email.utils
import re
import socket
import time
from datetime import datetime, timezone

import pytest

from .harness import RawSMTP, smtp, wait_until

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
DAVE = "dave@example.org"
SENDER = "sender@outside.test"
QUEUED = re.compile(r"Ok: queued as ([A-Za-z0-9][A-Za-z0-9._-]*)$")


# -- nodes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mx(make_module_node):
    """mx.example.org on 127.0.0.2: alice, bob, an alias and a catch-all."""
    return make_module_node(
        "mx", "127.0.0.2", ["example.org", "catchall.example.org"], "mx.example.org",
        users={ALICE: "alice-password", BOB: "bob-password"},
        aliases="info@example.org: alice@example.org\n"
                "@catchall.example.org: bob@example.org\n",
    )


@pytest.fixture(scope="module")
def small(make_module_node):
    """A node with message_size = 10KB and recipients = 3, on 127.0.0.3."""
    return make_module_node(
        "small", "127.0.0.3", ["example.org"], "small.example.org",
        users={ALICE: "a", BOB: "b", CAROL: "c", DAVE: "d"},
        settings={"limits": {"message_size": "10KB", "recipients": 3}},
    )


@pytest.fixture(scope="module")
def impatient(make_module_node):
    """A node with idle_timeout = 2s, on 127.0.0.4."""
    return make_module_node(
        "impatient", "127.0.0.4", ["example.org"], "impatient.example.org",
        users={ALICE: "a"}, settings={"limits": {"idle_timeout": "2s"}},
    )


@pytest.fixture(scope="module")
def crowded(make_module_node):
    """A node with connections_per_ip = 3, on 127.0.0.5."""
    return make_module_node(
        "crowded", "127.0.0.5", ["example.org"], "crowded.example.org",
        users={ALICE: "a"}, settings={"limits": {"connections_per_ip": 3}},
    )


# -- helpers -----------------------------------------------------------------------


def message(subject: str = "hello", body: bytes = b"Hello Alice.\r\n") -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    return (
        b"From: Sender <sender@outside.test>\r\n"
        b"To: Alice <alice@example.org>\r\n"
        + f"Subject: {subject}\r\n".encode()
        + f"Message-ID: <{subject.replace(' ', '-')}.{time.monotonic_ns()}@outside.test>\r\n".encode()
        + b"\r\n"
        + body
    )


def raw(node, **kwargs) -> RawSMTP:
    """A RawSMTP to C{node} that has said EHLO."""
    client = RawSMTP(node.address, **kwargs)
    assert client.greeting[0] == 220, client.greeting
    client.ehlo()
    return client


def new_messages(node, address, before) -> list[bytes]:
    """Messages in C{address}'s maildir that were not in C{before}."""
    return [p.read_bytes() for p in node.delivered_paths(address) if p not in before]


def split_received(data: bytes) -> tuple[str, bytes]:
    """
    The first trace header, which must be Received (unfolded), and the rest;
    after the Return-Path: and Delivered-To: that local delivery puts on top
    (issue 14, as Postfix's virtual(8) does), then our Authentication-Results
    (SPEC 11.1).
    """
    local = re.match(rb"Return-Path: <[^>\r\n]*>\r\nDelivered-To: [^\r\n]+\r\n", data)
    assert local, f"message does not start with Return-Path/Delivered-To: {data[:300]!r}"
    data = data[local.end():]
    results = re.match(rb"Authentication-Results: mx\.example\.org;[^\r\n]*\r\n"
                       rb"(?:[ \t][^\r\n]*\r\n)*", data)
    assert results, f"no Authentication-Results under them: {data[:300]!r}"
    data = data[results.end():]
    match = re.match(rb"Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", data)
    assert match, f"message does not start with a Received header: {data[:300]!r}"
    header = re.sub(rb"\r\n[ \t]+", b" ", match.group(0)).decode("ascii").strip()
    return header, data[match.end():]


def assert_unchanged(node, before, what: str) -> None:
    """Nothing in the state (mail, queue, outbox...) changed since C{before}."""
    changes = node.state_snapshot().changes_since(before)
    assert not changes, f"{what}: stored state changed: {changes}"


def send_one(node, rcpt: str, msg: bytes) -> str:
    """One transaction with smtplib; the queue id from the reply to DATA."""
    with smtp(node) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt(rcpt)
        assert code == 250, (rcpt, code, text)
        code, text = client.data(msg)
    assert code == 250, (code, text)
    text = text.decode()
    assert text.startswith("2.0.0 "), text
    match = QUEUED.search(text)
    assert match, f"reply to DATA is not '250 2.0.0 Ok: queued as <QUEUEID>': {text!r}"
    return match.group(1)


# -- delivery ----------------------------------------------------------------------


class DeliveryTests:
    """Mail for a local user lands in its maildir, stamped and unchanged."""

    def test_sendmail(self, mx):
        """smtplib's sendmail succeeds with no refused recipient."""
        before = set(mx.delivered_paths(ALICE))
        with smtp(mx) as client:
            assert client.sendmail(SENDER, [ALICE], message("sendmail")) == {}
        assert len(new_messages(mx, ALICE, before)) == 1

    def test_stored_with_received_header(self, mx):
        """
        The reply to DATA is C{250 2.0.0 Ok: queued as ID}; exactly one
        file appears in alice's new/, beginning with a Received header
        (RFC 5321 4.4) naming the node, the queue id, the recipient and a
        date, followed by the message exactly as sent (dot-unstuffed).
        """
        body = b"Line one.\r\n.A line that began with a dot.\r\n..two dots\r\n\r\nEnd.\r\n"
        original = message("received test", body)
        before_new = set((mx.maildir(ALICE) / "new").glob("*"))
        queue_id = send_one(mx, ALICE, original)
        new = [p for p in (mx.maildir(ALICE) / "new").glob("*") if p not in before_new]
        assert len(new) == 1, new
        header, rest = split_received(new[0].read_bytes())
        assert header.startswith("Received: from "), header
        assert re.search(r"\bby mx\.example\.org\b", header), header
        assert re.search(rf"\bid {re.escape(queue_id)}\b", header), header
        assert re.search(r"\bfor <alice@example\.org>\s*;", header), header
        date = header.rpartition(";")[2].strip()
        when = email.utils.parsedate_to_datetime(date)
        if when.tzinfo is None:  # "-0000": UTC, from a zone-less system
            when = when.replace(tzinfo=timezone.utc)
        assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 300, date
        assert rest == original

    def test_received_from_clause_names_client(self, mx):
        """The FROM clause has the EHLO name and the client's address literal."""
        before = set(mx.delivered_paths(ALICE))
        send_one(mx, ALICE, message("from clause"))
        (data,) = new_messages(mx, ALICE, before)
        header, _ = split_received(data)
        from_clause = header.partition(" by ")[0]
        assert "client.outside.test" in from_clause, header
        assert "[127.0.0.1]" in from_clause, header

    def test_queue_id_logged(self, mx):
        """The queue id of an accepted message is in the node's log."""
        queue_id = send_one(mx, ALICE, message("logged"))
        mx.wait_log(re.escape(queue_id))

    def test_queue_ids_differ(self, mx):
        ids = {send_one(mx, ALICE, message(f"id {i}")) for i in range(3)}
        assert len(ids) == 3

    @pytest.mark.parametrize("recipient, mailbox", [
        ("info@example.org", ALICE),                     # an alias of alice
        ("whoever.else@catchall.example.org", BOB),      # a catch-all domain of bob's
        ("ALICE@EXAMPLE.ORG", ALICE),                    # addresses are case-insensitive
    ])
    def test_recipient_reaches_its_mailbox(self, mx, recipient, mailbox):
        before = set(mx.delivered_paths(mailbox))
        original = message(f"to {recipient}")
        send_one(mx, recipient, original)
        (data,) = new_messages(mx, mailbox, before)
        assert split_received(data)[1] == original
        if recipient.lower() != mailbox:
            assert not mx.delivered(recipient)

    def test_postmaster(self, mx):
        """postmaster@ a local domain is accepted without being a user."""
        before = set(mx.delivered_paths("postmaster@example.org"))
        send_one(mx, "postmaster@example.org", message("postmaster"))
        assert len(new_messages(mx, "postmaster@example.org", before)) == 1

    def test_bare_postmaster(self, mx):
        """C{RCPT TO:<Postmaster>} without a domain is accepted (RFC 5321 4.5.1)."""
        before = mx.mail_snapshot()
        with raw(mx) as client:
            code, text = client.sendmail(SENDER, ["Postmaster"], message("bare postmaster"))
            assert code == 250, text
        added = [name for name in mx.mail_snapshot().new_since(before)
                 if "/new/" in name or "/cur/" in name]
        # The first of node.domains is the node's primary domain.
        assert len(added) == 1, added
        assert added[0].startswith("example.org/postmaster/"), added

    def test_two_recipients_one_transaction(self, mx):
        before_a, before_b = set(mx.delivered_paths(ALICE)), set(mx.delivered_paths(BOB))
        with smtp(mx) as client:
            assert client.sendmail(SENDER, [ALICE, BOB], message("both")) == {}
        assert len(new_messages(mx, ALICE, before_a)) == 1
        assert len(new_messages(mx, BOB, before_b)) == 1

    def test_null_sender(self, mx):
        """A bounce (C{MAIL FROM:<>}) is accepted for a local user."""
        before = set(mx.delivered_paths(ALICE))
        with raw(mx) as client:
            assert client.command("MAIL FROM:<>")[0] == 250
            assert client.command(f"RCPT TO:<{ALICE}>")[0] == 250
            assert client.command("DATA")[0] == 354
            client.send(message("bounce") + b".\r\n")
            assert client.read_reply()[0] == 250
        assert len(new_messages(mx, ALICE, before)) == 1

    def test_ehlo_keywords(self, mx):
        """EHLO offers PIPELINING, SIZE (with the limit), 8BITMIME, ENHANCEDSTATUSCODES."""
        with smtp(mx) as client:
            code, _ = client.ehlo()
            assert code == 250
            features = client.esmtp_features
        for keyword in ("pipelining", "size", "8bitmime", "enhancedstatuscodes"):
            assert keyword in features, features
        assert features["size"].strip() == "25000000", features

    def test_helo(self, mx):
        with RawSMTP(mx.address) as client:
            assert client.command("HELO client.outside.test")[0] == 250
            assert client.command(f"MAIL FROM:<{SENDER}>")[0] == 250

    def test_greeting_names_host(self, mx):
        with RawSMTP(mx.address) as client:
            code, texts = client.greeting
        assert code == 220 and texts[0].startswith("mx.example.org "), texts


# -- recipients ----------------------------------------------------------------------


class RecipientTests:
    def test_unknown_user(self, mx):
        with raw(mx) as client:
            client.command(f"MAIL FROM:<{SENDER}>")
            code, texts = client.command("RCPT TO:<nobody@example.org>")
        assert code == 550 and texts[0].startswith("5.1.1 "), (code, texts)

    def test_other_domain(self, mx):
        with raw(mx) as client:
            client.command(f"MAIL FROM:<{SENDER}>")
            code, texts = client.command("RCPT TO:<victim@outside.test>")
        assert code == 550 and texts[0].startswith("5.7.1 "), (code, texts)
        assert "relaying denied" in texts[0].lower(), texts


# Each argument of RCPT TO below tries to make the node relay (or deliver to
# a non-local mailbox).  Each must get a 5xx, and nothing may be stored.
# The comment says what a careful server replies; any 5xx passes.
RELAY_TRICKS = [
    "<victim%outside.test@example.org>",          # percent hack: unknown local user 5.1.1
    '<"victim@outside.test"@example.org>',        # quoted @: unknown local user
    '<"victim%outside.test"@example.org>',        # quoted percent hack
    "<outside.test!victim@example.org>",          # bang path in local part
    "<@example.org:victim@outside.test>",         # source route: route dropped, 5.7.1
    "<@example.org,@mx.example.org:victim@outside.test>",  # longer source route
    "<@outside.test:victim@example.org.outside.test>",     # route to a look-alike
    "<victim@outside.test@example.org>",          # two @: syntax 501
    "<alice@example.org@outside.test>",           # two @, local first
    "<victim@[127.0.0.1]>",                       # address literal
    "<victim@[127.0.0.2]>",                       # the node's own address literal
    # "<alice@[127.0.0.2]>" is no trick: our own literal is a local domain
    # (issue 18 item 6), so it reaches alice -- see test_hostile_network.
    "<victim@[IPv6:::1]>",                        # IPv6 literal
    '<"victim@outside.test">',                    # quoted, no domain
    "<victim@outside.test.>",                     # trailing dot
    "<victim@example.org.>",                      # local domain with trailing dot
    "<victim@OUTSIDE.TEST>",                      # case of a foreign domain
    "<victim@example.org.outside.test>",          # local domain as a prefix
    "<victim@outside.test.example.org>",          # subdomain of a local domain
    "<victim@sub.example.org>",                   # subdomain of a local domain
    "<victim@outside.test%example.org>",          # percent in the domain: syntax
    "<victim>",                                   # no domain, not postmaster
    "<outside.test!victim>",                      # bare bang path
    '<"alice"@outside.test>',                     # local user's name, foreign domain
    "<alice@127.0.0.2>",                          # dotted quad without brackets
    "victim@outside.test",                        # no angle brackets
    "<victim@outside.test> <alice@example.org>",  # two paths in one RCPT
    "<alice@example.org>,<victim@outside.test>",  # comma list
    "<victim@outside.test\x00@example.org>",      # NUL byte
    "<victim@outside.tést>",                      # 8-bit domain without SMTPUTF8
]


@pytest.mark.parametrize("argument", RELAY_TRICKS)
def test_relay_trick_refused(mx, argument):
    """RCPT TO:ARGUMENT gets a 5xx, DATA is refused, nothing is stored."""
    before = mx.state_snapshot()
    with raw(mx) as client:
        assert client.command(f"MAIL FROM:<{SENDER}>")[0] == 250
        code, texts = client.command(b"RCPT TO:" + argument.encode("utf-8"))
        print(f"RCPT TO:{argument!r} -> {code} {texts}")
        data_code, data_texts = client.command("DATA")
        if data_code == 354:  # the server took it: see where it goes
            client.send(message("relay") + b".\r\n")
            client.read_reply()
        assert 500 <= code < 600, f"RCPT TO:{argument} -> {code} {texts}"
        assert 500 <= data_code < 600, (data_code, data_texts)
        assert client.command("NOOP")[0] == 250
    assert_unchanged(mx, before, f"RCPT TO:{argument}")


# -- SMTP smuggling ----------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<evil@outside.test>\r\n"
    b"RCPT TO:<bob@example.org>\r\n"
    b"DATA\r\n"
    b"\r\n"
    b"smuggled\r\n"
    b".\r\n"
)


@pytest.mark.parametrize(
    "sequence",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n"],
    ids=["LF.LF", "LF.CRLF", "CR.CR", "CRLF.CR", "CR.CRLF"],
)
def test_smuggling(mx, sequence):
    """
    A non-standard end-of-data sequence does not end the data: the server
    answers once, after the real CRLF.CRLF, refusing the message for its bare
    CR/LF (550 5.6.0); nothing reaches alice or bob; the session goes on.
    """
    before = mx.state_snapshot()
    with raw(mx) as client:
        client.command(f"MAIL FROM:<{SENDER}>")
        assert client.command(f"RCPT TO:<{ALICE}>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: x\r\n\r\nbody" + sequence + SMUGGLED)
        code, texts = client.read_reply()
        assert (code, texts[0][:6]) == (550, "5.6.0 "), (code, texts)
        client.assert_silent()
        assert client.command("RSET")[0] == 250
        assert client.command("NOOP")[0] == 250
        client.assert_silent(0.1)
    assert_unchanged(mx, before, "smuggling")


@pytest.mark.parametrize(
    "body",
    [b"line one\nline two\r\n", b"line one\rline two\r\n", b"lf at end\n",
     b"\n.\r\n"],
    ids=["bare-LF", "bare-CR", "LF-before-end", "LF-dot"],
)
def test_bare_line_ending_refused(mx, body):
    """A message with a bare CR or LF anywhere is refused and not stored."""
    before = mx.state_snapshot()
    with raw(mx) as client:
        client.command(f"MAIL FROM:<{SENDER}>")
        client.command(f"RCPT TO:<{ALICE}>")
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: bare\r\n\r\n" + body + b"\r\n.\r\n")
        code, texts = client.read_reply()
        assert (code, texts[0][:6]) == (550, "5.6.0 "), (code, texts)
        assert client.command("NOOP")[0] == 250
    assert_unchanged(mx, before, "bare line ending")


def test_bare_lf_in_header_refused(mx):
    before = mx.state_snapshot()
    with raw(mx) as client:
        client.command(f"MAIL FROM:<{SENDER}>")
        client.command(f"RCPT TO:<{ALICE}>")
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: a\nX-Injected: b\r\n\r\nbody\r\n.\r\n")
        assert client.read_reply()[0] == 550
    assert_unchanged(mx, before, "bare LF in header")


def test_message_in_tiny_packets(mx):
    """
    A message sent one octet per packet, so that every CR and LF, and the
    end-of-data sequence, are split across reads: stored exactly, once.
    """
    before = set(mx.delivered_paths(ALICE))
    original = message("tiny packets", b"a\r\n.b\r\n\r\nc\r\n")
    stuffed = original.replace(b"\r\n.", b"\r\n..")
    with raw(mx) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.command(f"MAIL FROM:<{SENDER}>")
        client.command(f"RCPT TO:<{ALICE}>")
        assert client.command("DATA")[0] == 354
        for octet in stuffed + b".\r\n":
            client.send(bytes([octet]))
            time.sleep(0.001)
        code, texts = client.read_reply()
        assert code == 250, texts
        client.assert_silent()
    (data,) = new_messages(mx, ALICE, before)
    assert split_received(data)[1] == original


def test_eight_bit_body(mx):
    """BODY=8BITMIME: octets over 127 are stored unchanged."""
    before = set(mx.delivered_paths(ALICE))
    original = message("8bit", "Grüße, naïve café — ☃\r\n".encode("utf-8") + bytes(range(128, 256)) + b"\r\n")
    with raw(mx) as client:
        assert client.command(f"MAIL FROM:<{SENDER}> BODY=8BITMIME")[0] == 250
        assert client.command(f"RCPT TO:<{ALICE}>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(original + b".\r\n")
        assert client.read_reply()[0] == 250
    (data,) = new_messages(mx, ALICE, before)
    assert split_received(data)[1] == original


# -- limits ------------------------------------------------------------------------


def test_long_command(mx):
    """A 600-octet command: one 500 5.5.2, and the connection stays usable."""
    with raw(mx) as client:
        line = b"NOOP " + b"x" * 593 + b"\r\n"
        assert len(line) == 600
        client.send(line)
        code, texts = client.read_reply()
        assert (code, texts[0][:6]) == (500, "5.5.2 "), (code, texts)
        client.assert_silent()
        assert client.command("NOOP")[0] == 250
        assert client.command(f"MAIL FROM:<{SENDER}>")[0] == 250


def test_long_mail_command_is_not_split(mx):
    """The tail of an over-long command is not run as a command of its own."""
    before = mx.state_snapshot()
    with raw(mx) as client:
        padding = b"A" * (600 - len(b"MAIL FROM:<") - len(b"RCPT TO:<alice@example.org>\r\n"))
        client.send(b"MAIL FROM:<" + padding + b"RCPT TO:<alice@example.org>\r\n")
        code, _ = client.read_reply()
        assert code == 500
        client.assert_silent()
        assert client.command("DATA")[0] == 503
    assert_unchanged(mx, before, "long MAIL")


def test_command_of_512_octets_is_allowed(mx):
    """512 octets with CRLF is the RFC 5321 4.5.3.1.4 maximum, not over it."""
    with raw(mx) as client:
        line = b"NOOP " + b"x" * 505 + b"\r\n"
        assert len(line) == 512
        client.send(line)
        assert client.read_reply()[0] == 250


def test_long_data_line(mx):
    """A 1100-octet text line: 550 5.6.0 after end of data, nothing stored."""
    before = mx.state_snapshot()
    with raw(mx) as client:
        client.command(f"MAIL FROM:<{SENDER}>")
        client.command(f"RCPT TO:<{ALICE}>")
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: long\r\n\r\n" + b"y" * 1100 + b"\r\nshort\r\n.\r\n")
        code, texts = client.read_reply()
        assert (code, texts[0][:6]) == (550, "5.6.0 "), (code, texts)
        client.assert_silent()
        assert client.command("NOOP")[0] == 250
    assert_unchanged(mx, before, "long data line")


def test_data_line_of_998_octets_is_allowed(mx):
    """998 octets plus CRLF is the longest legal line; stored unchanged."""
    before = set(mx.delivered_paths(ALICE))
    original = message("998", b"z" * 998 + b"\r\n")
    with raw(mx) as client:
        code, texts = client.sendmail(SENDER, [ALICE], original)
    assert code == 250, texts
    (data,) = new_messages(mx, ALICE, before)
    assert split_received(data)[1] == original


def test_size_keyword(small):
    """EHLO advertises the configured limit: SIZE 10000."""
    with smtp(small) as s:
        s.ehlo()
        assert s.esmtp_features["size"].strip() == "10000"


def test_size_parameter_over_limit(small):
    with raw(small) as client:
        code, texts = client.command(f"MAIL FROM:<{SENDER}> SIZE=10001")
        assert (code, texts[0][:6]) == (552, "5.3.4 "), (code, texts)
        assert client.command(f"MAIL FROM:<{SENDER}> SIZE=10000")[0] == 250


def test_message_over_limit(small):
    """20 KB of data against a 10 KB limit: 552 5.3.4 after the data, nothing stored."""
    before = small.mail_snapshot()
    body = b"".join(b"%05d " % i + b"w" * 94 + b"\r\n" for i in range(200))
    with raw(small) as client:
        code, texts = client.sendmail(SENDER, [ALICE], message("big", body))
        assert (code, texts[0][:6]) == (552, "5.3.4 "), (code, texts)
        client.assert_silent()
        assert client.command("NOOP")[0] == 250
        code, texts = client.sendmail(SENDER, [ALICE], message("small after big"))
        assert code == 250, texts
    added = small.mail_snapshot().new_since(before)
    assert len(added) == 1, added
    assert b"small after big" in next(iter(added.values()))


def test_too_many_recipients(small):
    """With recipients = 3, the 4th and 5th RCPT get 452 4.5.3; the first 3 get mail."""
    before = {a: set(small.delivered_paths(a)) for a in (ALICE, BOB, CAROL, DAVE)}
    with raw(small) as client:
        client.command(f"MAIL FROM:<{SENDER}>")
        for rcpt in (ALICE, BOB, CAROL):
            assert client.command(f"RCPT TO:<{rcpt}>")[0] == 250
        for rcpt in (DAVE, "postmaster@example.org"):
            code, texts = client.command(f"RCPT TO:<{rcpt}>")
            assert (code, texts[0][:6]) == (452, "4.5.3 "), (rcpt, code, texts)
        assert client.command("DATA")[0] == 354
        client.send(message("three") + b".\r\n")
        assert client.read_reply()[0] == 250
    for rcpt in (ALICE, BOB, CAROL):
        assert len(new_messages(small, rcpt, before[rcpt])) == 1, rcpt
    assert not new_messages(small, DAVE, before[DAVE])


# -- pipelining and sequence ----------------------------------------------------------


def test_pipelining(mx):
    """
    A pipelined group gets one reply per command, in order; an accepted
    recipient among refused ones still gets the message.
    """
    before = set(mx.delivered_paths(ALICE))
    with raw(mx) as client:
        client.send(
            b"MAIL FROM:<a@outside.test>\r\n"
            b"RCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<nobody@example.org>\r\n"
            b"RCPT TO:<x@outside.test>\r\n"
            b"DATA\r\n"
        )
        replies = client.read_replies(5)
        assert [code for code, _ in replies] == [250, 250, 550, 550, 354], replies
        assert replies[2][1][0].startswith("5.1.1 "), replies
        assert replies[3][1][0].startswith("5.7.1 "), replies
        client.assert_silent(0.2)
        client.send(message("pipelined") + b".\r\n")
        code, texts = client.read_reply()
        assert code == 250, texts
        client.assert_silent(0.2)
    assert len(new_messages(mx, ALICE, before)) == 1


def test_pipelined_transactions(mx):
    """Two whole transactions in one packet each, with RSET and NOOP between."""
    before = set(mx.delivered_paths(BOB))
    with raw(mx) as client:
        for i in range(2):
            client.send(
                b"RSET\r\nMAIL FROM:<a@outside.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
            )
            assert [c for c, _ in client.read_replies(4)] == [250, 250, 250, 354]
            client.send(message(f"pipelined {i}") + b".\r\nNOOP\r\n")
            assert [c for c, _ in client.read_replies(2)] == [250, 250]
        client.assert_silent(0.2)
    assert len(new_messages(mx, BOB, before)) == 2


@pytest.mark.parametrize("line", [b"XYZZY", b"FOO bar baz", b"", b"MAIL", b"\x00\x01\x02"],
                         ids=["XYZZY", "with-args", "empty", "MAIL-alone", "binary"])
def test_bad_command_one_reply(mx, line):
    """A bad command gets exactly one 5xx reply; the session goes on."""
    with raw(mx) as client:
        client.send(line + b"\r\n")
        code, texts = client.read_reply()
        assert 500 <= code < 600, (code, texts)
        if line in (b"XYZZY", b"FOO bar baz"):
            assert (code, texts[0][:6]) == (500, "5.5.1 "), (code, texts)
        client.assert_silent()
        assert client.command("NOOP")[0] == 250


def test_pipelined_unknown_commands(mx):
    with raw(mx) as client:
        client.send(b"FOO\r\nBAR baz\r\nNOOP\r\n")
        assert [c for c, _ in client.read_replies(3)] == [500, 500, 250]
        client.assert_silent()


def test_mail_before_ehlo(mx):
    with RawSMTP(mx.address) as client:
        code, texts = client.command(f"MAIL FROM:<{SENDER}>")
    assert (code, texts[0][:6]) == (503, "5.5.1 "), (code, texts)


def test_rcpt_before_mail(mx):
    with raw(mx) as client:
        code, texts = client.command(f"RCPT TO:<{ALICE}>")
        assert (code, texts[0][:6]) == (503, "5.5.1 "), (code, texts)


def test_data_before_rcpt(mx):
    with raw(mx) as client:
        code, _ = client.command("DATA")
        assert code == 503
        client.command(f"MAIL FROM:<{SENDER}>")
        code, _ = client.command("DATA")
        assert code == 503
        client.assert_silent()
        assert client.command("NOOP")[0] == 250


def test_nested_mail(mx):
    with raw(mx) as client:
        assert client.command(f"MAIL FROM:<{SENDER}>")[0] == 250
        code, texts = client.command(f"MAIL FROM:<{SENDER}>")
        assert code == 503, texts


def test_rset_clears_transaction(mx):
    with raw(mx) as client:
        client.command(f"MAIL FROM:<{SENDER}>")
        client.command(f"RCPT TO:<{ALICE}>")
        assert client.command("RSET")[0] == 250
        assert client.command("DATA")[0] == 503


def test_quit(mx):
    with raw(mx) as client:
        code, _ = client.command("QUIT")
        assert code == 221
        client.expect_closed(5)


# -- idle and connection limits ------------------------------------------------------


def test_idle_timeout(impatient):
    """After 2 s of silence: 421 4.4.2, then the server closes."""
    with RawSMTP(impatient.address) as client:
        start = time.monotonic()
        code, texts = client.read_reply(timeout=8)
        elapsed = time.monotonic() - start
        assert (code, texts[0][:6]) == (421, "4.4.2 "), (code, texts)
        assert 1.5 <= elapsed <= 5, elapsed
        client.expect_closed(5)


def test_activity_defers_idle_timeout(impatient):
    """Commands every 1.2 s keep a session alive past the 2 s idle timeout."""
    with raw(impatient) as client:
        for _ in range(3):
            time.sleep(1.2)
            assert client.command("NOOP")[0] == 250
        code, texts = client.read_reply(timeout=8)
        assert code == 421, texts


def test_idle_in_data_stores_nothing(impatient):
    """A client that stalls in the middle of DATA is cut off; nothing is stored."""
    before = impatient.state_snapshot()
    with raw(impatient) as client:
        client.command(f"MAIL FROM:<{SENDER}>")
        client.command(f"RCPT TO:<{ALICE}>")
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: stalled\r\n\r\nhalf a message\r\n")
        code, texts = client.read_reply(timeout=8)
        assert code == 421, texts
        client.expect_closed(5)
    assert_unchanged(impatient, before, "stalled DATA")


def test_connections_per_ip(crowded):
    """
    With connections_per_ip = 3, a 4th concurrent connection from the same
    address gets 421 4.7.0 and is closed; the others are not disturbed, and
    a place freed is available again.
    """
    clients = [RawSMTP(crowded.address, greeting=True) for _ in range(3)]
    try:
        for client in clients:
            assert client.greeting[0] == 220, client.greeting
        fourth = RawSMTP(crowded.address)
        code, texts = fourth.greeting
        assert (code, texts[0][:6]) == (421, "4.7.0 "), (code, texts)
        fourth.expect_closed(5)
        fourth.close()
        for client in clients:
            assert client.command("NOOP")[0] == 250
        clients.pop().command("QUIT")

        def greeted():
            with RawSMTP(crowded.address) as again:
                return again.greeting[0] == 220

        wait_until(greeted, 5, interval=0.1, message="a connection after one was freed")
    finally:
        for client in clients:
            client.close()


def test_other_address_not_limited(crowded):
    """The per-IP limit counts per client address: 127.0.0.9 still gets in."""
    clients = [RawSMTP(crowded.address) for _ in range(3)]
    try:
        with RawSMTP(crowded.address, source="127.0.0.9") as other:
            assert other.greeting[0] == 220, other.greeting
    finally:
        for client in clients:
            client.close()
