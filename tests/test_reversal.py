"""
Tests for the role reversal of General Delivery (SPEC 4) in
L{pullmail.smtp.protocol}: one connection swapping the server and client roles
after ``RETR``, bytes in and bytes out on a L{StringTransport}.

The SMTA side is an L{SMTPServerFactory} protocol whose Retrieve performer
answers with L{Reverse}; the RMTA side is a L{ClientConnection} that calls
C{serve_turn} with a L{TurnMachine}.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pullmail.accounts.users import Accounts
from pullmail.pull.verbs import Retrieve, TurnMachine, pull_extension
from pullmail.smtp import replies
from pullmail.smtp.client import send_transaction
from pullmail.smtp.envelope import Session
from pullmail.smtp.protocol import ClientConnection, ConnectionLimits, SMTPServerFactory
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import Deliver, Reverse, ServerPolicy
from pullmail.testing import assert_no_result, failure_of, result_of

GDEL_ID = "Id_of_the_message_0123"
SENDER = "alice@sender.example"
RECIPIENT = "bob@receiver.example"
MESSAGE = b"Subject: hello\r\n\r\n.hi\r\n"



def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")[:-1] if data.endswith(b"\r\n") else data.split(b"\r\n")


# -- the SMTA: server, then client for one turn, then server again -----------------


def logged_failures(events, *types) -> list:
    """The logged failures of one of C{types} among captured events."""
    return [e["log_failure"] for e in events
            if "log_failure" in e and e["log_failure"].check(*types)]


class SMTASide:
    def __init__(self) -> None:
        self.clock = Clock()
        self.results: list = []
        self.turn_errors: list[Failure] = []
        self.requests: list[Retrieve] = []
        self.recipients = [RECIPIENT]
        policy = ServerPolicy(
            hostname="mx.sender.example", domains=("sender.example",),
            accounts=Accounts(frozenset({"sender.example"}), users={SENDER: "h"}),
            service="smtp", max_size=100_000, max_recipients=10,
        )
        self.factory = SMTPServerFactory(
            policy, self.clock, ConnectionLimits(10, 10), 300.0, {Retrieve: self.retrieve},
            extensions=(pull_extension(),),
        )
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.20", 4000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.20", 4000))
        self.protocol.makeConnection(self.transport)
        self.transport.clear()  # the greeting

    def retrieve(self, connection, request: Retrieve):
        self.requests.append(request)
        if request.gdel_id != GDEL_ID:
            return defer.succeed(replies.S550_NO_SUCH_MESSAGE)

        async def turn(channel) -> None:
            try:
                result = await send_transaction(channel, SENDER, self.recipients, [MESSAGE])
            except BaseException:
                self.turn_errors.append(Failure())
                raise
            self.results.append(result)

        return defer.succeed(Reverse(Reply(250, "2.0.0", f"{GDEL_ID} follows"), turn))

    def receive(self, data: bytes) -> list[bytes]:
        """
        Feed bytes; return the lines written in answer.  A leading EHLO
        goes alone, as a client waits for its reply (RFC 2920 3.1).
        """
        if data.startswith(b"EHLO ") and data.count(b"\r\n") > 1:
            ehlo, data = data.split(b"\r\n", 1)
            self.protocol.dataReceived(ehlo + b"\r\n")
        self.protocol.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        return _lines(written)


MAIL_RCPT = [f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{RECIPIENT}>".encode()]


class TestSMTASide:
    def setup_method(self) -> None:
        self.smta = SMTASide()

    def start_turn(self, trailer: bytes = b"") -> list[bytes]:
        return self.smta.receive(b"EHLO mx.receiver.example\r\nRETR " + GDEL_ID.encode()
                                 + b"\r\n" + trailer)

    def test_retr_reverses_roles(self) -> None:
        """After '250 ... follows' the SMTA speaks first, as the client: MAIL, RCPT."""
        lines = self.start_turn()
        assert lines[0].startswith(b"250-mx.sender.example")
        follows = lines.index(f"250 2.0.0 {GDEL_ID} follows".encode())
        assert lines[follows + 1:] == MAIL_RCPT
        assert self.smta.requests[0].gdel_id == GDEL_ID
        assert self.smta.requests[0].session.peer == "192.0.2.20"

    def test_input_behind_retr_discarded(self) -> None:
        """SPEC 4: input pipelined behind RETR in the same packet is dropped, not answered."""
        lines = self.start_turn(b"NOOP\r\nQUIT\r\n")
        follows = lines.index(f"250 2.0.0 {GDEL_ID} follows".encode())
        assert lines[follows + 1:] == MAIL_RCPT
        assert not self.smta.transport.disconnecting
        # The turn goes on: the discarded lines were not read as replies either.
        assert self.smta.receive(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n") == [b"DATA"]

    def test_whole_turn_then_server_again(self) -> None:
        """
        After the RMTA's reply to end-of-data the SMTA is the server again, and
        a command in the same packet as that reply is answered.
        """
        self.start_turn()
        assert self.smta.receive(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n") == [b"DATA"]
        assert self.smta.receive(b"354 Go ahead\r\n") == \
                         [b"Subject: hello", b"", b"..hi", b"."]
        lines = self.smta.receive(b"250 2.0.0 Ok: stored\r\nQUIT\r\n")
        assert lines == [b"221 2.0.0 Bye"]
        assert self.smta.transport.disconnecting
        [result] = self.smta.results
        assert result.accepted() == [RECIPIENT]
        assert result.final == Reply(250, "2.0.0", "Ok: stored")

    def test_next_retr_after_turn(self) -> None:
        """The session survives the turn: EHLO is remembered, another RETR is served."""
        self.start_turn()
        self.smta.receive(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
        self.smta.receive(b"354 Go ahead\r\n")
        lines = self.smta.receive(b"250 2.0.0 Ok\r\nRETR Unknown_id_0123456789\r\n")
        assert lines == [b"550 5.7.1 no such message for you"]
        assert self.smta.receive(b"RETR " + GDEL_ID.encode() + b"\r\n") == \
                         [f"250 2.0.0 {GDEL_ID} follows".encode()] + MAIL_RCPT

    def test_rset_ends_turn(self) -> None:
        """MAIL refused: the SMTA sends RSET; its turn ends after the reply to RSET."""
        self.start_turn()
        assert self.smta.receive(b"550 5.7.1 Sender differs\r\n503 5.5.1 Need MAIL\r\n") == \
                         [b"RSET"]
        assert self.smta.receive(b"250 2.0.0 Ok\r\nNOOP\r\n") == [b"250 2.0.0 Ok"]
        [result] = self.smta.results
        assert result.accepted() == []
        assert result.refused(permanent=True) == [RECIPIENT]

    def test_refused_retr_stays_server(self) -> None:
        """A RETR answered with a refusal keeps the roles; the next command is served."""
        lines = self.smta.receive(b"EHLO mx.receiver.example\r\nRETR Unknown_id_0123456789\r\n"
                                  b"NOOP\r\n")
        assert lines[-2:] == [b"550 5.7.1 no such message for you", b"250 2.0.0 Ok"]

    def test_connection_lost_mid_turn(self, logged_events) -> None:
        """A connection lost during the turn fails the turn's transaction."""
        self.start_turn()
        self.smta.protocol.connectionLost(Failure(error.ConnectionDone()))
        [failure] = self.smta.turn_errors
        assert failure.check(error.ConnectionDone)
        assert self.smta.results == []
        # A peer leaving is an ordinary event, logged without a traceback.
        assert logged_failures(logged_events, error.ConnectionDone) == []

    def test_connection_lost_before_the_turn_begins(self, logged_events) -> None:
        """
        The RMTA leaves while its RETR is still being answered: the turn
        granted after that still runs, and fails at once, so whatever it
        holds (the claimed outbox entry) is given back; nothing is written.
        """
        granted = defer.Deferred()
        self.smta.protocol.performers = {Retrieve: lambda connection, request: granted}
        self.start_turn()
        self.smta.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.smta.transport.clear()
        ran = []

        async def turn(channel) -> None:
            ran.append(True)
            try:
                await send_transaction(channel, SENDER, [RECIPIENT], [MESSAGE])
            except BaseException:
                self.smta.turn_errors.append(Failure())
                raise

        granted.callback(Reverse(Reply(250, "2.0.0", f"{GDEL_ID} follows"), turn))
        assert ran == [True]
        [failure] = self.smta.turn_errors
        assert failure.check(error.ConnectionLost, error.ConnectionDone)
        assert self.smta.transport.value() == b""
        assert logged_failures(logged_events, error.ConnectionLost, error.ConnectionDone) == []

    def test_garbage_from_rmta_closes(self) -> None:
        """Something that is not a reply during the SMTA's turn closes the connection."""
        self.start_turn()
        self.smta.receive(b"MAIL FROM:<x@y.example>\r\n")
        assert self.smta.transport.disconnecting


