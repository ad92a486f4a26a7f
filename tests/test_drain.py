"""
Tests for L{pullmail.smtp.drain} and the graceful stop of a node
(L{pullmail.node.logs.NodeService}): a message past its final dot gets its
250 before the connection closes and before the stores stop; idle
connections hear 421 at once; the waiting is bounded.  StringTransports
and a Clock.
"""

from __future__ import annotations

import pytest
from twisted.application import service
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pullmail import maillog
from pullmail.accounts.users import Accounts
from pullmail.node.logs import NodeService
from pullmail.smtp.drain import GRACE, LINGER, Drain
from pullmail.smtp.protocol import ClientConnection, ConnectionLimits, SMTPServerFactory
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import Deliver, ServerPolicy
from pullmail.testing import assert_no_result, result_of

WRITE_TIME = 1.0          # how long the fake store's durable write takes
# One group at a time (RFC 2920 3.1: EHLO and DATA end a group).
TRANSACTION = (b"EHLO client.test\r\n", b"MAIL FROM:<x@remote.test>\r\n"
               b"RCPT TO:<alice@example.org>\r\n", b"DATA\r\n")
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"
S250 = Reply(250, "2.0.0", "Ok: queued as Q1")


class World:
    """One SMTP service with a drain; its Deliver is a store whose write takes WRITE_TIME."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.drain = Drain(self.clock)
        self.stored: list[bytes] = []
        policy = ServerPolicy(
            hostname="mx.example.org", domains=("example.org",),
            accounts=Accounts(frozenset({"example.org"}), users={"alice@example.org": "h"}),
            service="smtp", max_size=10_000, max_recipients=5, tls_available=False,
        )
        self.factory = SMTPServerFactory(policy, self.clock, ConnectionLimits(10, 10), 300.0,
                                         {Deliver: self.deliver}, drain=self.drain)

    def deliver(self, protocol, request: Deliver):
        def written() -> Reply:
            self.stored.append(b"".join(request.chunks))
            return S250
        return task.deferLater(self.clock, WRITE_TIME, written)

    def connect(self, port: int = 40000):
        address = IPv4Address("TCP", "192.0.2.1", port)
        protocol = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def past_the_dot(self):
        """A connection whose message has just ended: its write is pending."""
        protocol, transport = self.connect()
        begin(protocol)
        protocol.dataReceived(MESSAGE)
        assert transport.value().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        transport.clear()
        return protocol, transport


def begin(protocol) -> None:
    """EHLO, MAIL, RCPT, DATA: the message text is next."""
    for group in TRANSACTION:
        protocol.dataReceived(group)


def lost(protocol) -> None:
    """What the reactor does once a closing transport has flushed."""
    protocol.connectionLost(Failure(error.ConnectionDone()))


@pytest.fixture
def world():
    return World()


def test_a_message_past_its_dot_gets_its_250_then_421(world):
    """
    Stopped while the message is being written: no reply yet, the
    connection open; once the write is done, 250, then 421 4.3.2 and the
    close; then the stop is over.
    """
    protocol, transport = world.past_the_dot()
    stopped = world.drain.stop()
    assert transport.value() == b"" and not transport.disconnecting
    assert_no_result(stopped)
    world.clock.advance(WRITE_TIME)
    assert transport.value() == (b"250 2.0.0 Ok: queued as Q1\r\n"
                                 b"421 4.3.2 Service shutting down, closing connection\r\n")
    assert transport.disconnecting and len(world.stored) == 1
    assert_no_result(stopped)     # the reply is still to leave
    lost(protocol)
    assert result_of(stopped) is None


def test_the_node_stops_its_stores_after_the_250(world):
    """
    NodeService.stopService: the listeners and connections first, the
    other services (the fsync helper, the stores) only once the 250 is
    written, so the pending write is not failed under the client.
    """
    heard_at_stop = []

    class Store(service.Service):
        def stopService(self):
            super().stopService()
            heard_at_stop.append(transport.value())

    node = NodeService()
    node.drain = world.drain
    Store().setServiceParent(node)
    node.startService()
    protocol, transport = world.past_the_dot()
    stopped = node.stopService()
    assert heard_at_stop == []
    world.clock.advance(WRITE_TIME)
    assert heard_at_stop == []
    lost(protocol)
    assert heard_at_stop == [b"250 2.0.0 Ok: queued as Q1\r\n"
                             b"421 4.3.2 Service shutting down, closing connection\r\n"]
    result_of(stopped)


def test_idle_and_unfinished_connections_hear_421_at_once(world):
    """
    An idle connection and one in the middle of its data stop now; the
    half-sent message is not stored (its client never heard 250).
    """
    idle, idle_transport = world.connect(40001)
    sending, sending_transport = world.connect(40002)
    begin(sending)
    sending.dataReceived(b"Subject: half\r\n")
    idle_transport.clear()
    sending_transport.clear()
    stopped = world.drain.stop()
    for protocol, transport in ((idle, idle_transport), (sending, sending_transport)):
        assert transport.value() == b"421 4.3.2 Service shutting down, closing connection\r\n"
        assert transport.disconnecting
    sending.dataReceived(b"rest\r\n.\r\n")
    lost(idle)
    lost(sending)
    assert result_of(stopped) is None
    assert world.stored == []


def test_commands_pipelined_behind_the_dot_are_not_run(world):
    """After the stop only the reply in flight goes out: the next MAIL gets no 250."""
    protocol, transport = world.connect()
    begin(protocol)
    protocol.dataReceived(MESSAGE + b"MAIL FROM:<y@remote.test>\r\n")
    transport.clear()
    world.drain.stop()
    world.clock.advance(WRITE_TIME)
    assert transport.value().splitlines() == [
        b"250 2.0.0 Ok: queued as Q1", b"421 4.3.2 Service shutting down, closing connection"]


@pytest.mark.parametrize("write_time, bound, event, field", [
    (None, GRACE, maillog.STOP_CUT_OFF, "requests"),
    (WRITE_TIME, LINGER, maillog.STOP_DRAINED, "connections"),
])
def test_the_wait_is_bounded(world, logged_events, write_time, bound, event, field):
    """
    A write that never ends is cut off after GRACE (the old behaviour,
    logged).  Once nothing is in flight, a connection that does not close
    (a TLS peer that never answers close_notify) is waited for LINGER only.
    """
    if write_time is None:
        world.factory.performers[Deliver] = lambda protocol, request: defer.Deferred()
    world.past_the_dot()
    stopped = world.drain.stop()
    world.clock.advance(write_time or 0.0)
    world.clock.advance(bound - 0.01)
    assert_no_result(stopped)
    world.clock.advance(0.01)
    assert result_of(stopped) is None
    [logged] = [e for e in logged_events if e.get("event") == event.name]
    assert logged[field] == 1


def test_nothing_in_hand_stops_at_once(world):
    assert result_of(world.drain.stop()) is None
    assert world.clock.getDelayedCalls() == []


def test_our_own_connection_waiting_for_a_reply_is_hung_up(world):
    """
    A retrieval connection (ours, in the client role) that carried a
    delivery: at the stop nothing is owed to its peer; it is closed, no 421.
    """
    connection = ClientConnection(world.clock, 300.0, drain=world.drain)
    transport = StringTransport()
    connection.makeConnection(transport)
    world.drain.track(connection, defer.succeed(None))
    stopped = world.drain.stop()
    assert transport.disconnecting and transport.value() == b""
    lost(connection)
    assert result_of(stopped) is None


# -- General Delivery's reversed turns -----------------------------------------------


def test_the_smta_finishes_the_turn_in_flight(world):
    """
    The SMTA is sending a message in its reversed turn when the stop comes:
    the turn runs to the RMTA's reply (the outcome the outbox records),
    then the SMTA, the server again, says 421 and closes.
    """
    from tests.test_reversal import SMTASide

    smta = SMTASide()
    smta.protocol.drain = world.drain
    world.drain.opened(smta.protocol)
    smta.receive(b"EHLO mx.receiver.example\r\nRETR Id_of_the_message_0123\r\n")
    smta.receive(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    stopped = world.drain.stop()
    world.clock.advance(LINGER)       # a turn in flight is waited for, as a request is
    assert_no_result(stopped)
    assert smta.receive(b"354 Go ahead\r\n")[-1] == b"."
    assert not smta.transport.disconnecting
    assert smta.receive(b"250 2.0.0 Ok: stored\r\n") == [
        b"421 4.3.2 Service shutting down, closing connection"]
    assert smta.results[0].accepted() == ["bob@receiver.example"]
    lost(smta.protocol)
    assert result_of(stopped) is None


def test_the_rmta_answers_the_retrieved_message_then_hangs_up(world):
    """
    The RMTA's delivery of retrieved mail is in flight when the stop comes:
    its 250 goes to the SMTA, then our retrieval connection closes (no 421:
    we are the client there).
    """
    from tests.test_reversal import GDEL_ID, RECIPIENT, SENDER, RMTASide

    rmta = RMTASide()
    pending = defer.Deferred()
    rmta.connection.drain = world.drain
    rmta.connection.performers = {Deliver: lambda connection, request: pending}
    rmta.retr(b"250 2.0.0 " + GDEL_ID.encode() + b" follows\r\n"
              + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n".encode())
    rmta.receive(b"DATA\r\n")
    rmta.connection.dataReceived(b"hi\r\n.\r\n")
    assert rmta.transport.value() == b""       # the delivery is in flight
    stopped = world.drain.stop()
    assert not rmta.transport.disconnecting
    pending.callback(S250)
    assert rmta.transport.value() == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert rmta.transport.disconnecting
    lost(rmta.connection)
    assert result_of(stopped) is None
