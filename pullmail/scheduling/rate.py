# -*- test-case-name: tests.test_rate -*-
"""
A sliding window of events per key: how many in the last C{window}
seconds, and when the next may come once it is full.
"""

from __future__ import annotations

from collections import deque

__all__ = ["RateWindow"]


class RateWindow:
    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._recent: dict[str, deque[float]] = {}

    def count(self, key: str, now: float) -> float | None:
        """
        Count one event for C{key} at C{now}; when its window is full, count
        nothing and return the time a slot opens instead.
        """
        sent = self._recent.setdefault(key, deque())
        while sent and sent[0] <= now - self.window:
            sent.popleft()
        if len(sent) >= self.limit:
            return sent[0] + self.window
        sent.append(now)
        return None

    def forget_quiet(self, now: float) -> None:
        """Drop the keys with nothing in their window (memory stays bounded)."""
        horizon = now - self.window
        for key in [k for k, sent in self._recent.items() if not sent or sent[-1] <= horizon]:
            del self._recent[key]