# -- the RMTA: client, then server for one turn, then client again ------------------------


class RMTASide:
    def __init__(self, deliver_reply: Reply = Reply(250, "2.0.0", "Ok: stored")) -> None:
        self.clock = Clock()
        self.deliveries: list[Deliver] = []
        self.deliver_reply = deliver_reply
        policy = ServerPolicy(
            hostname="mx.receiver.example", domains=("receiver.example",),
            accounts=Accounts(frozenset({"receiver.example"}),
                              users={RECIPIENT: "h", "carol@receiver.example": "h"}),
            service="smtp", max_size=100_000, max_recipients=10,
        )
        self.machine = TurnMachine(
            policy, Session("192.0.2.30", "smtp", helo="mx.sender.example", esmtp=True),
            sender=SENDER, recipients=(RECIPIENT,),
        )
        self.connection = ClientConnection(self.clock, 300.0, {Deliver: self.deliver})
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.30", 25))
        self.connection.makeConnection(self.transport)
        self.turn: defer.Deferred | None = None

    def deliver(self, connection, request: Deliver):
        self.deliveries.append(request)
        return defer.succeed(self.deliver_reply)

    def retr(self, answer: bytes) -> defer.Deferred:
        """Send RETR; on a 250, serve the turn at once (as the retriever does)."""
        self.connection.send(b"RETR " + GDEL_ID.encode() + b"\r\n")
        d = self.connection.reply()

        def got(reply: Reply) -> Reply:
            if reply.code == 250:
                self.turn = self.connection.serve_turn(self.machine)
            return reply

        d.addCallback(got)
        self.transport.clear()
        self.connection.dataReceived(answer)
        return d

    def receive(self, data: bytes) -> list[bytes]:
        self.connection.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        return _lines(written)


