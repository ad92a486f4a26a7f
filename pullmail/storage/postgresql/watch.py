# -*- test-case-name: tests.test_postgresql -*-
"""
Wake-ups for the nodes of a cluster (SPEC 11.3): LISTEN/NOTIFY when work
becomes due that any node may take, and a periodic poll besides, because
a node that was disconnected misses notifications.  Each poll also renews
the leases this node holds.

The LISTEN connection blocks, so it lives in a thread of its own; a
notification only asks the reactor thread for a poll.
"""

from __future__ import annotations

import threading
from typing import Callable

import psycopg
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pullmail.storage.postgresql.database import Database, StoreUnavailable
from pullmail.storage.postgresql.outbox import WAKE_CHANNEL

__all__ = ["Watch"]

log = Logger(namespace="pullmail.storage.postgresql")

# How long the LISTEN thread waits for a notification before it looks
# whether the node is stopping; and between attempts to reconnect.
LISTEN_TICK = 1.0


class Watch:
    """
    Polls every C{interval} seconds (and at each NOTIFY): for each
    registered store, its blocking C{poll} in a database thread, then its
    C{found} callback with the result in the reactor thread.
    """

    def __init__(self, database: Database, reactor, interval: float) -> None:
        self.database = database
        self.reactor = reactor
        self.interval = interval
        self._polls: list[tuple[Callable, Callable]] = []
        self._loop = LoopingCall(self.poll)
        self._loop.clock = reactor
        self._polling = self._again = False
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None

    def register(self, poll: Callable, found: Callable) -> None:
        self._polls.append((poll, found))

    def start(self) -> None:
        self._loop.start(self.interval, now=False)
        self._listener = threading.Thread(target=self._listen, name="pullmail-listen",
                                          daemon=True)
        self._listener.start()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._stopping.set()
        if self._listener is not None:
            self._listener.join(LISTEN_TICK * 3)

    def poll(self) -> None:
        """One poll of every store; one at a time (a NOTIFY meanwhile polls again)."""
        if self._polling:
            self._again = True
            return
        self._polling = True
        self._poll_next(list(self._polls))

    def _poll_next(self, remaining: list) -> None:
        if not remaining:
            self._polling = False
            if self._again:
                self._again = False
                self.poll()
            return
        poll, found = remaining.pop(0)
        d = self.database.run(poll)
        d.addCallback(found)
        d.addErrback(self._failed)
        d.addBoth(lambda _: self._poll_next(remaining))

    @staticmethod
    def _failed(failure) -> None:
        if failure.check(StoreUnavailable):
            log.warn("poll: {error}", error=str(failure.value))
        else:
            log.failure("poll", failure)

    # -- LISTEN, in its own thread ------------------------------------------------------

    def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.database.connect(autocommit=True) as connection:
                    connection.execute(f"LISTEN {WAKE_CHANNEL}")
                    # What came due while we were not listening.
                    self.reactor.callFromThread(self.poll)
                    while not self._stopping.is_set():
                        woken = any(True for _ in connection.notifies(timeout=LISTEN_TICK))
                        if woken:
                            self.reactor.callFromThread(self.poll)
            except (StoreUnavailable, psycopg.Error):
                self._stopping.wait(LISTEN_TICK)
