"""
Twisted glue for the ESMTP server machine: bytes in, replies out.

The protocol feeds the bytes to a sans-IO L{Connection} (the framing),
hands each command line to the L{ServerMachine}, writes the replies, and
carries out the machine's requests.  While a request runs it asks for no
more events, so pipelined commands are answered in order, one reply each.
It owns the things a pure core cannot: the clocks (L{Deadlines}, on an
injected clock), the connection limits, the TLS handshake, and acting on
the session's L{Conduct} (tarpit, 421) and on improper pipelining.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping

from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pullmail import maillog
from pullmail.logsafe import printable
from pullmail.smtp.writes import write_now
from pullmail.smtp import replies
from pullmail.smtp.chunking import ReadChunk
from pullmail.smtp.client import ProtocolError, ReplyReader
from pullmail.smtp.conduct import ENDS_GROUP, Conduct, SessionLimits
from pullmail.smtp.connection import (
    NEED_DATA,
    BareLineEnding,
    CommandLine,
    Connection,
    LineTooLong,
    MessageEnd,
    Octets,
)
from pullmail.smtp.deadlines import Deadlines
from pullmail.smtp.drain import Drain
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
    State,
)

__all__ = ["SMTPServerFactory", "SMTPConnection", "ConnectionLimits", "ClientConnection",
           "Connector"]

log = Logger(namespace="pullmail.smtp.protocol")


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


@implementer(IHandshakeListener)
class ReplyChannel(Protocol):
    """
    The client role of a connection: a L{ReplyReader} reads the peer's
    replies, and the connection is the L{Channel} of a client dialogue; and
    the switches into it and out of it that General Delivery's reversed
    turns make (SPEC 4).  The server role is L{SMTPConnection}'s.
    """

    def __init__(self) -> None:
        self._replies: ReplyReader | None = None     # set in the client role
        self._reply_waiters: deque[defer.Deferred] = deque()
        self._closing = False
        self._busy = False          # a request (or a reversed turn) is running
        self.deadlines: Deadlines | None = None
        self.drain: Drain | None = None   # a graceful stop's (L{pullmail.smtp.drain})
        # Replies to a pipelined group (RFC 2920), sent in one write once the
        # group is read, or before anything else goes to the transport.
        self._outgoing: list[bytes] | None = None

    def become_client(self, rest: bytes = b"") -> None:
        self._replies = ReplyReader()
        self._replies.feed(rest)

    def send_reply(self, reply: Reply) -> None:
        if self._closing:
            return
        if self._outgoing is not None:
            self._outgoing.append(reply.wire)
        else:
            write_now(self.transport, reply.wire)

    def _flush(self) -> None:
        """Send the replies held back, and hold back no more."""
        held, self._outgoing = self._outgoing, None
        if held and not self._closing:
            write_now(self.transport, b"".join(held))

    def send(self, data: bytes) -> None:
        """Send commands (the Channel interface)."""
        self._flush()
        if not self._closing:
            write_now(self.transport, data)

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
        self._flush()
        injected = self._replies.take_rest() if self._replies is not None else b""
        if injected:
            maillog.TLS_INJECTION(log, peer=self.transport.getPeer(), count=len(injected))
            self._closing = True
            self.transport.abortConnection()
            raise ProtocolError("data received behind the 220 to STARTTLS (injection)")
        self.deadlines.start_handshake(timed=False)
        self.transport.startTLS(options)

    def usable(self) -> bool:
        """Still open for another command: a connection kept idle may have been closed."""
        return not self._closing and self._replies is not None

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
                         peer=self.transport.getPeer(), error=printable(e))
                self._closing = True
                self.transport.loseConnection()
                return
            if reply is None:
                return
            self._reply_waiters.popleft().callback(reply)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done."""
        if self.deadlines is not None:
            self.deadlines.handshake_done()

    def _fail_waiters(self, reason: Failure) -> None:
        waiters, self._reply_waiters = self._reply_waiters, deque()
        for waiter in waiters:
            waiter.errback(reason)

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

    def start_timer(self, clock: IReactorTime, timeout: float,
                    limits: SessionLimits = SessionLimits()) -> None:
        self.deadlines = Deadlines(clock, timeout, limits, self._timed_out, self._abort,
                                   lambda: self._busy)

    def _abort(self) -> None:
        maillog.TLS_TIMEOUT(log, peer=self.transport.getPeer())
        self._closing = True
        self.transport.abortConnection()

    def _hang_up(self) -> None:
        """
        Close; abort if a TLS handshake is unfinished: nothing gets through
        it, not even a 421, and waiting to flush would hold the slot for ever.
        """
        self._flush()
        self._closing = True
        if self.deadlines is not None and self.deadlines.handshaking:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def shut_down(self) -> None:
        """
        The node is stopping (L{pullmail.smtp.drain}): no new command.  A
        request in flight ends first (its reply, then this); in our own
        client role there is nothing to answer.  RFC 5321 3.8: 421.
        """
        if self._closing or self._busy:
            return
        if self._replies is not None:
            self._hang_up()
        else:
            self.close(replies.S421_SHUTTING_DOWN)

    # -- switching roles (SPEC 4) -------------------------------------------

    def serve_turn(self, machine: ServerMachine) -> defer.Deferred:
        """
        Take the server role for one reversed turn: what the peer sent after
        its last reply is the first input.  Fires when the machine ends the
        turn, with the connection back in the client role.
        """
        self._serve(machine)
        self._turn_done = defer.Deferred()
        done = self._turn_done
        self._process()
        return done

    def _serve(self, machine: ServerMachine) -> None:
        """Back to the server role; what followed the last reply is input."""
        rest = self._replies.take_rest() if self._replies else b""
        self._replies = None
        self.machine = machine
        self._input.receive_data(rest)

    def _reverse(self, action: Reverse) -> None:
        """SPEC 4, SMTA side: after '250 ... follows', be the client."""
        self.send_reply(action.reply)
        self._input.discard()
        self.become_client()
        self._busy = True
        d = defer.Deferred.fromCoroutine(action.turn(self))

        def turn_over(result: object) -> object:
            self._busy = False
            if self._closing:
                return result
            self._serve(self.machine)
            self._process()
            return result

        d.addBoth(turn_over)
        d.addErrback(self._turn_failed)
        if self.drain is not None:    # a stop waits for the turn's outcome
            self.drain.track(self, d)

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
            maillog.TURN_ABORTED(log)
        else:
            log.failure("reversed turn failed", failure)

    def _timed_out(self, reply: Reply, event: maillog.Event) -> None:
        event(log, what=reply.text.split(",")[0].lower(), peer=self.transport.getPeer())
        if self._replies is not None:
            self._hang_up()
        else:
            self.close(reply)


