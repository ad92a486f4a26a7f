"""
Tests for issue 18 item 11: the throttles count per network prefix
(``[limits] ipv4_prefix``, ``ipv6_prefix``), not per address -- the
connection caps (L{ConnectionLimits}) and the RETR and AUTH failure
trackers (L{FailureTracker}).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from pullmail.config import ConfigError, parse
from pullmail.smtp.protocol import ConnectionLimits
from pullmail.trust.throttle import FailureTracker, network_of

by_network = functools.partial(network_of, ipv4_prefix=24, ipv6_prefix=64)


@pytest.mark.parametrize("address, expected", [
    ("192.0.2.77", "192.0.2.0/24"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.77", "192.0.2.0/24"),          # IPv4-mapped counts as IPv4
    ("/run/socket", "/run/socket"),
])
def test_network_of(address, expected) -> None:
    assert by_network(address) == expected


def test_network_of_defaults_per_address() -> None:
    assert network_of("192.0.2.77") == "192.0.2.77/32"


def test_connection_cap_per_network() -> None:
    """Two connections per /24: a third from a neighbour is refused, another /24 is not."""
    limits = ConnectionLimits(100, 2, key=by_network)
    assert limits.acquire("192.0.2.1") and limits.acquire("192.0.2.2")
    assert not limits.acquire("192.0.2.3")
    assert limits.acquire("198.51.100.1")
    assert limits.acquire("2001:db8::1") and limits.acquire("2001:db8::ffff:1")
    assert not limits.acquire("2001:db8::2")          # same /64, any address in it
    limits.release("192.0.2.1")
    assert limits.acquire("192.0.2.200")


@pytest.mark.parametrize("what", ["RETR", "AUTH"])
def test_failures_add_up_over_the_network(what) -> None:
    """An attacker spreading guesses over its /24 or /64 is blocked as one."""
    clock = Clock()
    tracker = FailureTracker(clock, 3, 3600.0, 600.0, 30.0, what=what, key=by_network)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert not tracker.blocked(address)
        tracker.failed(address)
    assert tracker.blocked("192.0.2.99")
    assert tracker.refuse_connection("192.0.2.250").code == 421
    assert not tracker.blocked("192.0.3.1")
    for n in range(3):
        tracker.failed(f"2001:db8:0:1::{n + 1}")
    assert tracker.blocked("2001:db8:0:1:ffff::1")
    assert not tracker.blocked("2001:db8:0:2::1")
    clock.advance(600.0)
    assert not tracker.blocked("192.0.2.99")


@pytest.mark.parametrize("option, value", [
    ("ipv4_prefix", 0), ("ipv4_prefix", 33), ("ipv6_prefix", 0), ("ipv6_prefix", 129),
])
def test_prefix_validation(option, value) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"limits": {option: value}}, Path("."))
    assert caught.value.option == f"limits.{option}"


def test_delivery_keys() -> None:
    config = parse({}, Path("."))
    assert (config.limits.ipv4_prefix, config.limits.ipv6_prefix) == (24, 64)
    assert config.delivery.mx_limit == 5
    assert any(str(n) == "169.254.0.0/16" for n in config.delivery.blocked_networks)
    with pytest.raises(ConfigError) as caught:
        parse({"delivery": {"mx_limit": 0}}, Path("."))
    assert caught.value.option == "delivery.mx_limit"
    with pytest.raises(ConfigError) as caught:
        parse({"delivery": {"blocked_networks": ["not a network"]}}, Path("."))
    assert caught.value.option == "delivery.blocked_networks"
