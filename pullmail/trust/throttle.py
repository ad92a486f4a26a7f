"""
Throttling a peer that keeps failing (wrong RETR ids, wrong passwords):
each failure is answered after a delay that doubles (1 s, 2 s, 4 s ...,
capped), and too many failures within a window block the address at
connect for a while (SPEC 4 "Brute force").
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail.scheduling.schedule import tarpit_delay
from pullmail.smtp import replies
from pullmail.smtp.replies import Reply

__all__ = ["FailureTracker"]

log = Logger(namespace="pullmail.trust.throttle")

# Addresses tracked at once; beyond this the oldest are forgotten, so a
# flood of sources cannot grow memory without bound.
MAX_TRACKED_ADDRESSES = 100_000


class FailureTracker:
    """Failures per address in a sliding window, and blocks."""

    def __init__(self, clock: IReactorTime, limit: int, window: float, block: float,
                 tarpit_max: float, what: str = "RETR") -> None:
        self.clock = clock
        self.what = what
        self.limit, self.window, self.block, self.tarpit_max = limit, window, block, tarpit_max
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}

    def _recent(self, address: str) -> deque[float]:
        now = self.clock.seconds()
        failures = self._failures.get(address)
        if failures is None:
            if len(self._failures) >= MAX_TRACKED_ADDRESSES:
                self._failures.pop(next(iter(self._failures)))
            failures = self._failures[address] = deque()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def failed(self, address: str) -> float:
        """Record a failure; return how long to wait before answering it."""
        failures = self._recent(address)
        failures.append(self.clock.seconds())
        if len(failures) >= self.limit:
            self._blocked[address] = self.clock.seconds() + self.block
            log.info("blocking {peer} for {seconds}s after {count} failed {what}s",
                     peer=address, seconds=self.block, count=len(failures), what=self.what,
                     event="blocked")
        return tarpit_delay(len(failures), self.tarpit_max)

    def blocked(self, address: str) -> bool:
        until = self._blocked.get(address)
        if until is None:
            return False
        if self.clock.seconds() >= until:
            del self._blocked[address]
            self._failures.pop(address, None)
            return False
        return True

    def refuse_connection(self, address: str) -> Reply | None:
        return replies.S421_BLOCKED if self.blocked(address) else None
