# -*- test-case-name: tests.test_outbox -*-
"""
Writes for one key (an outbox entry), in the order they were asked for,
each run off the reactor thread by a pool runner; L{InOrder.flushed} waits
for those pending.  Without a runner each write runs at once.  A write that
fails in a way C{retry} says will pass (a database out of reach) is tried
again after the delay it gives, still ahead of the later ones.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["InOrder"]

log = Logger(namespace="pullmail.storage")


class InOrder:
    def __init__(self, run: Callable[..., Deferred] | None, clock=None,
                 retry: Callable[[Failure], float | None] | None = None) -> None:
        self._run = run
        self._clock = clock
        self._retry = retry
        self._operations: dict[str, deque] = {}
        self._waiters: dict[str, list[Deferred]] = {}

    def __contains__(self, key: str) -> bool:
        """Whether writes for C{key} are still pending."""
        return key in self._operations

    def submit(self, key: str, function: Callable, *args, then: Callable | None = None) -> None:
        """Run C{function(*args)} after the writes already asked for C{key};
        C{then} gets its result (in the reactor thread)."""
        if self._run is None:
            result = function(*args)
            if then is not None:
                then(result)
            return
        queue = self._operations.get(key)
        if queue is None:
            queue = self._operations[key] = deque()
        queue.append((function, args, then))
        if len(queue) == 1:
            self._next(key)

    def _next(self, key: str) -> None:
        function, args, then = self._operations[key][0]
        d = self._run(function, *args)
        d.addCallbacks(lambda result: self._done(key, then, result),
                       lambda failure: self._failed(key, failure))
        d.addErrback(lambda f: log.failure("write for {id}", f, id=key))

    def _failed(self, key: str, failure: Failure) -> None:
        delay = self._retry(failure) if self._retry is not None else None
        if delay is None:
            log.failure("write for {id}", failure, id=key)
            self._done(key, None, None)
            return
        log.warn("write for {id} failed, again in {delay}s: {error}", id=key, delay=delay,
                 error=str(failure.value))
        self._clock.callLater(delay, self._next, key)

    def _done(self, key: str, then: Callable | None, result: object) -> None:
        try:
            if then is not None:
                then(result)
        finally:
            self._advance(key)

    def _advance(self, key: str) -> None:
        queue = self._operations[key]
        queue.popleft()
        if queue:
            self._next(key)
            return
        del self._operations[key]
        for waiter in self._waiters.pop(key, []):
            waiter.callback(None)

    def flushed(self, key: str) -> Deferred:
        """Fires once every write asked for C{key} so far is done."""
        if key not in self._operations:
            return succeed(None)
        waiter = Deferred()
        self._waiters.setdefault(key, []).append(waiter)
        return waiter
