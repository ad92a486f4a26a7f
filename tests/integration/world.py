"""
The world most General Delivery tests live in: four hosts on loopback, their
DNS records, and a L{Network} that makes their nodes.

    sender.test    127.0.0.2  mx.sender.test     alice (the SMTA)
    receiver.test  127.0.0.3  mx.receiver.test   bob   (the RMTA)
    other.test     127.0.0.4  mx.other.test      carol (no GDEL: push only)
    a stranger     127.0.0.9  (an MX of nothing, outside every SPF record)
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pytest

from .harness import DNSServer, Node, NodeFactory

SENDER_IP = "127.0.0.2"
RECEIVER_IP = "127.0.0.3"
OTHER_IP = "127.0.0.4"
STRANGER_IP = "127.0.0.9"

ALICE = "alice@sender.test"
BOB = "bob@receiver.test"
CAROL = "carol@other.test"
PASSWORD = "pw-" + "x" * 8

RECORDS = {
    "sender.test": {"A": [SENDER_IP], "MX": [[10, "mx.sender.test"]],
                    "TXT": [f"v=spf1 ip4:{SENDER_IP} -all"]},
    "mx.sender.test": {"A": [SENDER_IP]},
    "receiver.test": {"A": [RECEIVER_IP], "MX": [[10, "mx.receiver.test"]],
                      "TXT": [f"v=spf1 ip4:{RECEIVER_IP} -all"]},
    "mx.receiver.test": {"A": [RECEIVER_IP]},
    "other.test": {"A": [OTHER_IP], "MX": [[10, "mx.other.test"]],
                   "TXT": [f"v=spf1 ip4:{OTHER_IP} -all"]},
    "mx.other.test": {"A": [OTHER_IP]},
}


class Network:
    """Makes the nodes of one test; kills them all at teardown."""

    def __init__(self, workdir: Path, dns: DNSServer, base: Mapping | None = None) -> None:
        self.dns = dns
        self.base = base
        self.factory = NodeFactory(workdir)

    def node(self, name, address, domain, users, settings=None, start=True) -> Node:
        return self.factory.for_domain(name, address, domain, users, PASSWORD, self.base, self.dns,
                                       settings, start)

    def sender(self, settings=None, start=True) -> Node:
        return self.node("sender", SENDER_IP, "sender.test", [ALICE], settings, start)

    def receiver(self, settings=None, start=True) -> Node:
        return self.node("receiver", RECEIVER_IP, "receiver.test", [BOB], settings, start)

    def close(self) -> None:
        self.factory.close()


def outbox_ids(node: Node) -> set[str]:
    """The ids of the entries in the node's outbox (waiting or claimed)."""
    ids = set()
    for folder in ("entries", "claimed"):
        path = node.state_dir / "outbox" / folder
        if path.is_dir():
            ids |= {p.stem for p in path.glob("*.json")}
    return ids


def network_fixture(base: Mapping | None = None):
    """A pytest fixture C{net}: a L{Network} on C{base} settings, per test."""

    @pytest.fixture
    def net(tmp_path, world_dns):
        network = Network(tmp_path, world_dns, base)
        try:
            yield network
        finally:
            network.close()

    return net

