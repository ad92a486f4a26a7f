"""
Tests for L{pullmail.smtp.protocol}: the Twisted glue around the server
machine, as bytes in and reply lines out, on a L{StringTransport} and a
L{Clock}.
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pullmail.accounts.users import Accounts
from pullmail.smtp import replies
from pullmail.smtp.client import ProtocolError, open_session
from pullmail.smtp.conduct import SessionLimits
from pullmail.smtp.protocol import ClientConnection, ConnectionLimits, SMTPServerFactory
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import Authenticate, Deliver, ServerPolicy
from pullmail.testing import failure_of, result_of

IDLE = 300.0
GREETING = b"220 mx.example.org ESMTP pullmail"


def logged_failures(events, *types) -> list:
    """The logged failures of one of C{types} among captured events."""
    return [e["log_failure"] for e in events
            if "log_failure" in e and e["log_failure"].check(*types)]


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started: list = []

    def startTLS(self, context) -> None:
        self.tls_started.append((context, self.value()))

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Harness:
    """One factory with fake performers; each connection a StringTransport."""

    def __init__(self, service: str = "smtp", limits: ConnectionLimits | None = None,
                 refuse=lambda address: None, session_limits: SessionLimits = SessionLimits(),
                 implicit_tls: bool = False, count_replies: bool = True) -> None:
        self.clock = Clock()
        self.deliveries: list[tuple[Deliver, defer.Deferred]] = []
        self.auto_deliver: Reply | None = Reply(250, "2.0.0", "Ok: queued as Q1")
        policy = ServerPolicy(
            hostname="mx.example.org",
            domains=("example.org",),
            accounts=Accounts(frozenset({"example.org"}), users={"alice@example.org": "h"}),
            service=service,
            max_size=10_000,
            max_recipients=5,
            tls_available=True,
        )
        self.tls_context = object()
        self.factory = SMTPServerFactory(
            policy,
            self.clock,
            limits or ConnectionLimits(100, 10),
            IDLE,
            {Deliver: self.deliver,
             Authenticate: lambda protocol, request: request.password == "pw"},
            tls_context=self.tls_context,
            refuse_connection=refuse,
            session_limits=session_limits,
            implicit_tls=implicit_tls,
            count_replies=count_replies,
        )

    def deliver(self, protocol, request: Deliver):
        d = defer.Deferred()
        self.deliveries.append((request, d))
        if self.auto_deliver is not None:
            d.callback(self.auto_deliver)
        return d

    def connect(self, host: str = "192.0.2.1", port: int = 40000):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return protocol, transport


class ProtocolCase:
    service = "smtp"

    def setup_method(self):
        self.harness = Harness(self.service)
        self.protocol, self.transport = self.harness.connect()
        assert self.transport.value().splitlines() == [GREETING]
        self.transport.clear()

    def assert_server_response(self, send: bytes, expected: list[bytes], transport=None,
                             protocol=None) -> None:
        """Send C{send}; the reply lines are exactly C{expected}."""
        transport = transport or self.transport
        protocol = protocol or self.protocol
        transport.clear()
        protocol.dataReceived(send)
        assert transport.value().splitlines() == expected

    def codes(self, send: bytes) -> list[bytes]:
        """
        Send C{send}; the reply codes, one per final reply line.  A leading
        EHLO goes alone, and its reply is awaited (RFC 2920 3.1).
        """
        codes = []
        if send.startswith(b"EHLO ") and send.count(b"\r\n") > 1:
            ehlo, send = send.split(b"\r\n", 1)
            codes = self.codes(ehlo + b"\r\n")
        self.transport.clear()
        self.protocol.dataReceived(send)
        return codes + [line[:3] for line in self.transport.value().splitlines()
                        if line[3:4] != b"-"]

    def ehlo(self) -> None:
        self.codes(b"EHLO client.test\r\n")


class TestCommand(ProtocolCase):
    """Command lines: one reply each, in order."""

    def test_unknown_command(self):
        """An unknown command gets exactly one 500 5.5.1 line."""
        self.assert_server_response(b"FOO bar\r\n", [b"500 5.5.1 Command unrecognized"])

    def test_noop(self):
        """NOOP gets one 250 line."""
        self.assert_server_response(b"NOOP\r\n", [b"250 2.0.0 Ok"])

    def test_pipelined(self):
        """A pipelined group is answered in order, one reply per command."""
        assert self.codes(
                b"EHLO client.test\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
                b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<x@remote.test>\r\n"
                b"NOOP\r\nFOO\r\nRSET\r\n"
            ) == \
            [b"250", b"250", b"250", b"550", b"550", b"250", b"500", b"250"]

    def test_split_command(self):
        """A command split over several reads is answered once, when complete."""
        self.assert_server_response(b"NO", [])
        self.assert_server_response(b"OP\r", [])
        self.assert_server_response(b"\n", [b"250 2.0.0 Ok"])

    def test_long_command(self):
        """A 600-octet command is 500 5.5.2, and the connection stays usable."""
        self.assert_server_response(
            b"NOOP " + b"x" * 593 + b"\r\nNOOP\r\n",
            [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"],
        )
        assert not self.transport.disconnecting

    def test_long_command_streamed(self):
        """A long command arriving in pieces gets one 500 5.5.2, then commands work."""
        self.assert_server_response(b"NOOP " + b"x" * 595, [b"500 5.5.2 Line too long"])
        self.assert_server_response(b"y" * 300, [])
        self.assert_server_response(b"zz\r\nNOOP\r\n", [b"250 2.0.0 Ok"])
        assert not self.transport.disconnecting

    def test_longest_command(self):
        """A command of exactly 512 octets with CRLF is accepted (RFC 5321 4.5.3.1.4)."""
        line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
        assert len(line) == 512
        self.assert_server_response(line, [b"250 2.0.0 Ok"])
        line = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
        self.assert_server_response(line, [b"500 5.5.2 Line too long"])

    def test_quit(self):
        """QUIT is 221 and closes; later input is ignored."""
        self.assert_server_response(b"QUIT\r\nNOOP\r\n", [b"221 2.0.0 Bye"])
        assert self.transport.disconnecting
        self.assert_server_response(b"NOOP\r\n", [])

    def test_ehlo_multiline(self):
        """EHLO is a multi-line 250 whose last line has a space after the code."""
        self.transport.clear()
        self.protocol.dataReceived(b"EHLO client.test\r\n")
        lines = self.transport.value().splitlines()
        assert lines[0] == b"250-mx.example.org Hello client.test [192.0.2.1]"
        assert all(line.startswith(b"250-") for line in lines[:-1])
        assert lines[-1].startswith(b"250 ")
        assert b"STARTTLS" in [line[4:] for line in lines]


class TestTimeout(ProtocolCase):
    """The idle timer runs on the injected clock."""

    def test_idle(self):
        """After the idle timeout: 421 4.4.2 and the connection is closed."""
        self.harness.clock.advance(IDLE - 1)
        assert self.transport.value() == b""
        assert not self.transport.disconnecting
        self.harness.clock.advance(1)
        assert self.transport.value().splitlines()[0][:9] == b"421 4.4.2"
        assert self.transport.disconnecting

    def test_input_resets(self):
        """Input restarts the idle timer."""
        self.harness.clock.advance(IDLE - 1)
        self.codes(b"NOOP\r\n")
        self.harness.clock.advance(IDLE - 1)
        assert not self.transport.disconnecting
        self.harness.clock.advance(1)
        assert self.transport.disconnecting

    def test_connection_lost_cancels(self):
        """A closed connection leaves no timer behind."""
        self.protocol.connectionLost(None)
        assert self.harness.clock.getDelayedCalls() == []


class TestLimit:
    """Connection limits: 421 4.7.0 at connect, per address and in all."""

    def test_per_address(self):
        """The second connection from one address over a limit of one is refused."""
        harness = Harness(limits=ConnectionLimits(10, 1))
        first, t1 = harness.connect("192.0.2.1")
        second, t2 = harness.connect("192.0.2.1", 40001)
        assert t2.value().splitlines()[0][:9] == b"421 4.7.0"
        assert t2.disconnecting
        other, t3 = harness.connect("192.0.2.2")
        assert t3.value().splitlines() == [GREETING]
        second.connectionLost(None)
        first.connectionLost(None)
        again, t4 = harness.connect("192.0.2.1", 40002)
        assert t4.value().splitlines() == [GREETING]

    def test_total(self):
        """Over the total limit any address is refused; a freed slot is reused."""
        harness = Harness(limits=ConnectionLimits(2, 10))
        p1, _ = harness.connect("192.0.2.1")
        harness.connect("192.0.2.2")
        p3, t3 = harness.connect("192.0.2.3")
        assert t3.value().splitlines()[0][:9] == b"421 4.7.0"
        assert t3.disconnecting
        p3.connectionLost(None)
        p1.connectionLost(None)
        p4, t4 = harness.connect("192.0.2.4")
        assert t4.value().splitlines() == [GREETING]

    def test_refused_by_policy(self):
        """A refusal from refuse_connection is sent and the connection closed."""
        harness = Harness(
            refuse=lambda address: replies.S421_BLOCKED if address == "192.0.2.66" else None
        )
        protocol, transport = harness.connect("192.0.2.66")
        assert transport.value().splitlines()[0][:9] == b"421 4.7.0"
        assert transport.disconnecting
        protocol.dataReceived(b"NOOP\r\n")
        assert len(transport.value().splitlines()) == 1


class TestStartTLS(ProtocolCase):
    """STARTTLS discards what was pipelined behind it (CVE-2011-0411)."""

    def test_injection(self):
        """STARTTLS and RSET in one read: 220, TLS starts, RSET is never answered."""
        self.ehlo()
        self.assert_server_response(b"STARTTLS\r\nRSET\r\n", [b"220 2.0.0 Ready to start TLS"])
        assert len(self.transport.tls_started) == 1
        context, written = self.transport.tls_started[0]
        assert context is self.harness.tls_context
        assert written.splitlines() == [b"220 2.0.0 Ready to start TLS"]
        # Nothing from before the handshake carries over: a new EHLO is needed.
        self.assert_server_response(b"MAIL FROM:<a@remote.test>\r\n",
                                    [b"503 5.5.1 Send EHLO/HELO first"])

    def test_injection_with_mail(self):
        """An injected transaction behind STARTTLS is dropped entirely."""
        self.ehlo()
        self.assert_server_response(
            b"STARTTLS\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n",
            [b"220 2.0.0 Ready to start TLS"],
        )
        assert self.codes(b"EHLO client.test\r\n") == [b"250"]
        assert self.codes(b"RCPT TO:<alice@example.org>\r\n") == [b"503"]

    def test_after_tls(self):
        """After the handshake the session works and STARTTLS is not offered again."""
        self.ehlo()
        self.codes(b"STARTTLS\r\n")
        self.transport.clear()
        self.protocol.dataReceived(b"EHLO client.test\r\n")
        lines = self.transport.value().splitlines()
        assert lines[-1].startswith(b"250 ")
        assert b"250-STARTTLS" not in lines
        assert b"250 STARTTLS" not in lines


class TestData(ProtocolCase):
    """DATA, delivery requests and what happens while they run."""

    def start_data(self) -> None:
        assert self.codes(b"EHLO client.test\r\nMAIL FROM:<x@remote.test>\r\n"
                       b"RCPT TO:<alice@example.org>\r\nDATA\r\n") == \
            [b"250", b"250", b"250", b"354"]

    def test_reading_goes_on_while_delivering_until_much_is_buffered(self):
        """
        While a delivery is pending the transport keeps reading (pipelined
        commands wait in our buffer) until more than MAX_BUFFERED_WHILE_BUSY
        has piled up; then it pauses, and resumes once the reply is sent.
        """
        from pullmail.smtp.protocol import MAX_BUFFERED_WHILE_BUSY

        self.harness.auto_deliver = None
        self.start_data()
        self.protocol.dataReceived(b"body\r\n.\r\nNOOP\r\n")
        assert self.transport.producerState == "producing"
        self.protocol.dataReceived(b"NOOP\r\n" * (MAX_BUFFERED_WHILE_BUSY // 6 + 1))
        assert self.transport.producerState == "paused"
        self.transport.clear()
        self.harness.deliveries[0][1].callback(Reply(250, "2.0.0", "Ok: queued as Q9"))
        assert self.transport.producerState == "producing"
        assert self.transport.value().splitlines()[:2] == \
                         [b"250 2.0.0 Ok: queued as Q9", b"250 2.0.0 Ok"]

    def test_delivered(self):
        """The message goes to the performer; its reply is sent."""
        self.start_data()
        self.assert_server_response(b"Subject: x\r\n\r\n..hi\r\n.\r\n",
                                    [b"250 2.0.0 Ok: queued as Q1"])
        [(request, _)] = self.harness.deliveries
        assert b"".join(request.chunks) == b"Subject: x\r\n\r\n.hi\r\n"
        assert request.envelope.recipients == ("alice@example.org",)

    def test_pipelined_after_data(self):
        """Commands pipelined after the terminator are answered after the 250."""
        self.start_data()
        assert self.codes(b"body\r\n.\r\nNOOP\r\nQUIT\r\n") == [b"250", b"250", b"221"]

    def test_smuggling(self):
        """A smuggled end of data is refused and its 'commands' are data."""
        self.start_data()
        assert self.codes(b"a\r\n\n.\nMAIL FROM:<evil@remote.test>\r\n"
                       b"RCPT TO:<alice@example.org>\r\nDATA\r\nevil\r\n.\r\nNOOP\r\n") == \
            [b"550", b"250"]
        assert self.harness.deliveries == []

    def test_pending_delivery_holds_input(self):
        """Input arriving while a delivery is pending is answered after it."""
        self.harness.auto_deliver = None
        self.start_data()
        self.assert_server_response(b"body\r\n.\r\n", [])
        self.assert_server_response(b"NOOP\r\nRSET\r\n", [])
        self.transport.clear()
        self.harness.deliveries[0][1].callback(Reply(250, "2.0.0", "Ok: queued as Q2"))
        assert self.transport.value().splitlines() == \
            [b"250 2.0.0 Ok: queued as Q2", b"250 2.0.0 Ok", b"250 2.0.0 Ok"]

    def test_no_idle_timeout_while_delivering(self):
        """
        The idle timer measures the client's silence: while the server is
        still storing a message the client waits (RFC 5321 4.5.3.2.6 gives it
        10 minutes), so the server does not drop it with 421 meanwhile.
        """
        self.harness.auto_deliver = None
        self.start_data()
        self.protocol.dataReceived(b"body\r\n.\r\n")
        self.transport.clear()
        self.harness.clock.advance(IDLE + 1)
        assert not self.transport.disconnecting
        self.harness.deliveries[0][1].callback(Reply(250, "2.0.0", "Ok: queued as Q3"))
        assert self.transport.value().splitlines() == [b"250 2.0.0 Ok: queued as Q3"]

    def test_delivery_fails(self, logged_events):
        """A failing delivery is 451 4.3.0 and the session goes on."""
        self.harness.auto_deliver = None
        self.start_data()
        self.protocol.dataReceived(b"body\r\n.\r\nNOOP\r\n")
        self.transport.clear()
        self.harness.deliveries[0][1].errback(RuntimeError("disk on fire"))
        assert [line[:9] for line in self.transport.value().splitlines()] == \
            [b"451 4.3.0", b"250 2.0.0"]
        assert len(logged_failures(logged_events, RuntimeError)) == 1
        assert not self.transport.disconnecting
        assert self.codes(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\n") == \
            [b"250", b"250"]

    def test_too_big(self):
        """A message over the size limit is 552 and the session goes on."""
        self.start_data()
        assert self.codes(b"x" * 900 + b"\r\n") == []
        assert self.codes((b"y" * 900 + b"\r\n") * 12 + b".\r\nNOOP\r\n") == [b"552", b"250"]
        assert self.harness.deliveries == []

    def test_long_line(self):
        """A data line over 1000 octets is 550 5.6.0 after the end of data."""
        self.start_data()
        self.assert_server_response(b"x" * 1200 + b"\r\n.\r\n",
                                    [replies.S550_DATA_LINE_TOO_LONG.render().rstrip()])


class TestAuth(ProtocolCase):
    """AUTH through the glue, with an Authenticate performer."""

    service = "submission"

    def tls(self) -> None:
        self.ehlo()
        assert self.codes(b"STARTTLS\r\n") == [b"220"]
        self.ehlo()

    def test_sasl_responses_never_logged(self, logged_events):
        """A refused AUTH LOGIN is logged as AUTH, never with its base64 lines."""
        self.tls()
        user = base64.b64encode(b"alice@example.org")
        secret = base64.b64encode(b"not-the-password")
        assert self.codes(b"AUTH LOGIN\r\n" + user + b"\r\n" + secret + b"\r\n") == \
            [b"334", b"334", b"535"]
        [event] = [e for e in logged_events if e.get("event") == "command-rejected"]
        assert event["verb"] == "AUTH"
        text = repr(logged_events)
        assert user.decode()[:12] not in text and secret.decode()[:12] not in text

    def test_auth_flow(self):
        """STARTTLS, EHLO, AUTH PLAIN, MAIL: 220, 250, 235, 250."""
        self.ehlo()
        assert self.codes(b"STARTTLS\r\n") == [b"220"]
        plain = base64.b64encode(b"\0alice@example.org\0pw")
        assert self.codes(b"EHLO client.test\r\nAUTH PLAIN " + plain
                          + b"\r\nMAIL FROM:<alice@example.org>\r\n") == \
            [b"250", b"235", b"250"]

    def test_auth_before_tls(self):
        """AUTH before TLS is 530 5.7.0 through the glue too."""
        self.ehlo()
        self.assert_server_response(b"AUTH PLAIN AGFAYg==\r\n",
                                    [b"530 5.7.0 Must issue a STARTTLS command first"])

    def test_bad_password(self):
        """A refused password is 535 5.7.8 and MAIL still needs AUTH."""
        self.tls()
        plain = base64.b64encode(b"\0alice@example.org\0wrong")
        assert self.codes(b"AUTH PLAIN " + plain + b"\r\nMAIL FROM:<alice@example.org>\r\n") == \
            [b"535", b"530"]

    def test_long_sasl_response(self):
        """
        A SASL response longer than a command line is still a response
        (RFC 4954 4: servers must handle the encoded size their mechanisms
        produce); here a long wrong password gets 535, not 500.
        """
        self.tls()
        assert self.codes(b"AUTH PLAIN\r\n") == [b"334"]
        response = base64.b64encode(b"\0alice@example.org\0" + b"p" * 450)
        assert len(response) > 512
        assert self.codes(response + b"\r\n") == [b"535"]

    def test_auth_backend_fails(self, logged_events):
        """A failing password check is 454 4.7.0 (RFC 4954 6), and the session goes on."""
        self.harness.factory.performers[Authenticate] = lambda protocol, request: defer.fail(
            RuntimeError("pool gone")
        )
        self.tls()
        plain = base64.b64encode(b"\0alice@example.org\0pw")
        lines = self.codes(b"AUTH PLAIN " + plain + b"\r\nNOOP\r\n")
        assert lines == [b"454", b"250"]
        assert self.transport.value().splitlines()[0][:9] == b"454 4.7.0"


class TestClientSTARTTLSInjection:
    """
    The sending side's twin of CVE-2011-0411: a peer (or a man in the
    middle) that writes more behind its 220 to STARTTLS must not have those
    plaintext lines read as replies under TLS.
    """

    EHLO = b"250-mx.peer.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n"

    def setup_method(self) -> None:
        self.connection = ClientConnection(Clock(), IDLE)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 25))
        self.connection.makeConnection(self.transport)
        self.session = defer.Deferred.fromCoroutine(
            open_session(self.connection, "mx.example.org", tls_options=object())
        )
        self.connection.dataReceived(b"220 mx.peer.example ESMTP\r\n")
        self.connection.dataReceived(self.EHLO)
        assert self.transport.value().splitlines()[-1] == b"STARTTLS"

    def test_injected_replies_break_the_session(self) -> None:
        """
        220 and a fake EHLO reply in one write: no handshake, no EHLO under
        TLS, the connection is dropped and the session fails (the mail
        stays queued).
        """
        self.connection.dataReceived(
            b"220 2.0.0 go\r\n250-fake\r\n250 PIPELINING\r\n"
        )
        failure_of(self.session, ProtocolError)
        assert self.transport.tls_started == []
        assert self.transport.disconnecting
        assert self.transport.value().splitlines()[-1] == b"STARTTLS"

    def test_clean_220_starts_tls(self) -> None:
        """A 220 alone starts the handshake and EHLO is said again."""
        self.connection.dataReceived(b"220 2.0.0 go\r\n")
        assert len(self.transport.tls_started) == 1
        assert self.transport.value().splitlines()[-1] == b"EHLO mx.example.org"
        self.connection.dataReceived(b"250-mx.peer.example\r\n250 PIPELINING\r\n")
        session = result_of(self.session)
        assert session.offers("PIPELINING")


# -- limits against hostile peers (issue 18) -------------------------------------


def connect(**session_limits) -> tuple[Harness, object, TLSStringTransport]:
    """A harness with these SessionLimits, one connection, its greeting read."""
    implicit = session_limits.pop("implicit_tls", False)
    harness = Harness(session_limits=SessionLimits(**session_limits), implicit_tls=implicit)
    protocol, transport = harness.connect()
    transport.clear()
    return harness, protocol, transport


def said(protocol, transport, data: bytes) -> list[bytes]:
    transport.clear()
    protocol.dataReceived(data)
    return transport.value().splitlines()


def ehlo(protocol, transport) -> None:
    assert said(protocol, transport, b"EHLO client.test\r\n")[-1].startswith(b"250 ")


ENVELOPE = b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"


def envelope_then(protocol, transport, after: bytes) -> list[bytes]:
    """EHLO, then MAIL and RCPT pipelined with C{after}; the replies to the group."""
    ehlo(protocol, transport)
    return said(protocol, transport, ENVELOPE + after)


class TestBareLineEndings:
    """Issue 18 item 5: a command line with a bare CR or LF is 500 5.5.2."""

    @pytest.mark.parametrize("line", [b"MAIL FROM:<a@remote.test>\nRCPT TO:<alice@example.org>",
                                      b"NOOP\rRSET", b"NOOP\n"])
    def test_refused_whole(self, line):
        _, protocol, transport = connect()
        ehlo(protocol, transport)
        lines = said(protocol, transport, line + b"\r\nNOOP\r\n")
        assert lines == [replies.S500_BARE_LINE_ENDING.render().rstrip(), b"250 2.0.0 Ok"]

    def test_smuggled_command_never_runs(self):
        """The MAIL before the bare LF did not start a transaction."""
        _, protocol, transport = connect()
        ehlo(protocol, transport)
        said(protocol, transport, b"MAIL FROM:<a@remote.test>\nRCPT TO:<alice@example.org>\r\n")
        assert said(protocol, transport, b"RCPT TO:<alice@example.org>\r\n")[0][:3] == b"503"


class TestImproperPipelining:
    """Issue 18 item 8: RFC 2920 3.1, EHLO/HELO and DATA end a group."""

    @pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
    def test_commands_behind_ehlo(self, verb, logged_events):
        _, protocol, transport = connect()
        lines = said(protocol, transport, verb + b" bot.test\r\nMAIL FROM:<a@remote.test>\r\n")
        assert lines[-1] == b"554 5.5.0 Improper use of SMTP command pipelining (RFC 2920 3.1)"
        assert lines[-2].startswith(b"250 ")
        assert transport.disconnecting
        assert [e["verb"] for e in logged_events
                if e.get("event") == "improper-pipelining"] == [verb.decode()]

    def test_text_before_354(self):
        _, protocol, transport = connect()
        lines = envelope_then(protocol, transport, b"DATA\r\nSubject: spam\r\n")
        assert [line[:9] for line in lines] == [b"250 2.1.0", b"250 2.1.5", b"554 5.5.0"]
        assert transport.disconnecting

    def test_mail_rcpt_data_group_is_proper(self):
        """RFC 2920: MAIL, RCPT and DATA may go in one group, DATA last."""
        harness, protocol, transport = connect()
        lines = envelope_then(protocol, transport, b"DATA\r\n")
        assert [line[:3] for line in lines] == [b"250", b"250", b"354"]
        assert said(protocol, transport, b"hi\r\n.\r\n")[0][:3] == b"250"
        assert not transport.disconnecting

    def test_allow(self):
        _, protocol, transport = connect(improper_pipelining="allow")
        lines = said(protocol, transport, b"EHLO bot.test\r\nMAIL FROM:<a@remote.test>\r\n")
        assert lines[-1] == b"250 2.1.0 Ok"
        assert not transport.disconnecting


class TestPregreet:
    """Issue 18 item 8: postscreen's pre-greet test."""

    def test_multiline_greeting_after_the_wait(self):
        harness = Harness(session_limits=SessionLimits(pregreet_wait=3.0))
        protocol, transport = harness.connect()
        assert transport.value() == b"220-mx.example.org ESMTP pullmail\r\n"
        harness.clock.advance(3.0)
        assert transport.value().splitlines() == [b"220-mx.example.org ESMTP pullmail",
                                                  GREETING]
        ehlo(protocol, transport)

    def test_talker_refused(self):
        harness = Harness(session_limits=SessionLimits(pregreet_wait=3.0))
        protocol, transport = harness.connect()
        harness.clock.advance(1.0)
        lines = said(protocol, transport, b"EHLO bot.test\r\n")
        assert lines == [replies.S554_PREGREET.render().rstrip()]
        assert transport.disconnecting
        harness.clock.advance(5.0)
        assert transport.value().splitlines() == lines   # no late greeting

    def test_off_by_default(self):
        _, transport = Harness().connect()
        assert transport.value().splitlines() == [GREETING]


