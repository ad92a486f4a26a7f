# -*- test-case-name: tests.test_drain -*-
"""
A graceful stop (SIGTERM: twistd's stopService): what the node's
connections have in hand finishes before its stores close.

Stopped all at once, the node would close the fsync helper while a
message past its final dot is being written: the client hears 451 (or
nothing) for a message that may be on disk, and sends it again.  So the
stop goes in order:

  1. the listeners close (the node's L{NodeService}): no new connection;
  2. every SMTP connection stops taking commands: an idle one (or one in
     the middle of a message's data) hears ``421 4.3.2`` and is closed
     now (RFC 5321 3.8: the client tries again later); one with a request
     in flight (a message being stored, a GDEL being recorded, retrieved
     mail being delivered) gets that request's reply first, then the 421;
  3. once no request is in flight and those connections are closed, the
     rest of the node stops (stores, helper, threads).

Waiting is bounded: after L{GRACE} seconds what is left is cut off as
before (a client that heard no 250 sends again).  Once no request is in
flight, closing connections get L{LINGER} more to flush their last words:
a TLS peer that never answers our close_notify is not waited for.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pullmail import maillog

__all__ = ["Drain", "GRACE", "LINGER"]

log = Logger(namespace="pullmail.smtp.drain")

# How long a stop waits for requests in flight: a durable write takes
# milliseconds, a slow disk or an LMTP store a few seconds; systemd's own
# stop timeout (90 s) is far beyond.
GRACE = 5.0
# How long closing connections get, once nothing is in flight, to send
# their last reply and close.
LINGER = 1.0


class Drain:
    """
    The requests in flight on the node's connections and the connections
    that must close first, for L{stop}.  Connections report with
    L{opened}, L{closed} and L{track}; a stopping one ends itself with
    C{shut_down()}.
    """

    def __init__(self, clock: IReactorTime, grace: float = GRACE,
                 linger: float = LINGER) -> None:
        self.clock = clock
        self.grace = grace
        self.linger = linger
        self.stopping = False
        self._requests: set[Deferred] = set()
        self._connections: set = set()
        self._done: Deferred | None = None
        self._timer: IDelayedCall | None = None
        self._started = 0.0

    def opened(self, connection) -> None:
        """A connection to close before the node stops (stopping: closed at once)."""
        self._connections.add(connection)
        if self.stopping:
            connection.shut_down()

    def closed(self, connection) -> None:
        self._connections.discard(connection)
        self._check()

    def track(self, connection, request: Deferred) -> None:
        """
        C{request} runs on C{connection}; the stop waits for it to end (and
        its reply to be written), then for the connection to close: ended
        while stopping, the connection ends itself (in our own client role
        too, e.g. a retrieval whose turn just ended).
        """
        self._requests.add(request)
        self._connections.add(connection)

        def ended(result: object) -> object:
            self._requests.discard(request)
            if self.stopping:
                connection.shut_down()
            self._check()
            return result

        request.addBoth(ended)

    def stop(self) -> Deferred:
        """
        Stop taking commands; fires (never fails) once nothing is in flight
        and every connection is closed, or when the waiting is bounded out.
        """
        if self._done is not None:
            return self._done
        self.stopping = True
        self._started = self.clock.seconds()
        self._done = Deferred()
        maillog.STOP_DRAINING(log, requests=len(self._requests),
                              connections=len(self._connections), grace=self.grace)
        for connection in list(self._connections):
            connection.shut_down()
        self._timer = self.clock.callLater(self.grace, self._finish)
        self._check()
        return self._done

    def _check(self) -> None:
        if self._done is None or self._done.called or self._requests:
            return
        if not self._connections:
            self._finish()
            return
        if self._timer.getTime() - self.clock.seconds() > self.linger:
            self._timer.reset(self.linger)

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waited = round(self.clock.seconds() - self._started, 3)
        if self._requests:
            maillog.STOP_CUT_OFF(log, requests=len(self._requests), waited=waited)
        else:
            maillog.STOP_DRAINED(log, connections=len(self._connections), waited=waited)
        self._done.callback(None)
