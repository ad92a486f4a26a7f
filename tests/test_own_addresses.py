"""
Tests for issue 18 item 6: the node's own address literals (``[127.0.0.2]``,
``[IPv6:::1]``) are local domains, in MAIL FROM (the forgery guard) and in
RCPT TO alike; and where the node learns its own addresses (the config).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pullmail.accounts.users import Accounts
from pullmail.config import parse
from pullmail.smtp import replies
from pullmail.smtp.address import Forbidden, Local, classify, literal_address, parse_mailbox
from pullmail.smtp.envelope import Session
from pullmail.smtp.server import CheckSender, ServerMachine, ServerPolicy

OWN = frozenset({ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("::1")})


@pytest.mark.parametrize("domain, expected", [
    ("[127.0.0.2]", "127.0.0.2"),
    ("[IPv6:::1]", "::1"),
    ("[ipv6:0:0:0:0:0:0:0:1]", "::1"),
    ("[::1]", None),                    # RFC 5321 4.1.3: IPv6 needs its tag
    ("[IPv6:127.0.0.2]", None),
    ("[127.0.0.256]", None),
    ("example.org", None),
    ("[x:y]", None),
])
def test_literal_address(domain, expected) -> None:
    ip = literal_address(domain)
    assert (str(ip) if ip else None) == expected


@pytest.mark.parametrize("address, expected", [
    ("bob@[127.0.0.2]", Local("bob@example.org")),
    ("Bob@[IPv6:::1]", Local("bob@example.org")),
    ("bob@[127.0.0.3]", Forbidden("address literal")),       # not ours: no relay
    ("bob%other@[127.0.0.2]", Forbidden("routing characters in local part")),
])
def test_classify_own_literals(address, expected) -> None:
    assert classify(parse_mailbox(address), ("example.org",), "example.org", OWN) == expected


def _machine() -> ServerMachine:
    policy = ServerPolicy(
        hostname="mx.example.org", domains=("example.org",),
        accounts=Accounts(frozenset({"example.org"}), users={"bob@example.org": "$x"}),
        own_addresses=OWN,
    )
    machine = ServerMachine(policy, Session("198.51.100.7", "smtp"))
    machine.handle("EHLO client.example")
    return machine


@pytest.mark.parametrize("sender", ["someone@[127.0.0.2]", "someone@[IPv6:::1]"])
def test_own_literal_sender_is_checked(sender) -> None:
    """MAIL FROM an own literal goes to the forgery guard, like our own domain."""
    machine = _machine()
    request = machine.handle(f"MAIL FROM:<{sender}>")
    assert isinstance(request, CheckSender)
    assert machine.resolve(request, replies.S550_POLICY).code == 550


def test_other_literal_sender_is_not_ours() -> None:
    assert _machine().handle("MAIL FROM:<someone@[192.0.2.1]>").code == 250


def test_own_literal_recipient_is_local() -> None:
    """RCPT TO an own literal: the main domain's mailbox, or 550 5.1.1 -- never relay."""
    machine = _machine()
    assert machine.handle("MAIL FROM:<a@remote.example>").code == 250
    assert machine.handle("RCPT TO:<bob@[127.0.0.2]>").code == 250
    assert machine.envelope.recipients == ("bob@example.org",)
    reply = machine.handle("RCPT TO:<nobody@[127.0.0.2]>")
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    reply = machine.handle("RCPT TO:<bob@[192.0.2.1]>")
    assert (reply.code, reply.enhanced) == (550, "5.7.1")


def test_config_own_addresses() -> None:
    """Every listener's interface= and the bind address; never the unspecified one."""
    config = parse({
        "listen": {"smtp": ["tcp:2525:interface=127.0.0.2", r"tcp6:2525:interface=\:\:1"],
                   "submission": ["tcp:2587:interface=0.0.0.0"], "submissions": ["tcp:2465"]},
        "delivery": {"bind_address": "127.0.0.3"},
    }, Path("."))
    assert config.own_addresses == {ipaddress.ip_address(a)
                                    for a in ("127.0.0.2", "::1", "127.0.0.3")}
