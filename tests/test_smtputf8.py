"""
Tests for SMTPUTF8 (RFC 6531, 6532, 6533; issue 14 item 3): UTF-8 addresses
and IDNA 2008 domains in the parser, the machine's replies, the accounts'
mailbox names, the config's domains, and when a message needs SMTPUTF8.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from pullmail import config as configuration
from pullmail.accounts.users import Accounts, AccountsError, add_user, normalise_local_address
from pullmail.inbound.router import needs_smtputf8
from pullmail.smtp.address import AddressError, Local, classify, parse_mailbox
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.server import ServerMachine, ServerPolicy
from pullmail.storage.maildir import mailbox_path

BUCHER = "xn--bcher-kva.example"        # bücher.example


@pytest.mark.parametrize("text, local, domain, utf8", [
    ("jösé@bücher.example", "jösé", BUCHER, True),
    ("jösé@BÜCHER.example", "jösé", BUCHER, True),              # UTS 46 mapping: case
    ("a@xn--bcher-kva.example", "a", BUCHER, False),            # an A-label is ASCII
    ("user@example.org", "user", "example.org", False),
    ("jose\u0301@example.org", "jos\u00e9", "example.org", True),   # NFD in, NFC out
    ('"ü x"@example.org', "ü x", "example.org", True),
    ("用户@例子.测试", "用户", "xn--fsqu00a.xn--0zwm56d", True),
])
def test_utf8_addresses_parse(text, local, domain, utf8):
    mailbox = parse_mailbox(text)
    assert (mailbox.local, mailbox.domain, mailbox.utf8) == (local, domain, utf8)


@pytest.mark.parametrize("text", [
    "a@xn--zz.example",                       # not a valid A-label
    "a@" + "ü" * 60 + ".example",             # its A-label is over 63 octets
    "a@ab--c.example\u0301",                  # a combining mark to start a label
    "a@\u0661\u0031.example",                 # Arabic-Indic digit mixed with a Latin one (bidi)
    "a\u202e@example.org",                    # a bidi override in the local part
    "a\u0085@example.org",                    # a C1 control
    "ö" * 33 + "@example.org",                # 66 octets of local part
])
def test_bad_internationalised_addresses(text):
    with pytest.raises(AddressError):
        parse_mailbox(text)


ACCOUNTS = Accounts(frozenset({"example.org", BUCHER}),
                    users={"jösé@example.org": "h", "josé@example.org": "h", f"ünï@{BUCHER}": "h"})


def _machine() -> ServerMachine:
    policy = ServerPolicy(hostname="mx.example.org", domains=("example.org", BUCHER),
                          accounts=ACCOUNTS)
    machine = ServerMachine(policy, Session("192.0.2.1", "smtp"))
    assert "SMTPUTF8" in machine.handle("EHLO client.test").text.split("\n")
    return machine


def _reply(action) -> tuple[int, str]:
    return action.code, action.enhanced


@pytest.mark.parametrize("mail, rcpt, replies", [
    ("MAIL FROM:<jösé@remote.test>", None, [(553, "5.6.7")]),
    ("MAIL FROM:<jösé@remote.test> SMTPUTF8", "RCPT TO:<jösé@example.org>",
     [(250, "2.1.0"), (250, "2.1.5")]),
    ("MAIL FROM:<x@remote.test>", "RCPT TO:<jösé@example.org>", [(250, "2.1.0"), (553, "5.6.7")]),
    ("MAIL FROM:<x@remote.test>", "RCPT TO:<ünï@bücher.example>",
     [(250, "2.1.0"), (553, "5.6.7")]),
    ("MAIL FROM:<x@remote.test> SMTPUTF8", "RCPT TO:<ÜNÏ@Bücher.example>",
     [(250, "2.1.0"), (250, "2.1.5")]),
    ("MAIL FROM:<x@remote.test> SMTPUTF8", "RCPT TO:<JOSE\u0301@example.org>",   # NFD
     [(250, "2.1.0"), (250, "2.1.5")]),
    ("MAIL FROM:<x@remote.test> SMTPUTF8", "RCPT TO:<a@xn--zz.example>",
     [(250, "2.1.0"), (501, "5.1.3")]),
    ("MAIL FROM:<x@remote.test> SMTPUTF8", "RCPT TO:<a@" + "ü" * 60 + ".example>",
     [(250, "2.1.0"), (501, "5.1.3")]),
    ("MAIL FROM:<x@xn--zz.example> SMTPUTF8", None, [(501, "5.1.7")]),
    ("MAIL FROM:<x@remote.test> SMTPUTF8=yes", None, [(501, "5.5.4")]),
    # An A-label is plain ASCII: no parameter needed.
    ("MAIL FROM:<x@remote.test>", f"RCPT TO:<nobody@{BUCHER}>", [(250, "2.1.0"), (550, "5.1.1")]),
])
def test_machine_replies(mail, rcpt, replies):
    machine = _machine()
    got = [_reply(machine.handle(mail))]
    if rcpt:
        got.append(_reply(machine.handle(rcpt)))
    assert got == replies


def test_utf8_recipient_is_looked_up_nfc_and_lower_case():
    machine = _machine()
    machine.handle("MAIL FROM:<x@remote.test> SMTPUTF8")
    machine.handle("RCPT TO:<JOSE\u0301@example.org>")
    assert machine.envelope.recipients == ("josé@example.org",)


@pytest.mark.parametrize("text, normal", [
    ("JÖSÉ@Bücher.example", f"jösé@{BUCHER}"),
    ("jose\u0301@example.org", "josé@example.org"),
    ("用户@example.org", "用户@example.org"),
])
def test_accounts_take_utf8_addresses(text, normal):
    assert normalise_local_address(text) == unicodedata.normalize("NFC", normal)


@pytest.mark.parametrize("text", [
    "a\u2215b@example.org",       # a division slash: a symbol, not a letter
    "a\u200db@example.org",       # a zero-width joiner
    "a\u3000b@example.org",       # an ideographic space
    ".ü@example.org", "ü..x@example.org", "ü/x@example.org",
])
def test_accounts_refuse_unsafe_mailbox_names(text):
    with pytest.raises(AccountsError):
        normalise_local_address(text)


def test_utf8_mailbox_stays_under_the_root(tmp_path: Path):
    users = tmp_path / "users"
    address = add_user(users, "Ünï@Bücher.example", "pw")
    assert address == f"ünï@{BUCHER}"
    path = mailbox_path(tmp_path / "mail", address)
    assert path == tmp_path / "mail" / BUCHER / "ünï"
    assert classify(parse_mailbox("ÜNÏ@bücher.example"), {BUCHER}, BUCHER) == Local(address)


def test_config_domains_are_a_labels(tmp_path: Path):
    config = configuration.parse({"node": {"domains": ["Bücher.example"]},
                                  "tls": {"generate": True}}, tmp_path)
    assert config.node.domains == (BUCHER,)
    with pytest.raises(configuration.ConfigError, match="node.domains"):
        configuration.parse({"node": {"domains": ["a.xn--zz"]}}, tmp_path)


@pytest.mark.parametrize("sender, params, header, needed", [
    ("jösé@x.test", {"SMTPUTF8": None}, b"Subject: x\r\n", True),
    ("a@x.test", {"SMTPUTF8": None}, "Subject: héllo\r\n".encode(), True),
    ("a@x.test", {"SMTPUTF8": None}, b"Subject: x\r\n", False),
    ("a@x.test", {}, "Subject: héllo\r\n".encode(), False),     # 8BITMIME, not SMTPUTF8
])
def test_needs_smtputf8(sender, params, header, needed):
    envelope = Envelope(sender, ("b@y.test",), params=params)
    chunks = [header + b"\r\nbody \xc3\xa9\r\n"]
    assert needs_smtputf8(envelope, ["b@y.test"], chunks) is needed


def test_received_says_utf8smtp():
    """RFC 6531 3.7.3: the with clause of a SMTPUTF8 transaction."""
    from pullmail.inbound.router import received_header

    session = Session("192.0.2.1", helo="client.test", esmtp=True, tls=True)
    header = received_header(session, "mx.example.org", "Q1", ["jösé@example.org"], 0.0,
                             utf8=True)
    assert b" with UTF8ESMTPS id Q1" in header
    assert "for <jösé@example.org>".encode() in header
