"""
Tests for L{pullmail.outbound.mx}: choosing mail hosts and addresses (null
MX, mx_limit, blocked networks, preference order) as tables, the connect
gate, and its use by outbound delivery (SPEC 7) and the retrieval fallback
(SPEC 4) -- issue 18 items 3, 12 and 13.
"""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail.accounts.users import Accounts
from pullmail.config import DEFAULT_BLOCKED_NETWORKS, DeliveryConfig
from pullmail.outbound import mx
from pullmail.outbound.delivery import Outbound
from pullmail.pull.retrieve import Retriever
from pullmail.pull.verbs import Notify
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.server import ServerPolicy
from pullmail.storage.pending import PendingStore
from pullmail.testing import FakeNetwork, FakeResolver, FakeTrust, MemoryOutbox, run_blocking

BLOCKED = tuple(ipaddress.ip_network(n) for n in DEFAULT_BLOCKED_NETWORKS)
START = 1_000_000.0


# -- pure choices ---------------------------------------------------------------------


@pytest.mark.parametrize("records, limit, expected", [
    ([], 5, ["d.example"]),                                              # implicit MX
    ([(20, "b.example"), (10, "a.example")], 5, ["a.example", "b.example"]),
    ([(10, "A.Example."), (20, "a.example")], 5, ["a.example"]),         # once each
    ([(10, f"mx{n:02d}.example") for n in range(50)], 5,
     [f"mx{n:02d}.example" for n in range(5)]),                          # mx_limit hosts
    ([(10, "a.example"), (20, "")], 5, ["a.example"]),                   # root skipped
])
def test_mail_hosts(records, limit, expected) -> None:
    assert mx.mail_hosts("d.example", records, limit) == expected


@pytest.mark.parametrize("records", [[(0, "")], [(0, ".")], [(10, "")]])
def test_null_mx(records) -> None:
    """RFC 7505 3: a lone MX whose exchange is the root."""
    with pytest.raises(mx.NullMX):
        mx.mail_hosts("d.example", records, 5)


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.2", False),            # loopback stays allowed (the test networks)
    ("10.1.2.3", False),             # private: the operator's choice
    ("192.0.2.1", False),
    ("0.0.0.0", True),
    ("0.1.2.3", True),
    ("169.254.169.254", True),       # cloud metadata
    ("198.18.0.1", True),
    ("224.0.0.1", True),
    ("255.255.255.255", True),
    ("240.0.0.1", True),
    ("::", True),
    ("::1", False),
    ("fe80::1", True),
    ("ff02::1", True),
    ("100::1", True),
    ("::ffff:224.0.0.1", True),      # IPv4-mapped: checked as IPv4
    ("::ffff:127.0.0.2", False),
    ("not an address", True),
])
def test_blocked_defaults(address, expected) -> None:
    assert mx.blocked(address, BLOCKED) is expected


def test_pick_caps_and_skips() -> None:
    """mx_limit addresses in all, none twice, none blocked; blocked ones are reported."""
    hosts = [
        ("a.example", ["224.0.0.1", "192.0.2.1", "192.0.2.2"]),
        ("b.example", ["192.0.2.2", "192.0.2.3"]),
        ("c.example", ["192.0.2.4", "192.0.2.5", "192.0.2.6"]),
    ]
    assert mx.pick(hosts, 4, BLOCKED) == [
        mx.Target("a.example", "192.0.2.1"), mx.Target("a.example", "192.0.2.2"),
        mx.Target("b.example", "192.0.2.3"), mx.Target("c.example", "192.0.2.4"),
    ]
    picker = mx.TargetPicker(5, BLOCKED)
    assert picker.offer("a.example", ["0.0.0.0", "169.254.169.254"]) == []
    assert "a.example[0.0.0.0]" in picker.explain()


def test_guarded_connect() -> None:
    """The gate refuses a blocked address before any connection is attempted."""
    attempts = []
    connect = mx.guarded(lambda address, port, *a: attempts.append(address) or "conn", BLOCKED)
    assert connect("192.0.2.1", 25) == "conn"
    with pytest.raises(mx.BlockedAddress):
        connect("169.254.169.254", 25)
    assert attempts == ["192.0.2.1"]


# -- outbound delivery ------------------------------------------------------------------


def _outbound(resolver, clock, network, **config):
    bounces = []
    outbound = Outbound(
        outbox=MemoryOutbox(), resolver=resolver, connect=network, clock=clock,
        run_blocking=run_blocking, hostname="mx.sender.example",
        config=DeliveryConfig(**config),
        send_bounce=lambda sender, message: bounces.append((sender, message)),
    )
    outbound.start()
    return outbound, bounces


