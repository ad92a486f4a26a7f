"""Tests for L{pullmail.node.listeners}."""

from __future__ import annotations

import pytest
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor

from pullmail.node.listeners import Listener
from pullmail.testing import result_of


def test_listens_at_start_and_stops():
    reactor = MemoryReactor()
    listener = Listener(endpoints.TCP4ServerEndpoint(reactor, 2525), Factory.forProtocol(Protocol))
    listener.startService()
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert port == 2525 and listener.running
    stopped = listener.stopService()
    if stopped is not None:
        result_of(stopped)
    assert not listener.running and listener.port is None


def test_a_port_that_cannot_be_had_stops_the_start():
    """twistd must exit with the reason, not run without the service."""
    reactor = RaisingMemoryReactor(listenException=CannotListenError("127.0.0.2", 25, "taken"))
    listener = Listener(endpoints.TCP4ServerEndpoint(reactor, 25), Factory.forProtocol(Protocol))
    with pytest.raises(CannotListenError):
        listener.privilegedStartService()
