"""
Tests for L{pullmail.scheduling.rate.RateWindow}: events per key in a
sliding window.
"""

from __future__ import annotations

from pullmail.scheduling.rate import RateWindow


def test_counts_up_to_the_limit_then_says_when_a_slot_opens() -> None:
    window = RateWindow(limit=2, window=60.0)
    assert window.count("a", 10.0) is None
    assert window.count("a", 20.0) is None
    assert window.count("a", 30.0) == 70.0     # the event at 10 leaves the window at 70
    assert window.count("b", 30.0) is None     # keys are counted apart


def test_a_refused_event_is_not_counted() -> None:
    window = RateWindow(limit=1, window=60.0)
    assert window.count("a", 0.0) is None
    assert window.count("a", 10.0) == 60.0
    assert window.count("a", 60.0) is None     # the first left; the refused one never came
    assert window.count("a", 61.0) == 120.0


def test_quiet_keys_are_forgotten() -> None:
    window = RateWindow(limit=1, window=60.0)
    window.count("a", 0.0)
    window.count("b", 30.0)
    window.forget_quiet(60.0)
    assert window.count("a", 60.0) is None     # forgotten: a fresh window
    assert window.count("b", 60.0) == 90.0     # still within its minute
