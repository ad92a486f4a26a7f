# -*- test-case-name: tests.test_postgresql -*-
"""
The connection pool of the PostgreSQL backend, and the threads its blocking
calls run in, in the style of L{twisted.enterprise.adbapi}: psycopg 3 is
blocking, so every statement runs in a thread the node owns and stops, and
its result comes back to the reactor thread as a Deferred.

A database that cannot be reached raises L{StoreUnavailable}, an
C{OSError}: whatever answers a client then says ``451 4.3.0`` and never
``250`` for what was not committed (SPEC 11.3, RFC 3463 4.3.0).
"""

from __future__ import annotations

import errno
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import psycopg
import psycopg_pool
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["Database", "StoreUnavailable", "take_failed", "take_once"]

log = Logger(namespace="pullmail.storage.postgresql")

# How long a statement waits for a pooled connection, or for the server to
# answer a connect, before the caller is told "unavailable" (then 451).
CONNECT_TIMEOUT = 5.0


class StoreUnavailable(OSError):
    """The database did not answer or lost the transaction: try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def take_failed(failure: Failure, key: str) -> None:
    """
    Taking due work failed: with the database out of reach, a warning (the
    poll finds the work again once it is back); anything else is a bug.
    """
    if failure.check(StoreUnavailable):
        log.warn("could not take {key}: {error}", key=key, error=str(failure.value))
    else:
        log.failure("taking {key}", failure, key=key)


def take_once(taking: set[str], key: str, take: Callable[[str], Deferred],
              taken: Callable) -> None:
    """
    Take C{key}'s row for due work (C{take}), unless a take of it is under
    way already (C{taking}); C{taken} gets what the take returned.
    """
    if key in taking:
        return
    taking.add(key)
    d = take(key)
    d.addCallback(taken)
    d.addErrback(take_failed, key)
    d.addBoth(lambda _: taking.discard(key))


def _configure(connection: psycopg.Connection) -> None:
    """SPEC 11.3: 250 only after COMMIT, so COMMIT must wait for the WAL flush."""
    connection.execute("SET synchronous_commit = on")
    connection.commit()


class Database:
    """A pool of connections to one database, and C{threads} to use them."""

    def __init__(self, dsn: str, reactor=None, threads: int = 4, name: str = "pullmail-db",
                 timeout: float = CONNECT_TIMEOUT, ready: bool = True) -> None:
        """
        @param ready: False for a node's database until its schema was
            checked and its stores loaded (L{pullmail.storage.postgresql.startup}):
            until then every transaction is refused at once.
        """
        self.dsn = dsn
        self.ready = ready
        self._reactor = reactor
        self.pool = psycopg_pool.ConnectionPool(
            dsn, min_size=1, max_size=threads, open=False, configure=_configure,
            check=psycopg_pool.ConnectionPool.check_connection, timeout=timeout,
            kwargs={"connect_timeout": max(1, int(timeout))}, name=name,
        )
        self._threads = ThreadPool(minthreads=1, maxthreads=threads, name=name)

    def open(self) -> None:
        """Open the pool; connections are made in the background (no wait)."""
        self.pool.open(wait=False)

    def start(self) -> None:
        """
        Open the pool and start the threads (the node's start).  The pool's
        own complaint at each failed connect (to stderr, through the
        logging module) is left out: the node says it once, in its log.
        """
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
        self.open()
        self._threads.start()

    def stop(self) -> None:
        self._threads.stop()
        self.close()

    def close(self) -> None:
        """Close the pool (a command that never started the threads)."""
        self.pool.close()

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor]:
        """
        A cursor in one transaction: committed when the block ends, rolled
        back if it raises.  Blocking.

        @raise StoreUnavailable: the database could not be reached, or the
            connection broke (the transaction may not have committed).
        """
        if not self.ready:
            raise StoreUnavailable("database unavailable: not connected yet")
        try:
            with self.pool.connection() as connection:
                with connection.cursor() as cursor:
                    yield cursor
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            raise StoreUnavailable(f"database unavailable: {e}") from e

    def connect(self, **kwargs) -> psycopg.Connection:
        """A connection of its own (LISTEN; initdb)."""
        try:
            return psycopg.connect(self.dsn, connect_timeout=int(CONNECT_TIMEOUT), **kwargs)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"database unavailable: {e}") from e

    def run(self, function: Callable, *args, **kwargs) -> Deferred:
        """Run a blocking function in one of the pool's threads."""
        return deferToThreadPool(self._reactor, self._threads, function, *args, **kwargs)