def _send(outbound, network, domain="receiver.example"):
    outbound.enqueue("QID1", "alice@sender.example", [f"bob@{domain}"],
                     [b"Subject: x\r\n\r\nx\r\n"])
    network.settle()


def test_null_mx_bounces_at_once_with_5_1_10() -> None:
    """RFC 7505 4.1: no connection attempt, a bounce with X.1.10."""
    clock = Clock()
    clock.advance(START)
    network = FakeNetwork(clock)
    resolver = FakeResolver(mx={"receiver.example": [(0, "")]})
    outbound, bounces = _outbound(resolver, clock, network)
    _send(outbound, network)
    assert network.attempts == []
    [(to, message)] = bounces
    assert to == "alice@sender.example"
    assert b"Status: 5.1.10" in message
    assert len(outbound.outbox) == 0


def test_fan_out_capped_per_attempt() -> None:
    """Issue 18 item 12: 50 MX hosts that all refuse cost mx_limit connections, not 50."""
    clock = Clock()
    clock.advance(START)
    network = FakeNetwork(clock)
    hosts = {f"mx{n:02d}.receiver.example": [f"192.0.2.{n + 1}"] for n in range(50)}
    resolver = FakeResolver(mx={"receiver.example": [(10, h) for h in hosts]}, addresses=hosts)
    outbound, bounces = _outbound(resolver, clock, network, mx_limit=3)
    _send(outbound, network)
    assert [a for a, _ in network.attempts] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert [q for q in resolver.queries if q[0] == "A"] == [
        ("A", f"mx0{n}.receiver.example") for n in range(3)]
    assert bounces == [] and len(outbound.outbox) == 1          # deferred, not bounced


def test_blocked_networks_never_connected() -> None:
    """Issue 18 item 3: MX hosts in blocked networks are skipped; the reason is kept."""
    clock = Clock()
    clock.advance(START)
    network = FakeNetwork(clock)
    resolver = FakeResolver(
        mx={"receiver.example": [(10, "meta.receiver.example"), (20, "ok.receiver.example")]},
        addresses={"meta.receiver.example": ["169.254.169.254", "224.0.0.1"],
                   "ok.receiver.example": ["192.0.2.9"]})
    outbound, _ = _outbound(resolver, clock, network, blocked_networks=BLOCKED)
    _send(outbound, network)
    assert network.attempts == [("192.0.2.9", 25)]
    resolver.mx_records["receiver.example"] = [(10, "meta.receiver.example")]
    outbound.flush()
    network.settle()
    assert network.attempts == [("192.0.2.9", 25)]
    [entry] = outbound.outbox.entries()
    assert "blocked network" in entry.last_error


# -- the retrieval fallback ----------------------------------------------------------------


def test_retrieval_fallback_capped(tmp_path) -> None:
    """
    Issue 18 item 3: the notifying address does not answer and the origin
    has 50 MX hosts that all pass SPF: at most mx_limit addresses are tried
    per retrieval attempt, the notifying one included, and none blocked.
    """
    clock = Clock()
    clock.advance(START)
    network = FakeNetwork(clock)
    hosts = {f"mx{n:02d}.sender.example": [f"192.0.2.{n + 1}"] for n in range(50)}
    hosts["mx00.sender.example"] = ["169.254.169.254"]
    resolver = FakeResolver(mx={"sender.example": [(10, h) for h in hosts]}, addresses=hosts)
    checked = []

    def authorised(address, sender):
        checked.append(address)
        return defer.succeed(True)

    policy = ServerPolicy(hostname="mx.receiver.example", domains=("receiver.example",),
                          accounts=Accounts(frozenset({"receiver.example"}), users={}))
    retriever = Retriever(
        store=PendingStore(tmp_path / "pending"), trust=FakeTrust(),
        connect=mx.guarded(network, BLOCKED), clock=clock, run_blocking=run_blocking,
        hostname="mx.receiver.example", schedule=(0.0, 600.0), remote_port=25,
        keep_for=3600.0, pending_per_origin=10, policy=policy,
        deliver=lambda *a, **k: None, resolver=resolver, sender_authorised=authorised,
        mx_limit=4, blocked_networks=BLOCKED,
    )
    retriever.start()
    session = Session("192.0.2.200", "smtp", helo="mx.sender.example", esmtp=True)
    envelope = Envelope("alice@sender.example", ("bob@receiver.example",), 10)
    retriever(object(), Notify(session, envelope, "A" * 22))
    network.settle()
    assert [a for a, _ in network.attempts] == [
        "192.0.2.200", "192.0.2.2", "192.0.2.3", "192.0.2.4"]
    assert checked == ["192.0.2.2", "192.0.2.3", "192.0.2.4"]
    retriever.stop()