class _ChunkReading:
    """
    The server role's part in BDAT (RFC 3030 2): a chunk is exactly the
    next C{size} octets, whatever they hold, read under the data deadline;
    then the machine has it.
    """

    _input: Connection
    _chunk: list[bytes] | None = None   # the chunk being read (None: dropped)

    def _read_chunk(self, action: ReadChunk) -> None:
        self._chunk = [] if action.keep else None
        self._input.read_octets(action.size)
        self.deadlines.start_data(lambda: self._input.data_octets)

    def _octets(self, event: Octets) -> None:
        if self._chunk is not None:
            self._chunk.append(event.data)
        if event.last:
            self.deadlines.end_data()
            data, self._chunk = b"".join(self._chunk or ()), None
            self._act(self.machine.chunk_received(data), "BDAT")


class SMTPConnection(_ChunkReading, ReplyChannel):
    """
    One SMTP connection, in the server role (a L{Connection} frames the
    input, a L{ServerMachine} reads the commands) or the client role (see
    L{ReplyChannel}).  General Delivery swaps the two on one connection
    (SPEC 4).
    """

    factory: "SMTPServerFactory"

    def __init__(self) -> None:
        super().__init__()
        self._turn_done: defer.Deferred | None = None
        self._input = Connection()
        self._paused = False        # the transport is paused (backpressure)
        self._counted = False        # holds a place in the connection limits
        self._served = False         # a server-role connection, not refused
        self.machine: ServerMachine | None = None
        self._greeted = True         # False while the pre-greet wait runs
        self.performers: Mapping[type, Callable] = {}
        self.log_commands = False
        self.count_replies = True     # emit REPLY per reply (the metrics count them)
        self.limits = SessionLimits()
        self._conduct = Conduct(self.limits)

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self.transport.getPeer()
        address = getattr(peer, "host", "unknown")
        self.machine = factory.new_machine(
            Session(address, factory.service, tls=factory.implicit_tls)
        )
        self.performers = factory.performers
        self.drain = factory.drain
        self.log_commands = factory.log_commands
        self.count_replies = factory.count_replies
        self.limits = factory.session_limits
        self._conduct = Conduct(self.limits)
        refusal = factory.refuse_connection(address)
        if refusal is None:
            self._counted = factory.limits.acquire(address)
            if not self._counted:
                refusal = replies.S421_TOO_MANY_CONNECTIONS
        if refusal is not None:
            maillog.CONNECTION_REFUSED(log, peer=address, reply=str(refusal), code=refusal.code)
            self._closing = True
            self.transport.write(refusal.wire)
            self.transport.loseConnection()
            return
        self._served = True
        self.no_delay()
        self.start_timer(factory.clock, factory.idle_timeout, self.limits)
        if factory.implicit_tls:
            self.deadlines.start_handshake()
        greeting = self.machine.greeting()
        if self.limits.pregreet_wait > 0:
            # postscreen's pre-greet test: a multi-line greeting, and a
            # client that speaks before its last line is no MTA (RFC 5321
            # 4.3.1, 4.5.3.2.1: the client waits for the greeting).
            self._greeted = False
            self.transport.write(f"220-{greeting.text}\r\n".encode("utf-8"))
            self.deadlines.later("pregreet", self.limits.pregreet_wait,
                                 lambda: self._greet(greeting))
        else:
            self._greet(greeting)
        if self.drain is not None:
            self.drain.opened(self)

    def _greet(self, greeting: Reply) -> None:
        self._greeted = True
        self.send_reply(greeting)

    def connectionLost(self, reason: Failure) -> None:
        if self.deadlines is not None:
            self.deadlines.cancel_all()
        if self._counted:
            self._counted = False
            self.factory.limits.release(self.machine.session.peer)
        if self._served:
            # SPEC 9: one event per connection, as it ends (then it can say
            # how many messages it handed over).
            maillog.CONNECTION(log, peer=self.machine.session.peer, service=self.factory.service,
                               messages=self.machine.messages)
        self._closing = True
        self._fail_waiters(reason)
        if self._turn_done is not None:
            done, self._turn_done = self._turn_done, None
            done.errback(reason)
        if self.drain is not None:
            self.drain.closed(self)

    def close(self, reply: Reply | None = None) -> None:
        if reply is not None:
            self.send_reply(reply)
        self._input.discard()
        self._hang_up()

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self.deadlines is not None:
            self.deadlines.touch()
        if self._replies is not None:
            self._replies.feed(data)
            self._hand_out_replies()
            return
        if not self._greeted:
            maillog.PREGREET(log, peer=self.machine.session.peer, code=554)
            self.close(replies.S554_PREGREET)
            return
        self._input.receive_data(data)
        if self._busy and self._input.buffered > MAX_BUFFERED_WHILE_BUSY and not self._paused:
            # Backpressure: a peer pipelining this much behind a pending
            # request waits in the kernel's buffers, not in ours.
            self._paused = True
            self.transport.pauseProducing()
        self._process()

    def _resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    # -- the server role: events --------------------------------------------

    def _process(self) -> None:
        if self.drain is not None and self.drain.stopping and self._replies is None:
            self.shut_down()
        self._outgoing = self._outgoing or []
        try:
            self._events()
        finally:
            self._flush()

    def _events(self) -> None:
        while not self._busy and not self._closing and self._replies is None:
            event = self._input.next_event(self.machine.max_line)
            if event is NEED_DATA:
                break
            if isinstance(event, CommandLine):
                self._command(event.line)
            elif isinstance(event, MessageEnd):
                self.deadlines.end_data()
                self._act(self.machine.data_received(event.chunks, event.size, event.error),
                          "DATA")
            elif isinstance(event, BareLineEnding):
                self._answer("<bare line ending>", replies.S500_BARE_LINE_ENDING)
            elif isinstance(event, LineTooLong):
                self._answer("<too long>", replies.S500_LINE_TOO_LONG)
            elif isinstance(event, Octets):
                self._octets(event)
            else:
                raise TypeError(f"unexpected event {event!r}")
        if self.deadlines is not None and not self._closing:
            self.deadlines.watch_line(self._input.partial_line)

    def _command(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "surrogateescape")
        # A SASL response is a credential: it is never logged, nor a verb.
        sasl = self.machine.state is State.AUTH
        try:
            action = self.machine.handle(line)
        except Exception:
            log.failure("error handling {line}", line="<sasl>" if sasl else printable(line[:80]))
            action = replies.S451_LOCAL_ERROR
        self._act(action, "AUTH" if sasl else line)
        verb = "" if sasl else line.split(" ", 1)[0].upper()
        if (verb in ENDS_GROUP and self._input.buffered and not self._closing
                and self._replies is None and self.limits.reject_improper_pipelining):
            # RFC 2920 3.1: EHLO and HELO end a group; a client that does
            # not wait for their reply is a bot, not an MTA.
            self._improper_pipelining(verb)

    def _improper_pipelining(self, verb: str) -> None:
        maillog.IMPROPER_PIPELINING(log, peer=self.machine.session.peer, verb=verb)
        self._log_outcome(verb, replies.S554_IMPROPER_PIPELINING)
        self.close(replies.S554_IMPROPER_PIPELINING)

    def _answer(self, line: str, reply: Reply, logged: bool = False) -> None:
        """
        Send a reply to a command, keeping the session's score: past half of
        C{max_errors} each error waits longer; at the limit, or past
        C{max_junk_commands}, the connection closes with 421.  C{logged}:
        its performer logged it already (L{SMTPServerFactory}).
        """
        if not (logged and reply.code >= 400):
            self._log_outcome(line, reply)
        judgement = self._conduct.judge(line.split(" ", 1)[0].upper(), reply)
        if judgement.delay and not judgement.close:
            self._busy = True

            def later() -> None:
                self._busy = False
                self.send_reply(reply)
                self._resume_reading()
                self._process()

            self.deadlines.later("tarpit", judgement.delay, later)
            return
        self.send_reply(reply)
        if judgement.close is not None:
            maillog.BUDGET_SPENT(
                log, peer=self.machine.session.peer, reply=str(judgement.close),
                errors=self._conduct.errors, junk=self._conduct.junk,
            )
            self.close(judgement.close)

    def _act(self, action: object, line: str = "", logged: bool = False) -> None:
        if isinstance(action, Reply):
            self._answer(line, action, logged)
        elif isinstance(action, BeginData):
            self._begin_data(action)
        elif isinstance(action, ReadChunk):
            self._read_chunk(action)
        elif isinstance(action, StartTLS):
            self.send_reply(action.reply)
            # CVE-2011-0411: what was pipelined behind STARTTLS is plaintext
            # an attacker may have injected; it must never run under TLS.
            self._input.discard()
            self._start_tls()
        elif isinstance(action, Close):
            if action.reply.code >= 400:
                self._log_outcome(line, action.reply)
            self.close(action.reply)
        elif isinstance(action, Reverse):
            self._reverse(action)
        elif isinstance(action, EndTurn):
            self._log_outcome(line, action.reply)
            self.send_reply(action.reply)
            # SPEC 4: the side that replies to the input ending the turn
            # drops whatever the peer pipelined behind it.
            self._input.discard()
            self.become_client()
            done, self._turn_done = self._turn_done, None
            if done is not None:
                done.callback(None)
        else:
            self._perform(action, line)

    def _begin_data(self, action: BeginData) -> None:
        if self._input.buffered and self.limits.reject_improper_pipelining:
            # RFC 2920 3.1: DATA ends a group; message text sent before
            # the 354 is a bot's (or a smuggler's).
            self.machine.reset()
            self._improper_pipelining("DATA")
            return
        self.send_reply(action.reply)
        self._input.read_message(action.max_size)
        self.deadlines.start_data(lambda: self._input.data_octets)

    def _log_outcome(self, line: str, reply: Reply) -> None:
        if reply.code < 400 and not (self.log_commands or self.count_replies):
            return
        verb = printable(line.split(" ", 1)[0].upper()[:16])
        if reply.code >= 400:
            maillog.COMMAND_REJECTED(
                log, peer=self.machine.session.peer, verb=verb, reply=printable(reply),
                code=reply.code,
            )
        elif self.log_commands:
            maillog.COMMAND(log, peer=self.machine.session.peer, verb=verb, code=reply.code)
        else:   # for the metrics (pullmail.node.metrics), below the log's level
            maillog.REPLY(log, verb=verb, code=reply.code)

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
            logged = action is result and getattr(performer, "logs_refusals", False)
            self._act(action, line, logged)
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
        if self.drain is not None:    # a stop waits for the reply
            self.drain.track(self, d)

    def _start_tls(self) -> None:
        self._flush()
        context = self.factory.tls_context
        self.transport.startTLS(context)
        self.deadlines.start_handshake()
        self.machine.tls_started()
        maillog.TLS_STARTED(log, peer=self.machine.session.peer)


