"""Tests for L{pullmail.scheduling.expiring}: deadlines on the clock, size, order."""

from twisted.internet.task import Clock

from pullmail.scheduling.expiring import ExpiringCache


def test_a_value_lives_until_its_deadline() -> None:
    clock = Clock()
    cache = ExpiringCache(clock, 10)
    cache.put("a", 1, 30)
    clock.advance(29.9)
    assert cache.get("a") == 1
    clock.advance(0.1)
    assert cache.get("a") is None and len(cache) == 0


def test_no_lifetime_keeps_nothing() -> None:
    cache = ExpiringCache(Clock(), 10)
    cache.put("a", 1, 0)
    cache.put("b", 2, -5)
    assert len(cache) == 0 and cache.get("a") is None


def test_the_least_recently_used_goes_first() -> None:
    cache = ExpiringCache(Clock(), 2)
    cache.put("a", 1, 60)
    cache.put("b", 2, 60)
    assert cache.get("a") == 1             # used: "b" is now the oldest
    cache.put("c", 3, 60)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_a_value_put_again_takes_its_new_deadline() -> None:
    clock = Clock()
    cache = ExpiringCache(clock, 10)
    cache.put("a", 1, 10)
    cache.put("a", 2, 100)
    clock.advance(50)
    assert cache.get("a") == 2
    cache.discard("a")
    assert cache.get("a") is None
