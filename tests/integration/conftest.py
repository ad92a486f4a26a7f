"""
Thin fixtures over L{harness}: a factory of nodes that are always killed at
teardown, and a DNS server on a free port.
"""

from __future__ import annotations

import pytest

from .harness import DNSServer, NodeFactory, free_port
from .world import RECORDS


@pytest.fixture
def make_node(tmp_path):
    """C{make_node(name, address, domains, hostname, users=..., ...)}: a started node."""
    factory = NodeFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def make_module_node(tmp_path_factory):
    """Like C{make_node}, for nodes shared by the tests of one module."""
    factory = NodeFactory(tmp_path_factory.mktemp("nodes"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def dns_port():
    """A port free for TCP and UDP on 127.0.0.1."""
    return free_port("127.0.0.1")


@pytest.fixture
def dns_server(tmp_path, dns_port):
    """A started L{DNSServer} with no records; C{update()} to serve some."""
    server = DNSServer(tmp_path / "dns", {}, dns_port)
    with server:
        yield server


@pytest.fixture(scope="module")
def world_dns(tmp_path_factory):
    """A DNS server holding the records of L{world} (one per test module)."""
    server = DNSServer(tmp_path_factory.mktemp("world-dns"), RECORDS, free_port("127.0.0.1"))
    with server:
        yield server
