"""
Retry schedules as pure functions of stored facts (SPEC 5), so that a
restarted node resumes its timers from what is on disk.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["push_retry_at", "retrieval_at", "tarpit_delay"]


def push_retry_at(
    attempts: int, last_attempt: float, created: float, delays: Sequence[float],
    lifetime: float,
) -> float | None:
    """
    When to try again after C{attempts} failed attempts, the last at
    C{last_attempt}: the delays in order, the last one repeating.  None once
    the message's lifetime is over: bounce it.
    """
    delay = delays[min(attempts - 1, len(delays) - 1)] if attempts > 0 else 0.0
    when = last_attempt + delay
    deadline = created + lifetime
    if last_attempt >= deadline:
        return None
    return min(when, deadline)


def retrieval_at(attempts: int, notified_at: float, schedule: Sequence[float]) -> float | None:
    """
    When the RMTA makes retrieval attempt number C{attempts} (0-based):
    offsets from the notification time.  None: the schedule is used up.
    """
    if attempts >= len(schedule):
        return None
    return notified_at + schedule[attempts]


def tarpit_delay(failures: int, cap: float) -> float:
    """1 s, 2 s, 4 s ... for the 1st, 2nd, 3rd failure; at most C{cap}."""
    if failures <= 0:
        return 0.0
    return min(2.0 ** min(failures - 1, 62), cap)