class TestDeadlines:
    """Issue 18 items 2 and 7: RFC 5321 4.5.3.2 timeouts a slowloris cannot reset."""

    def test_command_line_deadline(self):
        """One byte every 10 s resets the idle timer, not the command deadline."""
        harness, protocol, transport = connect(command_timeout=60.0)
        for byte in b"NOOP NOOP":
            protocol.dataReceived(bytes([byte]))
            harness.clock.advance(10.0)
            if transport.disconnecting:
                break
        assert transport.value().splitlines()[-1][:9] == b"421 4.4.2"
        assert harness.clock.seconds() == 60.0

    def test_complete_lines_stop_the_deadline(self):
        harness, protocol, transport = connect(command_timeout=60.0)
        for _ in range(10):
            protocol.dataReceived(b"NO")
            harness.clock.advance(5.0)
            protocol.dataReceived(b"OP\r\n")
            harness.clock.advance(5.0)
        assert not transport.disconnecting

    @pytest.mark.parametrize("command", [b"DATA\r\n", b"BDAT 100000 LAST\r\n"])
    def test_data_trickle_cut_off(self, command):
        """After DATA, and for a BDAT chunk (RFC 3030) alike; nothing is stored."""
        harness, protocol, transport = connect(data_timeout=60.0, min_data_rate=1000)
        envelope_then(protocol, transport, command)
        while not transport.disconnecting and harness.clock.seconds() < 600:
            protocol.dataReceived(b"x")
            harness.clock.advance(1.0)
        assert transport.value().splitlines()[-1][:9] == b"421 4.4.2"
        assert 60.0 <= harness.clock.seconds() <= 61.0
        assert harness.deliveries == []

    def test_data_at_the_minimum_rate_goes_through(self):
        """2000 octets/s against a 1000 octets/s minimum: 5 minutes are fine."""
        harness, protocol, transport = connect(data_timeout=60.0, min_data_rate=1000)
        envelope_then(protocol, transport, b"DATA\r\n")
        for _ in range(300):
            protocol.dataReceived(b"y" * 998 + b"\r\n" + b"z" * 998 + b"\r\n")
            harness.clock.advance(1.0)
        lines = said(protocol, transport, b".\r\n")
        assert not transport.disconnecting
        assert lines[0][:3] == b"552"    # over the harness's 10 kB limit, but not cut off

    def test_starttls_handshake_deadline(self):
        harness, protocol, transport = connect(tls_handshake_timeout=30.0)
        ehlo(protocol, transport)
        assert said(protocol, transport, b"STARTTLS\r\n")[0][:3] == b"220"
        harness.clock.advance(29.0)
        assert not transport.disconnecting
        harness.clock.advance(1.0)
        assert transport.aborted

    def test_completed_handshake_cancels_the_deadline(self):
        harness, protocol, transport = connect(tls_handshake_timeout=30.0)
        ehlo(protocol, transport)
        said(protocol, transport, b"STARTTLS\r\n")
        protocol.handshakeCompleted()
        harness.clock.advance(100.0)
        assert not transport.disconnecting
        ehlo(protocol, transport)

    def test_implicit_tls_handshake_deadline(self):
        harness, protocol, transport = connect(tls_handshake_timeout=30.0, implicit_tls=True)
        harness.clock.advance(30.0)
        assert transport.aborted

    def test_idle_timeout_during_handshake_aborts(self):
        """The idle 421 cannot get through an unfinished handshake: abort instead."""
        harness, protocol, transport = connect(tls_handshake_timeout=10 * IDLE)
        ehlo(protocol, transport)
        said(protocol, transport, b"STARTTLS\r\n")
        harness.clock.advance(IDLE)
        assert transport.aborted


