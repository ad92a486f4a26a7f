"""
A connection's clocks, on an injected L{IReactorTime} (RFC 5321 4.5.3.2).

  - idle: silence from the peer, reset by every octet (``idle_timeout``);
  - command: from the first octet of a command line to its CRLF, never
    reset (``command_timeout``), so a slowloris cannot feed it;
  - data: the message after 354 within ``data_timeout`` plus a second per
    ``min_data_rate`` octets (L{data_allowance});
  - handshake: a TLS handshake that never completes is aborted
    (``tls_handshake_timeout``): nothing, not even a 421, gets through it;
  - and one-off waits the glue asks for (pre-greet, the error tarpit).

When a deadline passes while a request of ours runs, the silence is ours,
not the peer's: it starts again.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

from pullmail import maillog
from pullmail.smtp import replies
from pullmail.smtp.conduct import SessionLimits, data_allowance
from pullmail.smtp.replies import Reply

__all__ = ["Timers", "Deadlines"]


class Timers:
    """Named one-shot timers on an injected clock."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls: dict[str, object] = {}

    def start(self, name: str, delay: float, f: Callable[[], None]) -> None:
        self.cancel(name)
        if delay > 0:
            self._calls[name] = self.clock.callLater(delay, self._fire, name, f)

    def _fire(self, name: str, f: Callable[[], None]) -> None:
        del self._calls[name]
        f()

    def running(self, name: str) -> bool:
        return name in self._calls

    def reset(self, name: str, delay: float) -> None:
        call = self._calls.get(name)
        if call is not None:
            call.reset(delay)

    def cancel(self, name: str) -> None:
        call = self._calls.pop(name, None)
        if call is not None:
            call.cancel()

    def cancel_all(self) -> None:
        for name in list(self._calls):
            self.cancel(name)


class Deadlines:
    """
    The deadlines of one connection.  C{expired(reply, event)} is called
    when the peer ran out of time (the glue closes with C{reply}); C{abort()}
    when a handshake did; C{busy()} says whether a request of ours runs.
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float, limits: SessionLimits,
                 expired: Callable[[Reply, str], None], abort: Callable[[], None],
                 busy: Callable[[], bool]) -> None:
        self.timers = Timers(clock)
        self._idle, self._limits = idle_timeout, limits
        self._expired, self._abort, self._busy = expired, abort, busy
        self._data_started = 0.0
        self._octets: Callable[[], int] = lambda: 0
        self.handshaking = False
        self.timers.start("idle", idle_timeout, self._idle_passed)

    def _passed(self, name: str, delay: float, reply: Reply, event: maillog.Event) -> None:
        if self._busy():
            self.timers.start(name, delay, lambda: self._passed(name, delay, reply, event))
        else:
            self._expired(reply, event)

    def _idle_passed(self) -> None:
        self._passed("idle", self._idle, replies.S421_TIMEOUT, maillog.IDLE_TIMEOUT)

    def touch(self) -> None:
        """The peer sent something: the idle timer starts again."""
        self.timers.reset("idle", self._idle)

    def watch_line(self, partial: bool) -> None:
        """Run the command deadline while a command line is unfinished."""
        if not partial:
            self.timers.cancel("command")
        elif not self.timers.running("command"):
            timeout = self._limits.command_timeout
            self.timers.start("command", timeout, lambda: self._passed(
                "command", timeout, replies.S421_COMMAND_TIMEOUT, maillog.COMMAND_TIMEOUT))

    def start_data(self, octets: Callable[[], int]) -> None:
        """After 354: C{octets()} tells how much of the message has come."""
        self._data_started, self._octets = self.timers.clock.seconds(), octets
        self._check_data()

    def _check_data(self) -> None:
        allowed = data_allowance(self._limits, self._octets())
        left = self._data_started + allowed - self.timers.clock.seconds()
        if left > 0:
            self.timers.start("data", left, self._check_data)
        else:
            self._expired(replies.S421_DATA_TIMEOUT, maillog.DATA_TIMEOUT)

    def end_data(self) -> None:
        self.timers.cancel("data")

    def start_handshake(self, timed: bool = True) -> None:
        self.handshaking = True
        if timed:
            self.timers.start("handshake", self._limits.tls_handshake_timeout, self._abort)

    def handshake_done(self) -> None:
        self.handshaking = False
        self.timers.cancel("handshake")

    def later(self, name: str, delay: float, f: Callable[[], None]) -> None:
        """Call C{f} after C{delay} seconds, unless the connection goes first."""
        self.timers.start(name, delay, f)

    def cancel_all(self) -> None:
        self.timers.cancel_all()