class SMTPServerFactory(Factory):
    """
    Builds protocols for one service.  Everything a session needs comes
    in here, explicitly: the policy, the clock, the limits, and the
    I{performers} that carry out the machine's requests.  A performer with
    a true C{logs_refusals} logs the refusals it answers with in its own
    event (with the command's fields); the connection does not log them
    again as command-rejected, so one refused command is one log line.
    """

    protocol = SMTPConnection

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
        session_limits: SessionLimits = SessionLimits(),
        count_replies: bool = True,
        drain: Drain | None = None,
    ) -> None:
        self.session_limits = session_limits
        self.drain = drain
        self.log_commands = log_commands
        # The REPLY event of every reply is for the metrics alone (it is
        # below the log's level): a node without them is spared its cost.
        self.count_replies = count_replies
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

    def __init__(self, clock: IReactorTime, timeout: float,
                 performers: Mapping[type, Callable] | None = None,
                 log_commands: bool = False, drain: Drain | None = None) -> None:
        super().__init__()
        self._client_clock, self._client_timeout = clock, timeout
        self.performers = dict(performers or {})
        self.log_commands = log_commands
        self.drain = drain    # tracks the requests of reversed turns (retrieved mail)

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
                 connect_timeout: float, idle_timeout: float, log_commands: bool = False,
                 drain: Drain | None = None) -> None:
        self._log_commands = log_commands
        self._drain = drain
        self._reactor = reactor
        self._clock = clock
        self._bind = bind_address
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout

    def __call__(self, address: str, port: int,
                 performers: Mapping[type, Callable] | None = None) -> defer.Deferred:
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
            self._clock, self._idle_timeout, performers, self._log_commands, self._drain,
        ))
