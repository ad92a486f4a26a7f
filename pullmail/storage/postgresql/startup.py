# -*- test-case-name: tests.test_postgresql_startup -*-
"""
A node of a cluster starts whether or not its database answers (SPEC
11.3): it listens at once, and until the database has answered, what needs
the store (a submission for a remote domain, a GDEL, a RETR) is answered
``451 4.3.0`` at once (L{Database.ready}), while mail for local mailboxes
is delivered as ever.  The schema is checked as soon as the database
answers, and a schema this version does not know still stops the node
(SPEC 11.3); then the stores are loaded and the watch started, in order,
each step once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import psycopg
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pullmail import maillog
from pullmail.storage.postgresql import schema
from pullmail.storage.postgresql.database import Database, StoreUnavailable

__all__ = ["StoreStartup", "RETRY_CONNECT"]

log = Logger(namespace="pullmail.storage.postgresql")

# Seconds between attempts to reach the database at start-up.
RETRY_CONNECT = 2.0


class StoreStartup:
    """
    Reaches the database, checks its schema, then runs C{steps} (the
    blocking loads of the node's stores, the watch) in the reactor thread.
    C{refuse} is called, once, on a schema this version does not know.
    """

    def __init__(self, database: Database, clock: IReactorTime, steps: Sequence[Callable],
                 refuse: Callable[[], object], retry: float = RETRY_CONNECT) -> None:
        self.database = database
        self.clock = clock
        self.steps = list(steps)
        self.refuse = refuse
        self.retry = retry
        self._started_at = 0.0
        self._later = None
        self._stopped = False
        self._told = False   # the outage logged once, not at every attempt

    def start(self) -> None:
        """
        The first attempt blocks the start, as the loads always did: a node
        whose database answers greets only once its stores are loaded.
        Later ones run in the database's threads.
        """
        self.database.ready = False
        self._started_at = self.clock.seconds()
        self._attempt(blocking=True)

    def stop(self) -> None:
        self._stopped = True
        if self._later is not None and self._later.active():
            self._later.cancel()

    def _attempt(self, blocking: bool = False) -> None:
        self._later = None
        d = defer.maybeDeferred(self._check) if blocking else self.database.run(self._check)
        d.addCallbacks(self._connected, self._failed)

    def _check(self) -> None:
        """Blocking, in a database thread: reach it, on a connection of its own."""
        try:
            with self.database.connect() as connection, connection.cursor() as cursor:
                schema.check(cursor)
        except psycopg.OperationalError as e:   # lost while checking
            raise StoreUnavailable(f"database unavailable: {e}") from e

    def _connected(self, _: object) -> None:
        if self._stopped:
            return
        self.database.ready = True
        try:
            while self.steps:
                self.steps[0]()
                self.steps.pop(0)
        except StoreUnavailable:
            self.database.ready = False   # gone again while loading: the rest later
            self._failed(Failure())
            return
        maillog.DATABASE_CONNECTED(log, after=round(self.clock.seconds() - self._started_at, 1))

    def _failed(self, failure: Failure) -> None:
        if self._stopped:
            return
        if failure.check(schema.SchemaError):
            maillog.DATABASE_SCHEMA_REFUSED(log, error=str(failure.value))
            self.refuse()
            return
        if failure.check(StoreUnavailable):
            if not self._told:
                maillog.DATABASE_UNREACHABLE(log, error=" ".join(str(failure.value).split()),
                                             retry=self.retry)
                self._told = True
        else:
            log.failure("reaching the database", failure)
        self._later = self.clock.callLater(self.retry, self._attempt)
