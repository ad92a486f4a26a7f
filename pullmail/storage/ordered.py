# -*- test-case-name: tests.test_outbox -*-
"""
Writes for one key (an outbox entry), in the order they were asked for,
each run off the reactor thread by a pool runner; L{InOrder.flushed} waits
for those pending.  Without a runner each write runs at once.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

__all__ = ["InOrder"]

log = Logger(namespace="pullmail.storage")


class InOrder:
    def __init__(self, run: Callable[..., Deferred] | None) -> None:
        self._run = run
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
        if then is not None:
            d.addCallback(then)
        d.addErrback(lambda f: log.failure("write for {id}", f, id=key))
        d.addBoth(lambda _: self._done(key))

    def _done(self, key: str) -> None:
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
