"""Tests for L{pullmail.node.tap}: the parts of node assembly that run in-process."""

from __future__ import annotations

import gc

from twisted.logger import globalLogPublisher

from pullmail.node.tap import freeze_start_up_heap


def test_start_up_heap_is_frozen_out_of_full_collections() -> None:
    loaded = [{"entry": i} for i in range(1000)]      # what a start-up reads
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        freeze_start_up_heap()
        frozen = gc.get_freeze_count()
        tracked = {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()
        globalLogPublisher.removeObserver(events.append)
    assert frozen >= len(loaded)
    assert not tracked & {id(o) for o in loaded}       # a collection no longer walks them
    [event] = [e for e in events if e.get("event") == "heap-frozen"]
    assert event["objects"] >= len(loaded)     # (frozen objects may be freed since)


def _ehlo_keywords(factory) -> list[str]:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO client.example\r\n")
    lines = transport.value().decode().splitlines()
    protocol.connectionLost(None)
    return [line[4:].split(" ")[0] for line in lines[1:]]


def test_build_node_in_process(tmp_path) -> None:
    """
    build_node makes, from a config alone, a node that listens where the
    config says (and on its control socket), made its certificate, and whose
    MX service offers General Delivery while submission does not (SPEC 1).
    """
    from twisted.internet.testing import MemoryReactorClock

    from pullmail.config import embedded_default, override
    from pullmail.node.tap import build_node

    config = embedded_default(tmp_path)
    config = override(config, "listen.smtp", '["tcp:2525:interface=127.0.0.2"]')
    config = override(config, "listen.submission", '["tcp:2587:interface=127.0.0.2"]')
    reactor = MemoryReactorClock()
    node = build_node(config, reactor)
    node.privilegedStartService()
    listening = {(port, interface): factory for port, factory, _, interface in reactor.tcpServers}
    assert set(listening) == {(2525, "127.0.0.2"), (2587, "127.0.0.2")}
    assert config.tls.certificate.exists() and config.tls.key.exists()
    assert [server[0] for server in reactor.unixServers] == [str(config.state_dir / "control.sock")]
    mx = _ehlo_keywords(listening[(2525, "127.0.0.2")])
    submission = _ehlo_keywords(listening[(2587, "127.0.0.2")])
    assert {"GDEL", "RETR", "STARTTLS"} <= set(mx)
    assert "GDEL" not in submission and "RETR" not in submission and "STARTTLS" in submission


def test_local_delivery_follows_the_config(tmp_path) -> None:
    """
    [delivery] local picks the agent: maildirs by default, LMTP for
    "lmtp:...", which keeps what falls in doubt in <state_dir>/in-doubt.
    """
    from twisted.internet.testing import MemoryReactorClock

    from pullmail.config import embedded_default, override
    from pullmail.inbound.lmtp import LMTPDelivery
    from pullmail.node.tap import local_delivery
    from pullmail.storage.maildir import MaildirDelivery
    from pullmail.testing import run_blocking

    config = embedded_default(tmp_path)
    reactor = MemoryReactorClock()
    assert isinstance(local_delivery(config, reactor, tmp_path / "mail", None, run_blocking),
                      MaildirDelivery)
    config = override(config, "delivery.local", '"lmtp:unix:/run/dovecot/lmtp"')
    config.state_dir.mkdir(parents=True)
    agent = local_delivery(config, reactor, tmp_path / "mail", None, run_blocking)
    assert isinstance(agent, LMTPDelivery)
    assert agent.in_doubt.folder == config.state_dir / "in-doubt"
    agent.deliver("Q1", "", ["alice@example.org"], [b"x\r\n"])
    assert [client[0] for client in reactor.unixClients] == ["/run/dovecot/lmtp"]
