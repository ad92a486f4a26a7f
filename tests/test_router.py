"""
Tests for L{pullmail.inbound.router}: the Received header, alias expansion, and
the reply to end-of-data.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from pullmail.accounts.users import Accounts
from pullmail.inbound.router import Router, received_header
from pullmail.interfaces import IDeliveryAgent
from pullmail.smtp.envelope import Envelope, Session
from pullmail.storage.maildir import MaildirNames, store
from pullmail.testing import FakeDeliveryAgent, result_of

pytestmark = pytest.mark.usefixtures("no_logged_failures")

# 2024-01-02 03:04:05 UTC
NOW = 1704164645.0


class FakeOutbound:
    def __init__(self) -> None:
        self.calls = []
        self.origins = []

    def enqueue(self, queue_id, sender, recipients, chunks, origin=None, smtputf8=False,
                dsn=None):
        self.calls.append((queue_id, sender, list(recipients), list(chunks)))
        self.origins.append(origin)
        return defer.succeed(None)


def _accounts() -> Accounts:
    return Accounts(
        frozenset({"example.org"}),
        users={"alice@example.org": "h", "bob@example.org": "h"},
        aliases={
            "team@example.org": ("alice@example.org", "bob@example.org", "carol@remote.test"),
            "all@example.org": ("team@example.org", "alice@example.org"),
        },
    )


# Received-token grammar of RFC 5321 4.4, for one header as we write it:
#   "Received:" FWS "from" FWS Extended-Domain CFWS "by" FWS Extended-Domain
#   [CFWS "with" FWS Protocol] [CFWS "id" FWS Atom] [CFWS "for" FWS Path]
#   [CFWS] ";" FWS date-time
_RECEIVED = re.compile(
    r"Received: from (?P<helo>\S+) \((?P<tcpinfo>[^)]*)\)\r\n"
    r"\tby (?P<by>\S+) \(pullmail\) with (?P<with>\S+) id (?P<id>[A-Za-z0-9]+)"
    r"(?:\r\n\tfor <(?P<for>[^>]+)>)?;?\r\n?\t?\s*(?P<date>[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} "
    r"\d{2}:\d{2}:\d{2} [+-]\d{4})\r\n\Z"
)


class ReceivedHeaderTests:
    """The trace header of RFC 5321 4.4 with RFC 3848 protocol names."""

    def test_one_recipient(self):
        """One recipient: from, by, with, id, for and the date, CRLF-folded."""
        session = Session("192.0.2.1", helo="client.test", esmtp=True)
        header = received_header(session, "mx.example.org", "ABC123", ["alice@example.org"], NOW)
        assert header == (
            b"Received: from client.test ([192.0.2.1])\r\n"
            b"\tby mx.example.org (pullmail) with ESMTP id ABC123\r\n"
            b"\tfor <alice@example.org>; Tue, 02 Jan 2024 03:04:05 +0000\r\n"
        )

    def test_many_recipients(self):
        """Several recipients: no for clause, and still a ';' before the date."""
        session = Session("192.0.2.1", helo="client.test", esmtp=True, tls=True, user="a@example.org")
        header = received_header(session, "mx.example.org", "ABC123", ["a@x.test", "b@x.test"], NOW)
        match = _RECEIVED.match(header.decode())
        assert match is not None, header
        assert match["with"] == "ESMTPSA"
        assert match["id"] == "ABC123"
        assert match["for"] is None
        assert b"ABC123;\r\n\t" in header
        assert b"for <" not in header

    def test_protocol_names(self):
        """SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848)."""
        cases = [
            (dict(esmtp=False), "SMTP"),
            (dict(esmtp=True), "ESMTP"),
            (dict(esmtp=True, tls=True), "ESMTPS"),
            (dict(esmtp=True, user="a@example.org"), "ESMTPA"),
            (dict(esmtp=True, tls=True, user="a@example.org"), "ESMTPSA"),
        ]
        for changes, name in cases:
            session = Session("192.0.2.1", helo="c.test", **changes)
            header = received_header(session, "mx.example.org", "Q", ["a@b.test"], NOW)
            assert f" with {name} id Q".encode() in header, name

    def test_no_helo(self):
        """Without a HELO name the header is still well formed."""
        header = received_header(Session("192.0.2.1"), "mx.example.org", "Q", ["a@b.test"], NOW)
        assert header.startswith(b"Received: from ")
        assert b"([192.0.2.1])" in header
        assert header.endswith(b"\r\n")

    def test_lines_crlf(self):
        """Every line ends in CRLF, and continuation lines start with white space."""
        header = received_header(
            Session("192.0.2.1", helo="c.test"), "mx.example.org", "Q", ["a@b.test"], NOW
        )
        lines = header.split(b"\r\n")
        assert lines[-1] == b""
        assert b"\n" not in b"".join(lines)
        for line in lines[1:-1]:
            assert line[:1] in (b"\t", b" ")

    def test_ipv6_peer(self):
        """An IPv6 peer is written as an address literal "[IPv6:...]" (RFC 5321 4.1.3)."""
        header = received_header(Session("2001:db8::1", helo="c.test"), "mx.example.org", "Q", ["a@b.test"], NOW)
        assert b"([IPv6:2001:db8::1])" in header


class AcceptTests:
    """Router.accept: where the message goes and what the client is told."""

    def setup_method(self):
        self.delivery = FakeDeliveryAgent()
        self.outbound = FakeOutbound()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.router = Router("mx.example.org", _accounts(), self.delivery, self.clock, self.outbound)
        self.session = Session("192.0.2.1", helo="client.test", esmtp=True)

    def accept(self, recipients, body=b"Subject: x\r\n\r\nhi\r\n"):
        envelope = Envelope("x@remote.test", tuple(recipients))
        return result_of(self.router.accept(self.session, envelope, [body], len(body)))

    def test_fake_is_a_delivery_agent(self):
        """The fake used here provides IDeliveryAgent."""
        assert verifyObject(IDeliveryAgent, self.delivery)

    def test_local(self):
        """A local message is delivered with a Received header; 250 names the queue id."""
        reply = self.accept(["alice@example.org"])
        [(queue_id, _, addresses, chunks)] = self.delivery.calls
        assert addresses == ["alice@example.org"]
        assert (reply.code, reply.enhanced) == (250, "2.0.0")
        assert queue_id in reply.text
        message = b"".join(chunks)
        assert message.startswith(b"Received: from client.test ([192.0.2.1])\r\n")
        assert f" id {queue_id}".encode() in message
        assert b"Tue, 02 Jan 2024 03:04:05" in message
        assert message.endswith(b"\r\nSubject: x\r\n\r\nhi\r\n")

    def test_queue_ids_differ(self):
        """Two messages get two queue ids."""
        first, second = self.accept(["alice@example.org"]), self.accept(["alice@example.org"])
        assert first.text != second.text
        assert self.delivery.calls[0][0] != self.delivery.calls[1][0]

    def test_alias_expansion(self):
        """Aliases expand to mailboxes, once each; remote targets are queued."""
        reply = self.accept(["all@example.org", "bob@example.org"])
        assert reply.code == 250
        [(queue_id, _, addresses, _)] = self.delivery.calls
        assert sorted(addresses) == ["alice@example.org", "bob@example.org"]
        [(queued_id, sender, remote, _)] = self.outbound.calls
        assert queued_id == queue_id
        assert sender == "x@remote.test"
        assert remote == ["carol@remote.test"]

    def test_forwarded_mail_remembers_its_origin(self):
        """
        Mail pushed in from outside and forwarded on keeps the peer address,
        so a later bounce can be checked against the sender's SPF (SPEC 7).
        """
        self.accept(["all@example.org"])
        assert self.outbound.origins == [self.session.peer]

    def test_split(self):
        """split() separates local mailboxes from remote addresses."""
        assert self.router.split(["team@example.org", "dave@remote.test"]) == (
            ["alice@example.org", "bob@example.org"], ["carol@remote.test", "dave@remote.test"]
        )

    def test_disk_full(self):
        """ENOSPC while storing is 452 4.3.1 (RFC 3463: mail system full)."""
        self.delivery.error = OSError(errno.ENOSPC, "No space left on device")
        reply = self.accept(["alice@example.org"])
        assert (reply.code, reply.enhanced) == (452, "4.3.1")

    def test_other_os_error(self):
        """Another OSError is 451 4.3.0."""
        self.delivery.error = OSError(errno.EACCES, "Permission denied")
        reply = self.accept(["alice@example.org"])
        assert (reply.code, reply.enhanced) == (451, "4.3.0")

    def test_remote_without_outbound(self):
        """With no outbound queue, a remote recipient is 451, never a silent 250."""
        router = Router("mx.example.org", _accounts(), self.delivery, self.clock)
        envelope = Envelope("alice@example.org", ("x@remote.test",))
        reply = result_of(router.accept(self.session, envelope, [b"x\r\n"], 3))
        assert reply.code == 451
        assert self.delivery.calls == []


class DeliveredOfTests:
    def test_finds_a_stored_message_by_queue_id(self, tmp_path: Path):
        """Retrieved mail is found again by its queue id, in new/ or in cur/."""
        root = tmp_path
        router = Router("mx.example.org", _accounts(), type("D", (), {"root": root})(), Clock())
        names = MaildirNames(Clock(), "mx.example.org", 1)
        alice, bob = ["alice@example.org"], ["bob@example.org"]
        assert router.delivered_of({"GABC": alice}) == set()
        [path] = store(root, names.next("GABC"), alice, [b"x\r\n"])
        store(root, names.next("GABE"), ["alice@example.org", "bob@example.org"], [b"y\r\n"])
        assert router.delivered_of({"GABC": alice}) == {"GABC"}
        assert router.delivered_of({"GABD": alice}) == set()
        assert router.delivered_of({"GABC": bob}) == set()
        # Many ids at once: each found in a mailbox of its own recipients.
        assert router.delivered_of({"GABC": alice + bob, "GABD": alice, "GABE": bob,
                                    "GABF": ["carol@elsewhere.example"]}) == {"GABC", "GABE"}
        path.rename(path.parent.parent / "cur" / (path.name + ":2,S"))
        assert router.delivered_of({"GABC": alice}) == {"GABC"}
