"""
A few threads for blocking file work (writes, fsyncs, renames), built for
many small jobs.

Twisted's thread pool wakes the reactor once per finished job.  At a few
thousand fsynced messages a second those wake-ups, and the GIL hand-offs
that come with each, cost the reactor thread more than the work itself.
Here jobs go through a C-level queue, and finished jobs go back to the
reactor in bursts: one wake-up for however many finished meanwhile.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

__all__ = ["DiskPool"]

_STOP = object()


class DiskPool:
    """
    Runs blocking callables in C{size} threads; C{pool(f, *args)} returns a
    Deferred that fires in the reactor thread with f's result or failure.
    """

    def __init__(self, reactor: IReactorFromThreads, size: int, name: str = "pullmail-disk") -> None:
        self._reactor = reactor
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: deque[tuple[Deferred, bool, object]] = deque()
        self._finished_lock = threading.Lock()
        self._wake_pending = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for number in range(self._size):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Finish the jobs already queued, then end the threads."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def __call__(self, function: Callable, *args, **kwargs) -> Deferred:
        d = Deferred()
        self._jobs.put((d, function, args, kwargs))
        return d

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            d, function, args, kwargs = job
            try:
                outcome = (d, True, function(*args, **kwargs))
            except BaseException:
                outcome = (d, False, Failure())
            with self._finished_lock:
                self._finished.append(outcome)
                wake, self._wake_pending = not self._wake_pending, True
            if wake:
                self._reactor.callFromThread(self._fire_finished)

    def _fire_finished(self) -> None:
        with self._finished_lock:
            finished, self._finished = self._finished, deque()
            self._wake_pending = False
        for d, succeeded, value in finished:
            if succeeded:
                d.callback(value)
            else:
                d.errback(value)
