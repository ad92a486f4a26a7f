"""
Issue 14 against real nodes: mail loops (RFC 5321 6.3) and the
Return-Path:/Delivered-To: local delivery writes; CHUNKING (RFC 3030) on
the MX and submission services, for push and in General Delivery's
reversed turns.

    extensions      127.0.0.101  mx.example.org  alice, bob (max_received 5, 20 KB)
    sender.test     127.0.0.2    (world.py: the SMTA)
    receiver.test   127.0.0.3    (world.py: the RMTA)
    other.test      127.0.0.4    (world.py: push only)
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import smtplib
import ssl

import pytest

from .harness import (
    SMTP_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    DNSServer,
    RawSMTP,
    free_port,
    submit,
    wait_until,
)
from .postfix import PostfixInstance, make_workdir, postfix_unavailable
from .world import ALICE as WORLD_ALICE
from .world import BOB as WORLD_BOB
from .world import CAROL, OTHER_IP, PASSWORD, RECEIVER_IP, SENDER_IP, network_fixture

ALICE = "alice@example.org"
BOB = "bob@example.org"
JOSE = "jösé@example.org"        # made with `pullmail adduser` like the others
SENDER = "sender@outside.test"
HOPS = 5


@pytest.fixture(scope="module")
def node(make_module_node):
    """mx.example.org on 127.0.0.101 with [limits] max_received = 5."""
    return make_module_node(
        "extensions", "127.0.0.101", ["example.org"], "mx.example.org",
        users={ALICE: "alice-password", BOB: "bob-password", "JÖSÉ@Example.org": "jose-pw"},
        settings={"limits": {"max_received": HOPS, "message_size": "20KB"}},
    )


def _one_new(node, address: str, mark: bytes) -> bytes:
    """The one message for C{address} that holds C{mark}, once it is there."""
    found = wait_until(lambda: [m for m in node.delivered(address) if mark in m], 10,
                       message=lambda: f"a message with {mark!r} for {address}")
    assert len(found) == 1, found
    return found[0]


def _message(hops: int, extra: bytes = b"", subject: bytes = b"loop") -> bytes:
    return (b"Received: from a.test by b.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * hops
            + extra + b"From: <sender@outside.test>\r\nSubject: " + subject
            + b"\r\n\r\nbody\r\n")


def _mx(node, message: bytes, recipients=(ALICE,)) -> tuple[int, list[str]]:
    with RawSMTP(node.address) as client:
        client.ehlo()
        return client.sendmail(SENDER, recipients, message)


def test_too_many_received_fields_are_refused_and_nothing_stored(node):
    before = node.mail_snapshot()
    code, texts = _mx(node, _message(HOPS + 1))
    assert (code, texts[0][:5]) == (554, "5.4.6")
    assert node.mail_snapshot().new_since(before) == {}


def test_at_the_limit_is_delivered_with_return_path_and_delivered_to(node):
    code, _ = _mx(node, _message(HOPS, subject=b"at the limit"), [BOB])
    assert code == 250
    stored = _one_new(node, BOB, b"Subject: at the limit")
    # Above everything, then our Authentication-Results (SPEC 11.1), then Received.
    assert stored.startswith(b"Return-Path: <sender@outside.test>\r\n"
                             b"Delivered-To: bob@example.org\r\n"
                             b"Authentication-Results: mx.example.org;")
    assert re.search(rb"\r\nReceived: from ", stored)


def test_a_copy_coming_back_to_its_mailbox_is_a_loop(node):
    """The stored copy, sent again to the same mailbox, carries our Delivered-To:."""
    code, _ = _mx(node, _message(0, b"Delivered-To: alice@example.org\r\n"))
    assert (code, ) == (554,)
    code, _ = _mx(node, _message(0, b"Delivered-To: alice@example.org\r\n"), [BOB])
    assert code == 250


def test_submission_refuses_loops_too(node):
    before = node.mail_snapshot()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(node, ALICE, "alice-password", [BOB], _message(HOPS + 1))
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error.startswith(b"5.4.6")
    assert node.mail_snapshot().new_since(before) == {}


# -- CHUNKING (RFC 3030) ---------------------------------------------------------------


def _envelope(client: RawSMTP, recipient: str = ALICE) -> None:
    client.expect(f"MAIL FROM:<{SENDER}>", 250)
    client.expect(f"RCPT TO:<{recipient}>", 250)


def test_bdat_chunks_pipelined_on_the_mx(node):
    """Pipelined chunks; a chunk holding CRLF.CRLF and 'commands' is only octets."""
    first = b"Subject: chunks\r\n\r\n.\r\nRSET\r\n"
    second = b"MAIL FROM:<evil@outside.test>\r\nend of chunks\r\n"
    with RawSMTP(node.address) as client:
        code, lines = client.ehlo()
        assert "CHUNKING" in lines
        _envelope(client)
        client.send(b"BDAT %d\r\n" % len(first) + first
                    + b"BDAT %d\r\n" % len(second) + second + b"BDAT 0 LAST\r\n")
        replies = client.read_replies(3)
        assert [code for code, _ in replies] == [250, 250, 250]
        assert replies[2][1][0].startswith("2.0.0 Ok: queued as ")
    stored = _one_new(node, ALICE, b"end of chunks")
    assert stored.endswith(b"Subject: chunks\r\n\r\n.\r\nRSET\r\n" + second)


@pytest.mark.parametrize("size", [b"ten", b"-5", b"5 LAST now"])
def test_bad_bdat_size_is_501_and_the_connection_closes(node, size):
    before = node.mail_snapshot()
    with RawSMTP(node.address) as client:
        client.ehlo()
        _envelope(client)
        client.send(b"BDAT " + size + b"\r\nhello\r\n")
        code, lines = client.read_reply()
        assert (code, lines[0][:5]) == (501, "5.5.4")
        client.expect_closed()
    assert node.mail_snapshot().new_since(before) == {}


def test_bdat_over_the_size_limit_is_552_and_the_session_goes_on(node):
    before = node.mail_snapshot()
    with RawSMTP(node.address) as client:
        client.ehlo()
        _envelope(client)
        client.send(b"BDAT 30000 LAST\r\n" + b"x" * 30000)
        code, lines = client.read_reply()
        assert (code, lines[0][:5]) == (552, "5.3.4")
        assert client.command("NOOP")[0] == 250
    assert node.mail_snapshot().new_since(before) == {}


def test_data_after_bdat_is_503(node):
    with RawSMTP(node.address) as client:
        client.ehlo()
        _envelope(client)
        client.send(b"BDAT 4\r\nabcd")
        assert client.read_reply()[0] == 250
        code, lines = client.command("DATA")
        assert (code, lines[0][:5]) == (503, "5.5.1")
        assert client.command("RSET")[0] == 250


def test_connection_lost_mid_chunk_stores_nothing(node):
    """A BDAT announcing more than arrives before the peer leaves."""
    before = node.mail_snapshot()
    with RawSMTP(node.address) as client:
        client.ehlo()
        _envelope(client)
        client.send(b"BDAT 5000 LAST\r\nSubject: cut\r\n\r\nonly this much\r\n")
    with RawSMTP(node.address) as client:     # served on, and nothing came of it
        assert client.ehlo()[0] == 250
    assert node.mail_snapshot().new_since(before) == {}


def test_bdat_on_submission(node):
    message = b"Subject: submitted in chunks\r\n\r\nhi\r\n"
    with RawSMTP(node.address, port=SUBMISSION_PORT) as client:
        client.ehlo()
        client.starttls(ssl._create_unverified_context())
        assert "CHUNKING" in client.ehlo()[1]
        plain = base64.b64encode(f"\0{ALICE}\0alice-password".encode()).decode()
        client.expect(f"AUTH PLAIN {plain}", 235)
        client.expect(f"MAIL FROM:<{ALICE}>", 250)
        client.expect(f"RCPT TO:<{BOB}>", 250)
        client.send(b"BDAT %d LAST\r\n" % len(message) + message)
        assert client.read_reply()[0] == 250
    stored = _one_new(node, BOB, b"submitted in chunks")
    assert stored.endswith(b"\r\nhi\r\n") and b"Subject: submitted in chunks" in stored


def _helo_session(node, service: str) -> RawSMTP:
    """A session greeted with HELO on C{service}, authenticated on submission."""
    if service == "submissions":
        client = RawSMTP(node.address, port=SUBMISSIONS_PORT, greeting=False)
        client.sock = ssl._create_unverified_context().wrap_socket(client.sock)
        assert client.read_reply()[0] == 220
    else:
        client = RawSMTP(node.address, port=SMTP_PORT if service == "smtp" else SUBMISSION_PORT)
    client.expect("HELO client.outside.test", 250)
    if service == "submission":
        client.starttls(ssl._create_unverified_context())
        client.expect("HELO client.outside.test", 250)
    if service != "smtp":
        plain = base64.b64encode(f"\0{ALICE}\0alice-password".encode()).decode()
        client.expect(f"AUTH PLAIN {plain}", 235)
    return client


@pytest.mark.parametrize("service", ["smtp", "submission", "submissions"])
def test_bdat_after_helo_is_503_and_its_chunk_is_not_commands(node, service):
    """
    RFC 5321 2.2.1: a HELO session was offered no CHUNKING.  The chunk
    pipelined behind the BDAT is read and dropped: the commands inside it
    get no reply, and the session goes on in step.
    """
    before = node.mail_snapshot()
    chunk = b"RSET\r\nMAIL FROM:<evil@outside.test>\r\nNOOP\r\n"
    with _helo_session(node, service) as client:
        client.expect(f"MAIL FROM:<{ALICE if service != 'smtp' else SENDER}>", 250)
        client.expect(f"RCPT TO:<{BOB}>", 250)
        client.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"HELP\r\n")
        code, lines = client.read_reply()
        assert (code, lines[0][:5]) == (503, "5.5.1") and "EHLO" in lines[0]
        assert client.read_reply()[0] == 214            # HELP: the next command
        assert client.pending() == b""
        assert client.command("DATA")[0] == 354          # the transaction is intact
        subject = b"Subject: after helo on " + service.encode()
        client.send(subject + b"\r\n\r\nhi\r\n.\r\n")
        assert client.read_reply()[0] == 250
    _one_new(node, BOB, subject + b"\r\n")
    assert not [m for m in node.mail_snapshot().new_since(before).values() if b"evil" in m]


# -- SMTPUTF8 (RFC 6531) ----------------------------------------------------------------


def test_utf8_address_without_the_parameter_is_553_5_6_7(node):
    with RawSMTP(node.address) as client:
        assert "SMTPUTF8" in client.ehlo()[1]
        code, lines = client.command("MAIL FROM:<jörg@outside.test>")
        assert (code, lines[0][:5]) == (553, "5.6.7")
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        code, lines = client.command(f"RCPT TO:<{JOSE}>")
        assert (code, lines[0][:5]) == (553, "5.6.7")


@pytest.mark.parametrize("recipient", ["a@xn--zz.example.org", "a@" + "ü" * 60 + ".example.org",
                                       "a@\u0661\u0031.example.org"])
def test_invalid_idna_is_501_5_1_3(node, recipient):
    with RawSMTP(node.address) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<{SENDER}> SMTPUTF8", 250)
        code, lines = client.command(f"RCPT TO:<{recipient}>")
        assert (code, lines[0][:5]) == (501, "5.1.3")


def test_utf8_mail_lands_in_a_utf8_maildir(node):
    """NFD and upper case on the wire; the NFC, lower-case mailbox gets it."""
    message = "From: <jörg@outside.test>\r\nSubject: grüße\r\n\r\nhallo\r\n".encode()
    with RawSMTP(node.address) as client:
        client.ehlo()
        client.expect("MAIL FROM:<jörg@outside.test> SMTPUTF8", 250)
        client.expect("RCPT TO:<JO\u0308SE\u0301@EXAMPLE.org>", 250)
        client.expect("DATA", 354)
        client.send(message + b".\r\n")
        assert client.read_reply()[0] == 250
    stored = _one_new(node, JOSE, "grüße".encode())
    assert stored.startswith("Return-Path: <jörg@outside.test>\r\nDelivered-To: jösé@example.org\r\n".encode())
    assert stored.endswith(message)
    assert node.maildir(JOSE) == node.state_dir / "mail" / "example.org" / "jösé"


# -- DSN (RFC 3461) ---------------------------------------------------------------------
# swaks 20201014 (Debian's) has no DSN options: smtplib's mail_options and
# rcpt_options say NOTIFY, ORCPT, RET and ENVID instead.


@pytest.mark.parametrize("mail, rcpt", [
    ("MAIL FROM:<{s}> ENVID=a+2", None),                               # malformed xtext
    ("MAIL FROM:<{s}> RET=HDRS RET=FULL", None),                       # a duplicate
    ("MAIL FROM:<{s}> ENVID=" + "x" * 101, None),                      # over 100 characters
    ("MAIL FROM:<{s}>", "RCPT TO:<{r}> NOTIFY=NEVER,SUCCESS"),
    ("MAIL FROM:<{s}>", "RCPT TO:<{r}> ORCPT=rfc822;bob+zz"),
    ("MAIL FROM:<{s}>", "RCPT TO:<{r}> NOTIFY=DELAY NOTIFY=DELAY"),
    # RFC 6533 3: UTF-8 ORCPT only with SMTPUTF8; HEXPOINT in shortest
    # upper-case form, for a character QCHAR cannot carry; a mailbox inside.
    ("MAIL FROM:<{s}>", "RCPT TO:<{r}> ORCPT=utf-8;b\u00f6b@example.org"),
    ("MAIL FROM:<{s}> SMTPUTF8", "RCPT TO:<{r}> ORCPT=utf-8;b\\x{{00F6}}b@example.org"),
    ("MAIL FROM:<{s}> SMTPUTF8", "RCPT TO:<{r}> ORCPT=utf-8;b\\x{{6F}}b@example.org"),
    ("MAIL FROM:<{s}> SMTPUTF8", "RCPT TO:<{r}> ORCPT=utf-8;b\\x{{D800}}b@example.org"),
    ("MAIL FROM:<{s}> SMTPUTF8", "RCPT TO:<{r}> ORCPT=utf-8;b\\ob@example.org"),
    ("MAIL FROM:<{s}> SMTPUTF8", "RCPT TO:<{r}> ORCPT=utf-8;b\u00f6b"),
])
def test_bad_dsn_parameters_are_501_5_5_4(node, mail, rcpt):
    before = node.mail_snapshot()
    with RawSMTP(node.address) as client:
        assert "DSN" in client.ehlo()[1]
        if rcpt is None:
            code, lines = client.command(mail.format(s=SENDER))
        else:
            client.expect(mail.format(s=SENDER), 250)
            code, lines = client.command(rcpt.format(r=ALICE))
        assert (code, lines[0][:5]) == (501, "5.5.4")
        code, _ = client.command("DATA")
        assert code == 503          # nothing half-accepted to send data for
    assert node.mail_snapshot().new_since(before) == {}


def test_notify_success_on_local_delivery_sends_a_delivered_report(node):
    message = b"Subject: report me\r\n\r\nsecret body\r\n"
    with smtplib.SMTP(node.address, SUBMISSION_PORT, local_hostname="client.test",
                      timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(ALICE, "alice-password")
        assert client.sendmail(ALICE, [BOB], message, mail_options=["RET=HDRS", "ENVID=env+2B7"],
                               rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;bobby+40example.org"]
                               ) == {}
    report = _one_new(node, ALICE, b"Successful Mail Delivery Report")
    assert b"Action: delivered\r\nStatus: 2.0.0" in report
    assert b"Final-Recipient: rfc822; bob@example.org" in report
    assert b"Original-Recipient: rfc822; bobby@example.org" in report
    assert b"Original-Envelope-Id: env+7" in report
    assert b"Subject: report me" in report and b"secret body" not in report   # RET=HDRS
    assert report.startswith(b"Return-Path: <>\r\nDelivered-To: alice@example.org\r\n")


def test_no_success_report_to_a_sender_spf_does_not_back(node):
    """SPEC 7: a success report to a forged sender is backscatter like a bounce."""
    message = b"Subject: pushed, report asked\r\n\r\nhi\r\n"
    with RawSMTP(node.address) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<{SENDER}> RET=FULL", 250)
        client.expect(f"RCPT TO:<{BOB}> NOTIFY=SUCCESS", 250)
        client.expect("DATA", 354)
        client.send(message + b".\r\n")
        code, lines = client.read_reply()
        assert code == 250
    queue_id = lines[0].rsplit(" ", 1)[1]
    _one_new(node, BOB, b"Subject: pushed, report asked")
    node.wait_log(rf"not bouncing {queue_id} to <{re.escape(SENDER)}>: SPF does not authorise", 10)
    assert f"delivered DSN for {queue_id}" not in node.log_text()


@pytest.mark.parametrize("orcpt", ["utf-8;b\u00f6bby@example.org",          # unitext
                                   "utf-8;b\\x{F6}bby@example.org"])       # xtext
def test_utf8_orcpt_is_echoed_as_utf8_addr_xtext(node, orcpt):
    """RFC 6533 3: Original-Recipient: utf-8; in the 7-bit form, in message/delivery-status."""
    form = "xtext" if orcpt.isascii() else "unitext"
    message = f"Subject: orcpt as {form}\r\n\r\nhi\r\n".encode()
    with smtplib.SMTP(node.address, SUBMISSION_PORT, local_hostname="client.test",
                      timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(ALICE, "alice-password")
        assert client.sendmail(ALICE, [BOB], message, mail_options=["SMTPUTF8"],
                               rcpt_options=["NOTIFY=SUCCESS", f"ORCPT={orcpt}"]) == {}
    report = _one_new(node, ALICE, message.split(b"\r\n")[0])
    assert b"Action: delivered" in report
    assert b"Original-Recipient: utf-8; b\\x{F6}bby@example.org\r\n" in report


# -- between nodes: push and General Delivery's reversed turn --------------------------

FAST = {
    "node": {"log_commands": True},
    "retrieval": {"schedule": ["0s", "2s", "4s"]},
    "delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "3s"},
    "limits": {"idle_timeout": "30s"},
}


net = network_fixture(FAST)


def _world_message(token: str) -> bytes:
    return (f"From: {WORLD_ALICE}\r\nSubject: {token}\r\n\r\n"
            f".a dot-led line\r\nEND {token}\r\n").encode()


def test_reversed_turn_sends_with_bdat_last(net):
    """SPEC 4: the RMTA offered CHUNKING with its 250 to GDEL; the turn ends after BDAT LAST."""
    sender, receiver = net.sender(), net.receiver()
    assert submit(sender, WORLD_ALICE, PASSWORD, [WORLD_BOB], _world_message("turn1")) == {}
    [raw] = receiver.wait_delivered(WORLD_BOB, timeout=15)
    assert raw.endswith(b"\r\n.a dot-led line\r\nEND turn1\r\n")   # no stuffing either way
    receiver.wait_log(rf"{re.escape(SENDER_IP)} BDAT: 250", 5)
    assert not re.search(rf"{re.escape(SENDER_IP)} DATA: ", receiver.log_text())
    sender.wait_log(r"retrieved \S+ \(\w+\) by 127\.0\.0\.3: accepted \['bob", 5)


def test_push_uses_bdat_to_a_peer_offering_chunking(net):
    sender = net.sender()
    other = net.node("other", OTHER_IP, "other.test", [CAROL], {"trust": {"gdel": False}})
    assert submit(sender, WORLD_ALICE, PASSWORD, [CAROL], _world_message("push1")) == {}
    [raw] = other.wait_delivered(CAROL, timeout=15)
    assert raw.endswith(b"\r\n.a dot-led line\r\nEND push1\r\n")
    other.wait_log(rf"{re.escape(SENDER_IP)} BDAT: 250", 5)


def _submit_utf8(node, user: str, recipients: list[str], message: bytes) -> dict:
    """smtplib with SMTPUTF8: STARTTLS, AUTH, MAIL ... SMTPUTF8 (UTF-8 commands)."""
    with smtplib.SMTP(node.address, SUBMISSION_PORT, local_hostname="client.test",
                      timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(user, PASSWORD)
        refused = client.sendmail(user, recipients, message, mail_options=["SMTPUTF8"])
        client.quit()
    return refused


def test_reversed_turn_carries_utf8_mail(net):
    """A UTF-8 recipient through GDEL and RETR: SMTPUTF8 in the notification and the turn."""
    bob = "bøb@receiver.test"
    sender = net.sender()
    receiver = net.node("receiver", RECEIVER_IP, "receiver.test", [bob])
    message = "From: <alice@sender.test>\r\nSubject: før bøb\r\n\r\nEND utf8-turn\r\n"
    assert _submit_utf8(sender, WORLD_ALICE, [bob], message.encode()) == {}
    [raw] = receiver.wait_delivered(bob, timeout=15)
    assert raw.endswith(message.encode())
    sender.wait_log(r"pull attempt \S+ \(\w+\) to mx\.receiver\.test: accepted \['bøb@", 5)
    receiver.wait_log(rf"{re.escape(SENDER_IP)} BDAT: 250", 5)


def test_dsn_parameters_cross_gdel_and_retr(net):
    """NOTIFY/ENVID ride the notification and the turn; the RMTA reports the delivery."""
    sender, receiver = net.sender(), net.receiver()
    with smtplib.SMTP(sender.address, SUBMISSION_PORT, local_hostname="client.test",
                      timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(WORLD_ALICE, PASSWORD)
        assert client.sendmail(WORLD_ALICE, [WORLD_BOB], _world_message("dsn-turn"),
                               mail_options=["ENVID=turn-env"],
                               rcpt_options=["NOTIFY=SUCCESS,FAILURE"]) == {}
    receiver.wait_delivered(WORLD_BOB, timeout=15)
    # The RMTA kept them with the notification ...
    records = [json.loads(p.read_bytes()) for p in (receiver.state_dir / "pending").rglob("*.json")]
    assert [r["dsn"] for r in records] == [
        {"envid": "turn-env", "notify": {WORLD_BOB: "SUCCESS,FAILURE"}}]
    # ... took them again in the turn, and reported the final delivery (the
    # report then goes back to sender.test like any mail; in this world the
    # RMTA's bare notification of it has no SPF to pass, so it stops there).
    receiver.wait_log(r"delivered DSN for \w+ to <alice@sender\.test>: \['bob@receiver\.test'\] "
                      r"2\.0\.0", 10)
    receiver.wait_log(r"injected \w+ from <> for \['alice@sender\.test'\]", 5)


def test_ret_full_bounce_returns_a_large_message_whole(net):
    """
    RFC 3461 4.3: RET=FULL returns the whole message, past 64 KiB (up to
    [limits] message_size); without RET the choice stays the header only.
    """
    sender = net.sender()
    net.node("other", OTHER_IP, "other.test", [CAROL])
    body = ("0123456789abcdef" * 4 + "\r\n") * 2300         # about 150 KB
    with smtplib.SMTP(sender.address, SUBMISSION_PORT, local_hostname="client.test",
                      timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(WORLD_ALICE, PASSWORD)
        for ret in ("FULL", None):
            message = (f"From: {WORLD_ALICE}\r\nSubject: ret {ret}\r\n\r\n{body}END {ret}\r\n")
            client.sendmail(WORLD_ALICE, ["nobody@other.test"], message.encode(),
                            mail_options=[f"RET={ret}"] if ret else [])
    for ret, whole in (("FULL", True), (None, False)):
        [report] = wait_until(
            lambda: [m for m in sender.delivered(WORLD_ALICE) if f"Subject: ret {ret}".encode() in m
                     and b"Action: failed" in m], 20, message=f"the RET={ret} bounce")
        assert (f"END {ret}".encode() in report) is whole
        assert len(report) > 150_000 if whole else len(report) < 20_000


# -- with a real Postfix (the private instance of postfix.py) --------------------------

PM_IP, PF_IP, CLIENT_IP, DNS_IP = "127.0.0.102", "127.0.0.103", "127.0.0.104", "127.0.0.105"
PM_USER, PM_UTF8 = "erin@pm.test", "fränk@pm.test"
PF_USER = "gina@pf.test"
PM_RECORDS = {
    "pm.test": {"A": [PM_IP], "MX": [[10, "mx.pm.test"]], "TXT": [f"v=spf1 ip4:{PM_IP} -all"]},
    "mx.pm.test": {"A": [PM_IP]},
    "pf.test": {"A": [PF_IP], "MX": [[10, "mx.pf.test"]], "TXT": [f"v=spf1 ip4:{PF_IP} -all"]},
    "mx.pf.test": {"A": [PF_IP]},
}


@pytest.fixture(scope="module")
def pm_dns(tmp_path_factory):
    server = DNSServer(tmp_path_factory.mktemp("ext-dns"), PM_RECORDS, free_port(DNS_IP),
                       address=DNS_IP)
    with server:
        yield server


@pytest.fixture(scope="module")
def pm(make_module_node, pm_dns):
    """pullmail for pm.test on 127.0.0.102, logging every command."""
    return make_module_node(
        "pm", PM_IP, ["pm.test"], "mx.pm.test", users={PM_USER: PASSWORD, PM_UTF8: PASSWORD},
        settings={"node": {"log_commands": True},
                  "dns": {"nameservers": [pm_dns.nameserver], "timeout": "2s"},
                  "delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "5s"}},
    )


@pytest.fixture(scope="module")
def postfix(pm):
    """Postfix for pf.test on 127.0.0.103:2525, relaying everything else to pullmail."""
    reason = postfix_unavailable()
    if reason is not None:
        pytest.skip(f"INTEROP NOT RUN: {reason}")
    workdir = make_workdir()
    instance = PostfixInstance(
        workdir, PF_IP, SMTP_PORT, "pf.test", relayhost=f"[{PM_IP}]:{SMTP_PORT}",
        mailboxes=[PF_USER], extra_main={"smtputf8_enable": "yes"},
    )
    try:
        with instance:
            yield instance
    finally:
        instance.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_pullmail_pushes_to_postfix_with_bdat(pm, postfix):
    """
    Postfix's smtpd offers CHUNKING: pullmail's push sends one BDAT LAST,
    unstuffed, and Postfix counts it (``bdat=1`` in its disconnect line).
    Postfix's own smtp(8) client never sends BDAT (BDAT_README: server
    side only), so the other direction stays DATA.
    """
    message = (b"From: <erin@pm.test>\r\nSubject: to postfix\r\n\r\n"
               b".dot-led\r\nEND bdat-to-postfix\r\n")
    assert submit(pm, PM_USER, PASSWORD, [PF_USER], message) == {}
    [raw] = postfix.wait_delivered(PF_USER, contains=b"END bdat-to-postfix")
    assert raw.replace(b"\r\n", b"\n").endswith(b"\n.dot-led\nEND bdat-to-postfix\n")
    postfix.wait_log(rf"disconnect from \S+\[{re.escape(PM_IP)}\].* bdat=1 ")


def test_pullmail_sends_utf8_mail_to_postfix(pm, postfix):
    """RFC 6531: Postfix (smtputf8_enable = yes) takes UTF-8 mail from pullmail."""
    message = "From: <erin@pm.test>\r\nSubject: ĉu?\r\n\r\nEND utf8-to-postfix\r\n".encode()
    assert _submit_utf8(pm, PM_USER, [PF_USER], message) == {}
    [raw] = postfix.wait_delivered(PF_USER, contains=b"END utf8-to-postfix")
    assert "Subject: ĉu?".encode() in raw


def test_postfix_relays_utf8_mail_to_pullmail(pm, postfix):
    """Postfix relays a SMTPUTF8 message to a UTF-8 mailbox at pullmail, as SMTPUTF8."""
    frank = PM_UTF8
    message = "From: <gina@pf.test>\r\nSubject: für fränk\r\n\r\nEND utf8-from-postfix\r\n"
    with smtplib.SMTP(PF_IP, SMTP_PORT, local_hostname="client.test", timeout=30,
                      source_address=(CLIENT_IP, 0)) as client:
        assert client.sendmail(PF_USER, [frank], message.encode(),
                               mail_options=["SMTPUTF8"]) == {}
    [raw] = pm.wait_delivered(frank, timeout=30)
    assert raw.endswith(message.encode())
    pm.wait_log(rf"{re.escape(PF_IP)} MAIL: 250", 5)


def test_notify_success_to_postfix_brings_postfix_s_success_report(pm, postfix):
    """pullmail passes NOTIFY=SUCCESS on; Postfix delivers and reports to the sender."""
    message = (b"From: <erin@pm.test>\r\nSubject: dsn to postfix\r\n"
               b"Message-ID: <dsn-to-postfix@pm.test>\r\n\r\nEND dsn-to-postfix\r\n")
    with smtplib.SMTP(PM_IP, SUBMISSION_PORT, local_hostname="client.test", timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(PM_USER, PASSWORD)
        assert client.sendmail(PM_USER, [PF_USER], message, mail_options=["ENVID=pm-env-1"],
                               rcpt_options=["NOTIFY=SUCCESS"]) == {}
    postfix.wait_delivered(PF_USER, contains=b"END dsn-to-postfix")
    found = wait_until(
        lambda: [m for m in pm.delivered(PM_USER)
                 if b"Action: delivered" in m and b"pm-env-1" in m], 30,
        message=lambda: f"Postfix's success report\n{postfix.log_tail()}")
    [report] = found
    assert re.search(rb"^From: .*MAILER-DAEMON@", report, re.M), report[:800]
    assert b"Reporting-MTA: dns; mx.pf.test" in report
    assert b"Original-Envelope-Id: pm-env-1" in report
    assert re.search(rb"Final-Recipient: rfc822; ?gina@pf.test", report)