class TestRMTASide:
    FOLLOWS = b"250 2.0.0 " + GDEL_ID.encode() + b" follows\r\n"

    def setup_method(self) -> None:
        self.rmta = RMTASide()

    def test_mail_in_same_packet_as_follows(self) -> None:
        """SPEC 4: what follows '250 follows' is the first command of the turn, and is served."""
        d = self.rmta.retr(self.FOLLOWS + f"MAIL FROM:<{SENDER}>\r\n".encode())
        assert result_of(d).code == 250
        assert _lines(self.rmta.transport.value()) == [b"250 2.1.0 Ok"]

    def test_follows_alone(self) -> None:
        d = self.rmta.retr(self.FOLLOWS)
        result_of(d)
        assert self.rmta.transport.value() == b""
        assert self.rmta.receive(f"MAIL FROM:<{SENDER}>\r\n".encode()) == \
                         [b"250 2.1.0 Ok"]

    def _through_data(self) -> None:
        self.rmta.retr(self.FOLLOWS + f"MAIL FROM:<{SENDER}>\r\n".encode())
        self.rmta.transport.clear()
        assert self.rmta.receive(f"RCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()) == \
            [b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>"]

    def test_turn_ends_after_reply_to_end_of_data(self) -> None:
        """
        After its reply to end-of-data the RMTA drops what was pipelined behind
        and is the client again: the next reply it reads is a reply.
        """
        self._through_data()
        lines = self.rmta.receive(b"Subject: x\r\n\r\n..hi\r\n.\r\nNOOP\r\nQUIT\r\n")
        assert lines == [b"250 2.0.0 Ok: stored"]
        [request] = self.rmta.deliveries
        assert request.chunks == [b"Subject: x\r\n\r\n.hi\r\n"]
        assert request.envelope.recipients == (RECIPIENT,)
        assert result_of(self.rmta.turn) is None
        assert self.rmta.machine.outcome.code == 250
        # Back in the client role; the dropped NOOP/QUIT are not taken as replies.
        self.rmta.connection.send(b"QUIT\r\n")
        d = self.rmta.connection.reply()
        assert_no_result(d)
        self.rmta.receive(b"221 2.0.0 Bye\r\n")
        assert result_of(d).code == 221
        assert not self.rmta.transport.disconnecting

    def test_deferred_delivery_ends_turn(self) -> None:
        """A 4xx reply to end-of-data ends the turn too."""
        self.rmta = RMTASide(deliver_reply=replies.S451_LOCAL_ERROR)
        self._through_data()
        assert self.rmta.receive(b"hi\r\n.\r\n") == \
                         [b"451 4.3.0 Local error in processing, try again later"]
        result_of(self.rmta.turn)
        assert self.rmta.machine.outcome == replies.S451_LOCAL_ERROR

    def test_refused_data_ends_turn(self) -> None:
        """Data the reader refuses (a bare LF) ends the turn with that refusal."""
        self._through_data()
        lines = self.rmta.receive(b"bare\nLF\r\n.\r\nJUNK\r\n")
        assert lines == [b"550 5.6.0 Message refused: bare CR or LF in data "
                                 b"(RFC 5321 2.3.8)"]
        assert self.rmta.deliveries == []
        result_of(self.rmta.turn)
        d = self.rmta.connection.reply()
        self.rmta.receive(b"250 2.0.0 Ok\r\n")
        assert result_of(d).code == 250

    def test_rset_ends_turn(self) -> None:
        """SPEC 4: MAIL refused, RSET: the reply to RSET ends the turn; input behind it dropped."""
        self.rmta.retr(self.FOLLOWS + b"MAIL FROM:<mallory@sender.example>\r\n")
        assert _lines(self.rmta.transport.value()) == \
                         [b"550 5.7.1 Sender differs from the notification"]
        self.rmta.transport.clear()
        assert self.rmta.receive(b"RSET\r\nMAIL FROM:<x@y.example>\r\n") == \
                         [b"250 2.0.0 Ok"]
        result_of(self.rmta.turn)
        d = self.rmta.connection.reply()
        self.rmta.receive(b"221 2.0.0 Bye\r\n")
        assert result_of(d).code == 221

    def test_refused_retr_stays_client(self) -> None:
        """A 550 to RETR is just a reply; no turn is served."""
        d = self.rmta.retr(b"550 5.7.1 no such message for you\r\n")
        assert result_of(d).code == 550
        assert self.rmta.turn is None
        d = self.rmta.connection.reply()
        self.rmta.receive(b"250 2.0.0 Ok\r\n")
        assert result_of(d).code == 250

    def test_connection_lost_mid_turn(self) -> None:
        """The serve_turn Deferred fails when the connection drops during the turn."""
        self.rmta.retr(self.FOLLOWS + f"MAIL FROM:<{SENDER}>\r\n".encode())
        assert_no_result(self.rmta.turn)
        self.rmta.connection.connectionLost(Failure(error.ConnectionLost()))
        failure_of(self.rmta.turn, error.ConnectionLost)

    def test_connection_lost_during_delivery(self) -> None:
        """Lost while the message is being stored: the turn fails, and nothing is written."""
        pending = defer.Deferred()
        self.rmta.deliver = lambda connection, request: pending
        self.rmta.connection.performers = {Deliver: self.rmta.deliver}
        self._through_data()
        self.rmta.receive(b"hi\r\n.\r\n")
        self.rmta.connection.connectionLost(Failure(error.ConnectionLost()))
        failure_of(self.rmta.turn, error.ConnectionLost)
        pending.callback(Reply(250, "2.0.0", "Ok"))
        assert self.rmta.transport.value() == b""
