"""
Throttling a peer that keeps failing (wrong RETR ids, wrong passwords):
each failure is answered after a delay that doubles (1 s, 2 s, 4 s ...,
capped), and too many failures within a window block the address at
connect for a while (SPEC 4 "Brute force").

Counts are kept per network (L{network_of}), not per address: one party
commonly holds a /24 of IPv4 and at least a /64 of IPv6 (issue 18).
"""

from __future__ import annotations

import functools
import ipaddress
from collections import deque
from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.scheduling.schedule import tarpit_delay
from pullmail.smtp import replies
from pullmail.smtp.replies import Reply

__all__ = ["FailureTracker", "network_of"]

log = Logger(namespace="pullmail.trust.throttle")

# Addresses tracked at once; beyond this the oldest are forgotten, so a
# flood of sources cannot grow memory without bound.
MAX_TRACKED_ADDRESSES = 100_000


# Every connection asks (the connection limits, the throttles): parsing
# the address each time cost more than the rest of accepting it.
@functools.lru_cache(maxsize=4096)
def network_of(address: str, ipv4_prefix: int = 32, ipv6_prefix: int = 128) -> str:
    """
    The network C{address} is counted in: its /C{ipv4_prefix} or
    /C{ipv6_prefix} (``[limits] ipv4_prefix``, ``ipv6_prefix``), as text.
    An IPv4-mapped IPv6 address counts as the IPv4 one (RFC 4291
    2.5.5.2); anything that is not an IP address (a UNIX socket) is itself.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((ip, prefix), strict=False))


class FailureTracker:
    """Failures per network (C{key} of the address) in a sliding window, and blocks."""

    def __init__(self, clock: IReactorTime, limit: int, window: float, block: float,
                 tarpit_max: float, what: str = "RETR",
                 key: Callable[[str], str] = network_of) -> None:
        self.clock = clock
        self.key = key
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
        network = self.key(address)
        failures = self._recent(network)
        failures.append(self.clock.seconds())
        if len(failures) >= self.limit:
            self._blocked[network] = self.clock.seconds() + self.block
            maillog.BLOCKED(
                log, network=network, peer=address, seconds=self.block, count=len(failures),
                what=self.what,
            )
        return tarpit_delay(len(failures), self.tarpit_max)

    def blocked(self, address: str) -> bool:
        if not self._blocked:       # the usual case: nothing to look up
            return False
        network = self.key(address)
        until = self._blocked.get(network)
        if until is None:
            return False
        if self.clock.seconds() >= until:
            del self._blocked[network]
            self._failures.pop(network, None)
            return False
        return True

    def refuse_connection(self, address: str) -> Reply | None:
        return replies.S421_BLOCKED if self.blocked(address) else None