class TestBudgets:
    """Issue 18 item 9: error and junk budgets, forbidden verbs."""

    def test_errors_slow_down_then_close(self):
        harness, protocol, transport = connect(max_errors=4)
        assert said(protocol, transport, b"FOO\r\nBAR\r\n")[-1][:3] == b"500"
        assert said(protocol, transport, b"BAZ\r\nQUX\r\n") == []   # the third waits 1 s
        harness.clock.advance(1.0)
        lines = transport.value().splitlines()
        assert [line[:3] for line in lines] == [b"500", b"500", b"421"]
        assert lines[-1] == replies.S421_TOO_MANY_ERRORS.render().rstrip()
        assert transport.disconnecting

    def test_junk_commands(self):
        harness, protocol, transport = connect(max_junk_commands=5)
        lines = said(protocol, transport, b"NOOP\r\n" * 5 + b"RSET\r\n")
        assert lines[-1] == replies.S421_TOO_MANY_JUNK.render().rstrip()
        assert transport.disconnecting

    @pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"CONNECT mx:25 HTTP/1.0", b"USER root"])
    def test_forbidden_verbs_close_at_once(self, line):
        _, protocol, transport = connect()
        lines = said(protocol, transport, line + b"\r\nHost: x\r\n\r\n")
        assert lines == [b"554 5.5.0 Not an SMTP command, closing connection"]
        assert transport.disconnecting


