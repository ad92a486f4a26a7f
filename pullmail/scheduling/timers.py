"""
One timer for many due times: a heap of (due, key) and a single
``callLater`` for the earliest (chasquid's queue, not relaymanager's
polling).  Stale heap items are the owner's to skip: an entry that moved on
is pushed again under its new time and its old item is ignored when popped.
"""

from __future__ import annotations

import heapq
from typing import Callable

from twisted.internet.interfaces import IReactorTime

__all__ = ["DueQueue"]


class DueQueue:
    def __init__(self, clock: IReactorTime, wake: Callable[[], None]) -> None:
        self._clock = clock
        self._wake = wake
        self._heap: list[tuple[float, str]] = []
        self._timer = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, due: float, key: str) -> None:
        heapq.heappush(self._heap, (due, key))

    def due_now(self, now: float) -> bool:
        return bool(self._heap) and self._heap[0][0] <= now

    def pop(self) -> tuple[float, str]:
        return heapq.heappop(self._heap)

    def arm(self) -> None:
        """Make sure the wake-up comes no later than the earliest due time."""
        if not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= due:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._wake()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
