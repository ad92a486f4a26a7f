"""
Tests for L{pullmail.scheduling.schedule}: the retry schedules (SPEC 4, 5) as pure
functions of stored facts.
"""

from __future__ import annotations

import pytest

from pullmail.scheduling.schedule import push_retry_at, retrieval_at, tarpit_delay

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
PUSH_RETRY = (5 * MINUTE, 15 * MINUTE, HOUR, 4 * HOUR)
PUSH_LIFETIME = 5 * DAY
RETRIEVAL = (0.0, 10 * MINUTE, HOUR, 6 * HOUR, DAY)
CREATED = 1_000_000.0


@pytest.mark.parametrize("attempts, last, expected", [
    (0, CREATED, CREATED),                                   # first attempt: now
    (1, CREATED, CREATED + 5 * MINUTE),
    (2, CREATED + 300, CREATED + 300 + 15 * MINUTE),
    (3, CREATED + 1200, CREATED + 1200 + HOUR),
    (4, CREATED + 4800, CREATED + 4800 + 4 * HOUR),
    (5, CREATED + 20_000, CREATED + 20_000 + 4 * HOUR),      # then every 4 h
    (40, CREATED + 100_000, CREATED + 100_000 + 4 * HOUR),
    (30, CREATED + 5 * DAY - HOUR, CREATED + 5 * DAY),       # capped at the deadline
])
def test_push_retry_at(attempts, last, expected) -> None:
    assert push_retry_at(attempts, last, CREATED, PUSH_RETRY, PUSH_LIFETIME) == expected


@pytest.mark.parametrize("last", [CREATED + 5 * DAY, CREATED + 6 * DAY])
def test_push_retry_gives_up(last) -> None:
    """An attempt at or after the end of the lifetime was the last: bounce."""
    assert push_retry_at(9, last, CREATED, PUSH_RETRY, PUSH_LIFETIME) is None


def test_push_retry_single_delay() -> None:
    assert push_retry_at(7, 50.0, 0.0, (10.0,), 1000.0) == 60.0


@pytest.mark.parametrize("attempts, expected", [
    (0, CREATED),
    (1, CREATED + 10 * MINUTE),
    (2, CREATED + HOUR),
    (3, CREATED + 6 * HOUR),
    (4, CREATED + DAY),
    (5, None),
    (9, None),
])
def test_retrieval_at(attempts, expected) -> None:
    """SPEC 5: offsets from the notification: 0, 10 min, 1 h, 6 h, 24 h; then none."""
    assert retrieval_at(attempts, CREATED, RETRIEVAL) == expected


@pytest.mark.parametrize("failures, expected", [
    (0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 30.0), (7, 30.0),
    (100, 30.0), (10**9, 30.0),
])
def test_tarpit_delay(failures, expected) -> None:
    """SPEC 4: 1 s, 2 s, 4 s ... capped."""
    assert tarpit_delay(failures, 30.0) == expected
