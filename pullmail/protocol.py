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

from typing import Callable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pullmail import replies
from pullmail.envelope import Session
from pullmail.esmtp.data import DataReader
from pullmail.esmtp.server import (
    MAX_COMMAND_LINE,
    BeginData,
    Close,
    ServerMachine,
    ServerPolicy,
    StartTLS,
)
from pullmail.replies import Reply

__all__ = ["SMTPServerFactory", "SMTPServerProtocol", "ConnectionLimits"]

log = Logger(namespace="pullmail.smtp")


class ConnectionLimits:
    """Counts open connections, in all and per peer address."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total, self.per_address = total, per_address
        self._open: dict[str, int] = {}
        self._count = 0

    def acquire(self, address: str) -> bool:
        if self._count >= self.total or self._open.get(address, 0) >= self.per_address:
            return False
        self._count += 1
        self._open[address] = self._open.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        self._count -= 1
        left = self._open[address] - 1
        if left:
            self._open[address] = left
        else:
            del self._open[address]


class SMTPServerProtocol(Protocol):
    factory: "SMTPServerFactory"

    def __init__(self) -> None:
        self._buffer = b""
        self._busy = False          # a request is running; input waits
        self._reader: DataReader | None = None
        self._discarding = False    # skipping the rest of an over-long line
        self._timer = None
        self._limited = False
        self.machine: ServerMachine | None = None
        self._closing = False

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self.transport.getPeer()
        address = getattr(peer, "host", "unknown")
        self.machine = factory.new_machine(Session(address, factory.service, tls=factory.implicit_tls))
        log.info(
            "connection from {peer} on {service}", peer=address, service=factory.service,
            event="connection",
        )
        refusal = factory.refuse_connection(address)
        if refusal is None and not factory.limits.acquire(address):
            refusal = replies.S421_TOO_MANY_CONNECTIONS
        else:
            self._limited = refusal is None
        if refusal is not None:
            log.info("refused connection from {peer}: {reply}", peer=address,
                     reply=str(refusal), event="rejected", code=refusal.code)
            self._closing = True
            self.transport.write(refusal.render())
            self.transport.loseConnection()
            return
        self._timer = factory.clock.callLater(factory.idle_timeout, self._timed_out)
        self.send(self.machine.greeting())

    def connectionLost(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._limited:
            self._limited = False
            self.factory.limits.release(self.machine.session.peer)
        self._reader = None

    def _timed_out(self) -> None:
        self._timer = None
        log.info("idle timeout for {peer}", peer=self.machine.session.peer, event="timeout")
        self.close(replies.S421_TIMEOUT)

    def send(self, reply: Reply) -> None:
        if not self._closing:
            self.transport.write(reply.render(enhanced=bool(reply.enhanced)))

    def close(self, reply: Reply | None = None) -> None:
        if reply is not None:
            self.send(reply)
        self._closing = True
        self._buffer = b""
        self.transport.loseConnection()

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._timer is not None:
            self._timer.reset(self.factory.idle_timeout)
        self._buffer += data
        self._process()

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
            if end < 0:
                if len(self._buffer) > MAX_COMMAND_LINE:
                    self._line_too_long()
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            if len(line) + 1 > MAX_COMMAND_LINE:
                self._line_too_long(discard=False)
                continue
            self._command(line.removesuffix(b"\r"))

    def _line_too_long(self, discard: bool = True) -> None:
        self._discarding = discard
        if discard:
            self._buffer = b""
        self._log_outcome("<too long>", replies.S500_LINE_TOO_LONG)
        self.send(replies.S500_LINE_TOO_LONG)

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
            self.send(action)
        elif isinstance(action, BeginData):
            self._reader = DataReader(action.max_size)
            self.send(action.reply)
        elif isinstance(action, StartTLS):
            self.send(action.reply)
            # CVE-2011-0411: what was pipelined behind STARTTLS is plaintext
            # an attacker may have injected; it must never run under TLS.
            self._buffer = b""
            self._start_tls()
        elif isinstance(action, Close):
            self.close(action.reply)
        else:
            self._perform(action, line)

    def _log_outcome(self, line: str, reply: Reply) -> None:
        verb = line.split(" ", 1)[0].upper()[:16]
        if reply.code >= 400:
            log.info(
                "{peer} {verb}: {reply}", peer=self.machine.session.peer, verb=verb,
                reply=str(reply), code=reply.code, event="rejected",
            )
        else:
            log.debug("{peer} {verb}: {code}", peer=self.machine.session.peer, verb=verb,
                      code=reply.code, event="command")

    def _perform(self, request: object, line: str) -> None:
        performer = self.factory.performers.get(type(request))
        if performer is None:
            raise TypeError(f"no performer for {request!r}")
        self._busy = True
        self.transport.pauseProducing()
        d = defer.maybeDeferred(performer, self, request)

        def resolved(result: object) -> None:
            self._busy = False
            if self._closing:
                return
            self.transport.resumeProducing()
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
            self.transport.resumeProducing()
            self._act(replies.S451_LOCAL_ERROR, line)
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
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.performers = dict(performers)
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.extensions = extensions
        self.refuse_connection = refuse_connection

    @property
    def service(self) -> str:
        return self.policy.service

    def new_machine(self, session: Session) -> ServerMachine:
        return ServerMachine(self.policy, session, self.extensions)
