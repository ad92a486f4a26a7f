# -*- test-case-name: tests.test_expiring -*-
"""
A bounded cache whose values each live until their own deadline, on an
injected clock: for what is only good as long as the DNS answers under it
(parsed DKIM keys for their record's TTL, the verdicts on unsigned mail
for their DMARC records').
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from twisted.internet.interfaces import IReactorTime

__all__ = ["ExpiringCache"]


class ExpiringCache:
    """At most C{size} values; the least recently used is dropped first."""

    def __init__(self, clock: IReactorTime, size: int) -> None:
        self._clock = clock
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> object | None:
        """The value kept for C{key} if its deadline has not come, else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, value = entry
        if self._clock.seconds() >= until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: object, lifetime: float) -> None:
        """Keep C{value} for C{lifetime} seconds (not at all when that is not positive)."""
        if lifetime <= 0:
            return
        self._entries[key] = (self._clock.seconds() + lifetime, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        self._entries.pop(key, None)