def test_peer_text_escaped_in_logs(logged_events):
    """Issue 18 item 14: an unknown verb with ESC and BS is logged escaped."""
    _, protocol, transport = connect()
    said(protocol, transport, b"\x1b[2J\x08EVIL\xff x\r\n")
    [event] = [e for e in logged_events if e.get("event") == "command-rejected"]
    assert event["verb"] == "\\x1b[2J\\x08EVIL\\xff"


@pytest.mark.parametrize("count_replies", [True, False])
def test_reply_events_only_when_counted(logged_events, count_replies):
    """
    The REPLY event of each reply (for the metrics, below the log's level)
    is emitted only when the factory says they are counted; refusals are
    logged either way.
    """
    harness = Harness(count_replies=count_replies)
    protocol, transport = harness.connect()
    said(protocol, transport, b"EHLO client.test\r\n")
    said(protocol, transport, b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<nobody@example.org>\r\n")
    counted = [(e["verb"], e["code"]) for e in logged_events if e.get("event") == "reply"]
    assert counted == ([("EHLO", 250), ("MAIL", 250)] if count_replies else [])
    [refusal] = [e for e in logged_events if e.get("event") == "command-rejected"]
    assert (refusal["verb"], refusal["code"]) == ("RCPT", 550)


class WriteCounting(TLSStringTransport):
    """Each write() kept apart."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def counting_connection(harness: "Harness"):
    protocol = harness.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
    transport = WriteCounting(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    protocol.makeConnection(transport)
    transport.writes.clear()
    transport.clear()
    return protocol, transport


def test_replies_to_a_pipelined_group_go_in_one_write() -> None:
    """RFC 2920: the replies to a group read at once leave in one write, in order."""
    harness = Harness()
    harness.auto_deliver = None
    protocol, transport = counting_connection(harness)
    protocol.dataReceived(b"EHLO client.test\r\n")
    transport.writes.clear()
    protocol.dataReceived(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
                          b"RCPT TO:<nobody@example.org>\r\nDATA\r\n")
    assert [line[:3] for line in b"".join(transport.writes).splitlines()] == [
        b"250", b"250", b"550", b"354"]
    assert len(transport.writes) == 1
    transport.writes.clear()
    protocol.dataReceived(b"text\r\n.\r\nNOOP\r\n")       # the NOOP waits for the delivery
    assert transport.writes == []
    harness.deliveries[0][1].callback(Reply(250, "2.0.0", "Ok: queued as Q9"))
    assert b"".join(transport.writes).splitlines() == [b"250 2.0.0 Ok: queued as Q9",
                                                       b"250 2.0.0 Ok"]


def test_held_replies_go_before_a_close_and_before_tls() -> None:
    harness = Harness()
    protocol, transport = counting_connection(harness)
    protocol.dataReceived(b"EHLO client.test\r\n")
    protocol.dataReceived(b"NOOP\r\nSTARTTLS\r\n")
    [(_, before_tls)] = transport.tls_started
    assert [line[:3] for line in before_tls.splitlines()[-2:]] == [b"250", b"220"]
    protocol, transport = counting_connection(harness)
    protocol.dataReceived(b"NOOP\r\nQUIT\r\n")
    assert transport.value().splitlines() == [b"250 2.0.0 Ok", b"221 2.0.0 Bye"]
    assert transport.disconnecting


def connection_events(events) -> list:
    return [(e["peer"], e["service"]) for e in events if e.get("event") == "connection"]


@pytest.mark.parametrize("reply, messages", [
    (Reply(250, "2.0.0", "Ok: queued as Q1"), 1),
    (Reply(451, "4.3.0", "Try again later"), 0),
])
def test_every_connection_is_one_event_as_it_ends(logged_events, reply, messages):
    """
    SPEC 9: one event per connection, logged as it ends, with the number
    of messages the session handed over.
    """
    harness = Harness()
    harness.auto_deliver = reply
    protocol, transport = harness.connect()
    said(protocol, transport, b"EHLO client.test\r\n")
    said(protocol, transport, b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\n")
    said(protocol, transport, b"DATA\r\n")
    said(protocol, transport, b"text\r\n.\r\nQUIT\r\n")
    assert connection_events(logged_events) == []
    protocol.connectionLost(Failure(ConnectionDone()))
    assert connection_events(logged_events) == [("192.0.2.1", "smtp")]
    [event] = [e for e in logged_events if e.get("event") == "connection"]
    assert event["messages"] == messages


def test_a_refused_connection_is_logged_as_refused_only(logged_events):
    harness = Harness(refuse=lambda address: replies.S421_TOO_MANY_CONNECTIONS)
    protocol, transport = harness.connect()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert [e["event"] for e in logged_events if "event" in e] == ["connection-refused"]


_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9]([ -].*)?")
_PIECES = [b"EHLO x.test\r\n", b"MAIL FROM:<a@remote.test>\r\n", b"RCPT TO:<alice@example.org>\r\n",
           b"DATA\r\n", b"text\r\n", b".\r\n", b"NOOP\r\n", b"GET / HTTP/1.1\r\n", b"\n", b"\r",
           b"x" * 600, b"RSET\r\n", b"STARTTLS\r\n", b"\x1b[2J", b"QUIT\r\n"]


@settings(max_examples=150, deadline=None)
@given(stream=st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=40)), max_size=30),
       waits=st.lists(st.floats(0, 400), max_size=30),
       pipelining=st.sampled_from(["reject", "allow"]))
def test_any_input_gets_well_formed_replies(stream, waits, pipelining):
    """
    Whatever a peer sends, in whatever pieces, with whatever pauses: the
    glue never raises, every line it writes is a reply line, and once it
    has closed it writes nothing more.
    """
    harness, protocol, transport = connect(max_errors=6, command_timeout=60.0,
                                           data_timeout=60.0, improper_pipelining=pipelining)
    written_at_close = None
    for piece, wait in zip(stream, waits + [0.0] * len(stream)):
        protocol.dataReceived(piece)
        harness.clock.advance(wait)
        if transport.disconnecting and written_at_close is None:
            written_at_close = transport.value()
    for line in transport.value().split(b"\r\n")[:-1]:
        assert _REPLY_LINE.fullmatch(line), line
    if written_at_close is not None:
        assert transport.value() == written_at_close


class TestChunking(ProtocolCase):
    """CHUNKING (RFC 3030) through the glue: exact octets, one reply per chunk."""

    def envelope(self, after: bytes = b"") -> list[bytes]:
        return self.codes(b"EHLO client.test\r\nMAIL FROM:<x@remote.test>\r\n"
                          b"RCPT TO:<alice@example.org>\r\n" + after)

    def test_offered(self):
        self.transport.clear()
        self.protocol.dataReceived(b"EHLO client.test\r\n")
        assert b"250-CHUNKING" in self.transport.value()

    def test_pipelined_chunks_then_last(self):
        """Chunks pipelined with the envelope; lines in a chunk are octets, not commands."""
        codes = self.envelope(b"BDAT 12\r\nSubject: x\r\n"
                              b"BDAT 15\r\n\r\n.\r\nQUIT\r\nhi\r\nBDAT 0 LAST\r\nNOOP\r\n")
        assert codes == [b"250", b"250", b"250", b"250", b"250", b"250", b"250"]
        [(request, _)] = self.harness.deliveries
        assert b"".join(request.chunks) == b"Subject: x\r\n\r\n.\r\nQUIT\r\nhi\r\n"
        assert request.size == 27

    def test_chunk_split_across_reads(self):
        self.envelope()
        assert self.codes(b"BDAT 10 LAST\r\nabc") == []
        assert self.codes(b"defg") == []
        assert self.codes(b"hij") == [b"250"]
        [(request, _)] = self.harness.deliveries
        assert b"".join(request.chunks) == b"abcdefghij\r\n"   # CRLF added at the end

    @pytest.mark.parametrize("argument", [b"x", b"-5", b"10 LAST extra", b"", b"1e3 LAST"])
    def test_bad_size_is_501_and_closes(self, argument):
        """The chunk cannot be framed: 501 5.5.4, and nothing after it is read."""
        self.envelope()
        self.transport.clear()
        self.protocol.dataReceived(b"BDAT " + argument + b"\r\nRSET\r\n")
        assert self.transport.value().splitlines() == [b"501 5.5.4 Syntax: BDAT chunk-size [LAST]"]
        assert self.transport.disconnecting
        assert self.harness.deliveries == []

    def test_over_the_limit_is_552_read_and_thrown_away(self):
        """The harness's limit is 10 kB: the chunk is read (framing) but kept nowhere."""
        self.envelope()
        assert self.codes(b"BDAT 20000\r\n" + b"x" * 20000) == [b"552"]
        assert self.protocol._chunk is None
        assert self.codes(b"BDAT 3 LAST\r\nabc") == [b"552"]
        assert self.harness.deliveries == []
        assert self.codes(b"NOOP\r\n") == [b"250"]

    def test_sizes_add_up_to_the_limit(self):
        self.envelope()
        assert self.codes(b"BDAT 6000\r\n" + b"y" * 6000) == [b"250"]
        assert self.codes(b"BDAT 6000 LAST\r\n" + b"y" * 6000) == [b"552"]
        assert self.harness.deliveries == []

    def test_data_after_bdat_is_503(self):
        self.envelope()
        assert self.codes(b"BDAT 3\r\nabc") == [b"250"]
        self.transport.clear()
        self.protocol.dataReceived(b"DATA\r\n")
        assert self.transport.value().startswith(b"503 5.5.1")
        assert self.codes(b"BDAT 0 LAST\r\n") == [b"250"]
        assert len(self.harness.deliveries) == 1

    def test_bdat_out_of_sequence(self):
        self.ehlo()
        assert self.codes(b"BDAT 0 LAST\r\n")[0] == b"503"
        assert self.codes(b"MAIL FROM:<x@remote.test>\r\nBDAT 0 LAST\r\n") == [b"250", b"503"]

    def test_rset_ends_the_chunked_transaction(self):
        self.envelope()
        assert self.codes(b"BDAT 3\r\nabcRSET\r\n") == [b"250", b"250"]
        assert self.codes(b"BDAT 0 LAST\r\n")[0] == b"503"
        assert self.harness.deliveries == []

    def test_connection_lost_mid_chunk_stores_nothing(self):
        self.envelope()
        self.protocol.dataReceived(b"BDAT 100 LAST\r\nonly a part")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        assert self.harness.deliveries == []

    def test_loop_refused_after_bdat_last(self):
        self.envelope()
        message = b"Received: x\r\n" * 101 + b"\r\nhi\r\n"
        self.transport.clear()
        self.protocol.dataReceived(b"BDAT %d LAST\r\n" % len(message) + message)
        assert self.transport.value().startswith(b"554 5.4.6")
        assert self.harness.deliveries == []

