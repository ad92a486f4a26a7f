"""
Twisted glue for the ESMTP server machine: bytes in, replies out.

The protocol frames command lines (512 octets at most), hands each to the
L{ServerMachine}, writes the replies, and carries out the machine's
requests.  While a request runs it reads nothing more, so pipelined
commands are answered in order, one reply each.  It owns the things a pure
machine cannot: the idle timer (on an injected clock), the connection
limits, the STARTTLS handshake and the DATA reader.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pullmail.smtp import replies
from pullmail.smtp.client import ProtocolError, ReplyReader
from pullmail.smtp.data import DataReader
from pullmail.smtp.envelope import Session
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import (
    Authenticate,
    BeginData,
    Close,
    EndTurn,
    Reverse,
    ServerMachine,
    ServerPolicy,
    StartTLS,
)

__all__ = ["SMTPServerFactory", "SMTPConnection", "SMTPServerProtocol", "ConnectionLimits"]

log = Logger(namespace="pullmail.smtp")


# Input kept while a request runs before the transport stops reading:
# enough for any pipelined group of commands (RFC 2920) and a DATA burst.
MAX_BUFFERED_WHILE_BUSY = 256 * 1024

# What the peer hears when carrying out a request fails on our side.
_FAILURE_REPLIES = {Authenticate: replies.S454_AUTH_TEMP}  # RFC 4954 6


class ConnectionLimits:
    """
    Counts open connections, in all and per peer network: C{key} maps an
    address to what is counted (its /24 or /64, issue 18; itself by default).
    """

    def __init__(self, total: int, per_address: int,
                 key: Callable[[str], str] = lambda address: address) -> None:
        self.total, self.per_address, self.key = total, per_address, key
        self._open: dict[str, int] = {}
        self._count = 0

    def acquire(self, address: str) -> bool:
        network = self.key(address)
        if self._count >= self.total or self._open.get(network, 0) >= self.per_address:
            return False
        self._count += 1
        self._open[network] = self._open.get(network, 0) + 1
        return True

    def release(self, address: str) -> None:
        network = self.key(address)
        self._count -= 1
        left = self._open[network] - 1
        if left:
            self._open[network] = left
        else:
            del self._open[network]


class SMTPConnection(Protocol):
    """
    One SMTP connection, in the server role (a L{ServerMachine} reads
    commands) or the client role (a L{ReplyReader} reads replies, and the
    connection is the L{Channel} of a client dialogue).  General Delivery
    swaps the two on one connection (SPEC 4).
    """

    factory: "SMTPServerFactory"

    def __init__(self) -> None:
        self._replies: ReplyReader | None = None     # set in the client role
        self._reply_waiters: deque[defer.Deferred] = deque()
        self._turn_done: defer.Deferred | None = None
        self._buffer = b""
        self._busy = False          # a request is running; input waits
        self._paused = False        # the transport is paused (backpressure)
        self._reader: DataReader | None = None
        self._discarding = False    # skipping the rest of an over-long line
        self._timer = None
        self._counted = False        # holds a place in the connection limits
        self.machine: ServerMachine | None = None
        self._closing = False
        self.performers: Mapping[type, Callable] = {}
        self.log_commands = False

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self.transport.getPeer()
        address = getattr(peer, "host", "unknown")
        self.machine = factory.new_machine(Session(address, factory.service, tls=factory.implicit_tls))
        self.performers = factory.performers
        self.log_commands = factory.log_commands
        log.info(
            "connection from {peer} on {service}", peer=address, service=factory.service,
            event="connection",
        )
        refusal = factory.refuse_connection(address)
        if refusal is None:
            self._counted = factory.limits.acquire(address)
            if not self._counted:
                refusal = replies.S421_TOO_MANY_CONNECTIONS
        if refusal is not None:
            log.info("refused connection from {peer}: {reply}", peer=address,
                     reply=str(refusal), event="rejected", code=refusal.code)
            self._closing = True
            self.transport.write(refusal.render())
            self.transport.loseConnection()
            return
        self.no_delay()
        self.start_timer(factory.clock, factory.idle_timeout)
        self.send_reply(self.machine.greeting())

    def connectionLost(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._counted:
            self._counted = False
            self.factory.limits.release(self.machine.session.peer)
        self._reader = None
        self._closing = True
        waiters, self._reply_waiters = self._reply_waiters, deque()
        for waiter in waiters:
            waiter.errback(reason)
        if self._turn_done is not None:
            done, self._turn_done = self._turn_done, None
            done.errback(reason)

    def _timed_out(self) -> None:
        if self._busy:
            # The silence is ours (a delivery or check is running), not the peer's.
            self._timer = self._clock.callLater(self._timeout, self._timed_out)
            return
        self._timer = None
        log.info("idle timeout for {peer}", peer=self.transport.getPeer(), event="timeout")
        if self._replies is not None:
            self._closing = True
            self.transport.loseConnection()
            return
        self.close(replies.S421_TIMEOUT)

    def no_delay(self) -> None:
        """
        TCP_NODELAY: SMTP is a dialogue of small writes, and a reply followed
        at once by a command (the end of a reversed turn, then the next RETR)
        would otherwise wait ~40 ms for the peer's delayed ACK (Nagle).
        """
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP (tests, UNIX sockets)

    def start_timer(self, clock: IReactorTime, timeout: float) -> None:
        self._clock, self._timeout = clock, timeout
        self._timer = clock.callLater(timeout, self._timed_out)

    def close(self, reply: Reply | None = None) -> None:
        if reply is not None:
            self.send_reply(reply)
        self._closing = True
        self._buffer = b""
        self.transport.loseConnection()

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._timer is not None:
            self._timer.reset(self._timeout)
        if self._replies is not None:
            self._replies.feed(data)
            self._hand_out_replies()
            return
        self._buffer += data
        if self._busy and len(self._buffer) > MAX_BUFFERED_WHILE_BUSY and not self._paused:
            # Backpressure: a peer pipelining this much behind a pending
            # request waits in the kernel's buffers, not in ours.
            self._paused = True
            self.transport.pauseProducing()
        self._process()

    def _resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    # -- the client role -----------------------------------------------------

    def become_client(self, rest: bytes = b"") -> None:
        self._replies = ReplyReader()
        self._replies.feed(rest)

    def send(self, data: bytes) -> None:
        """Send commands (the Channel interface)."""
        if not self._closing:
            self.transport.write(data)

    def start_tls(self, options) -> None:
        """
        Client role: start TLS right after the peer's 220 to STARTTLS.

        Anything the peer sent behind that 220 is plaintext that a man in
        the middle may have injected (the client-side twin of
        CVE-2011-0411): read as the first replies under TLS, it would put
        every later reply out of step, and a message could be taken as
        delivered that never was.  Such a session is broken off; the
        caller's transaction fails and its mail stays queued.
        """
        injected = self._replies.take_rest() if self._replies is not None else b""
        if injected:
            log.warn("{peer} sent {count} octets behind its 220 to STARTTLS; "
                     "dropping the session", peer=self.transport.getPeer(),
                     count=len(injected), event="tls-injection")
            self._closing = True
            self.transport.abortConnection()
            raise ProtocolError("data received behind the 220 to STARTTLS (injection)")
        self.transport.startTLS(options)

    def send_reply(self, reply: Reply) -> None:
        if not self._closing:
            self.transport.write(reply.render(enhanced=bool(reply.enhanced)))

    def reply(self) -> defer.Deferred:
        """The next reply from the peer (the Channel interface)."""
        d = defer.Deferred()
        if self._closing:
            d.errback(error.ConnectionLost("connection closed"))
            return d
        self._reply_waiters.append(d)
        self._hand_out_replies()
        return d

    def _hand_out_replies(self) -> None:
        while self._reply_waiters and self._replies is not None:
            try:
                reply = self._replies.next_reply()
            except ProtocolError as e:
                log.info("protocol error from {peer}: {error}",
                         peer=self.transport.getPeer(), error=str(e))
                self._closing = True
                self.transport.loseConnection()
                return
            if reply is None:
                return
            self._reply_waiters.popleft().callback(reply)

    def serve_turn(self, machine: ServerMachine) -> defer.Deferred:
        """
        Take the server role for one reversed turn: what the peer sent after
        its last reply is the first input.  Fires when the machine ends the
        turn, with the connection back in the client role.
        """
        rest = self._replies.take_rest() if self._replies else b""
        self._replies = None
        self.machine = machine
        self._buffer = rest
        self._turn_done = defer.Deferred()
        done = self._turn_done
        self._process()
        return done

    def _process(self) -> None:
        while self._buffer and not self._busy and not self._closing:
            if self._reader is not None:
                self._feed_data()
                continue
            end = self._buffer.find(b"\n")
            if self._discarding:
                if end < 0:
                    self._buffer = b""
                    return
                self._discarding = False
                self._buffer = self._buffer[end + 1:]
                continue
            limit = self.machine.max_line
            if end < 0:
                if len(self._buffer) > limit:
                    self._line_too_long()
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            if len(line) + 1 > limit:
                self._line_too_long(discard=False)
                continue
            self._command(line.removesuffix(b"\r"))

    def _line_too_long(self, discard: bool = True) -> None:
        self._discarding = discard
        if discard:
            self._buffer = b""
        self._log_outcome("<too long>", replies.S500_LINE_TOO_LONG)
        self.send_reply(replies.S500_LINE_TOO_LONG)

    def _command(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "surrogateescape")
        try:
            action = self.machine.handle(line)
        except Exception:
            log.failure("error handling {line!r}", line=line[:80])
            action = replies.S451_LOCAL_ERROR
        self._act(action, line)

    def _act(self, action: object, line: str = "") -> None:
        if isinstance(action, Reply):
            self._log_outcome(line, action)
            self.send_reply(action)
        elif isinstance(action, BeginData):
            self._reader = DataReader(action.max_size)
            self.send_reply(action.reply)
        elif isinstance(action, StartTLS):
            self.send_reply(action.reply)
            # CVE-2011-0411: what was pipelined behind STARTTLS is plaintext
            # an attacker may have injected; it must never run under TLS.
            self._buffer = b""
            self._start_tls()
        elif isinstance(action, Close):
            self.close(action.reply)
        elif isinstance(action, Reverse):
            self._reverse(action)
        elif isinstance(action, EndTurn):
            self._log_outcome(line, action.reply)
            self.send_reply(action.reply)
            # SPEC 4: the side that replies to the input ending the turn
            # drops whatever the peer pipelined behind it.
            self._buffer = b""
            self.become_client()
            done, self._turn_done = self._turn_done, None
            if done is not None:
                done.callback(None)
        else:
            self._perform(action, line)

    def _reverse(self, action: Reverse) -> None:
        """SPEC 4, SMTA side: after '250 ... follows', be the client."""
        self.send_reply(action.reply)
        self._buffer = b""
        self.become_client()
        self._busy = True
        d = defer.Deferred.fromCoroutine(action.turn(self))

        def turn_over(result: object) -> object:
            self._busy = False
            if self._closing:
                return result
            rest = self._replies.take_rest()
            self._replies = None
            self._buffer = rest + self._buffer
            self._process()
            return result

        d.addBoth(turn_over)
        d.addErrback(self._turn_failed)

    def _abandon(self, result: object) -> None:
        """
        The peer left while a request ran.  A reversal granted meanwhile
        still runs its turn, which fails at once on the closed channel: the
        turn's own cleanup (giving back a claimed outbox entry) must happen.
        """
        if isinstance(result, Reverse):
            d = defer.Deferred.fromCoroutine(result.turn(self))
            d.addErrback(self._turn_failed)

    def _turn_failed(self, failure: Failure) -> None:
        if failure.check(error.ConnectionDone, error.ConnectionLost):
            log.info("peer left during the reversed turn", event="turn-aborted")
        else:
            log.failure("reversed turn failed", failure)

    def _log_outcome(self, line: str, reply: Reply) -> None:
        verb = line.split(" ", 1)[0].upper()[:16]
        if reply.code >= 400:
            log.info(
                "{peer} {verb}: {reply}", peer=self.machine.session.peer, verb=verb,
                reply=str(reply), code=reply.code, event="rejected",
            )
        elif self.log_commands:
            log.info("{peer} {verb}: {code}", peer=self.machine.session.peer, verb=verb,
                     code=reply.code, event="command")

    def _perform(self, request: object, line: str) -> None:
        performer = self.performers.get(type(request))
        if performer is None:
            raise TypeError(f"no performer for {request!r}")
        self._busy = True
        d = defer.maybeDeferred(performer, self, request)

        def resolved(result: object) -> None:
            self._busy = False
            if self._closing:
                self._abandon(result)
                return
            self._resume_reading()
            try:
                action = self.machine.resolve(request, result)
            except Exception:
                log.failure("error resolving {request}", request=type(request).__name__)
                action = replies.S451_LOCAL_ERROR
            self._act(action, line)
            self._process()

        def failed(failure: Failure) -> None:
            log.failure("{request} failed", failure, request=type(request).__name__)
            self._busy = False
            self.machine.reset()
            if self._closing:
                return
            self._resume_reading()
            self._act(_FAILURE_REPLIES.get(type(request), replies.S451_LOCAL_ERROR), line)
            self._process()

        d.addCallbacks(resolved, failed)

    def _feed_data(self) -> None:
        data, self._buffer = self._buffer, b""
        done = self._reader.feed(data)
        if done is None:
            return
        self._reader = None
        self._buffer = done.rest
        self._act(self.machine.data_received(done.chunks, done.size, done.error), "DATA")

    def _start_tls(self) -> None:
        context = self.factory.tls_context
        self.transport.startTLS(context)
        self.machine.tls_started()
        log.info("TLS started with {peer}", peer=self.machine.session.peer, event="tls")


SMTPServerProtocol = SMTPConnection


class SMTPServerFactory(Factory):
    """
    Builds protocols for one service.  Everything a session needs comes
    in here, explicitly: the policy, the clock, the limits, and the
    I{performers} that carry out the machine's requests.
    """

    protocol = SMTPServerProtocol

    def __init__(
        self,
        policy: ServerPolicy,
        clock: IReactorTime,
        limits: ConnectionLimits,
        idle_timeout: float,
        performers: Mapping[type, Callable],
        tls_context=None,
        implicit_tls: bool = False,
        extensions: tuple = (),
        refuse_connection: Callable[[str], Reply | None] = lambda address: None,
        log_commands: bool = False,
    ) -> None:
        self.log_commands = log_commands
        self.policy = policy
        self.clock = clock
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.performers = dict(performers)
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.extensions = tuple(extensions)
        self.refuse_connection = refuse_connection

    @property
    def service(self) -> str:
        return self.policy.service

    def new_machine(self, session: Session) -> ServerMachine:
        return ServerMachine(self.policy, session, self.extensions)


class ClientConnection(SMTPConnection):
    """An outbound connection: starts in the client role, idle-timed."""

    def __init__(self, clock: IReactorTime, timeout: float, performers: Mapping = {},
                 log_commands: bool = False) -> None:
        super().__init__()
        self._client_clock, self._client_timeout = clock, timeout
        self.performers = performers
        self.log_commands = log_commands

    def connectionMade(self) -> None:
        self.become_client()
        self.no_delay()
        self.start_timer(self._client_clock, self._client_timeout)

    def quit(self) -> None:
        """End politely without waiting for the 221."""
        self.send(b"QUIT\r\n")
        self.close()


class Connector:
    """
    Opens outbound SMTP connections from the node's own address (SPEC 9:
    ``[delivery] bind_address``).  Tests substitute a function of the same
    shape: ``connect(address, port, performers) -> Deferred[ClientConnection]``.
    """

    def __init__(self, reactor, clock: IReactorTime, bind_address: str,
                 connect_timeout: float, idle_timeout: float, log_commands: bool = False) -> None:
        self._log_commands = log_commands
        self._reactor = reactor
        self._clock = clock
        self._bind = bind_address
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout

    def __call__(self, address: str, port: int, performers: Mapping = {}) -> defer.Deferred:
        from twisted.internet.endpoints import (
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            connectProtocol,
        )

        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        bind = (self._bind, 0) if self._bind else None
        endpoint = kind(self._reactor, address, port, timeout=self._connect_timeout,
                        bindAddress=bind)
        return connectProtocol(endpoint, ClientConnection(
            self._clock, self._idle_timeout, performers, self._log_commands,
        ))
