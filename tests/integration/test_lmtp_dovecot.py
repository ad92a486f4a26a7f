"""
LMTP delivery (RFC 2033) into a real Dovecot: a private ``dovecot -F -c``
instance from Debian's dovecot-core and dovecot-lmtpd (installed by
tests/run when root), and a real pullmail node with
``[delivery] local = "lmtp:unix:<its socket>"``.

    example.org  127.0.0.81  pullmail node; users alice, bob, carol
    Dovecot      <work>/lmtp (and 127.0.0.82:2424)  knows alice and bob only

Mail pushed to the node over SMTP ends up in Dovecot's maildirs; Dovecot's
5xx for a user it does not know goes straight back to the SMTP client;
Dovecot stopped gives the client a 4xx; and recipients Dovecot defers while
others are delivered wait in the node's local queue and arrive once
Dovecot can take them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import smtplib

import pytest

from .dovecot import DovecotInstance, dovecot_unavailable, make_workdir
from .harness import SUBMISSION_PORT, smtp, submit, wait_until

NODE_IP = "127.0.0.81"
DOVECOT_INET = ("127.0.0.82", 2424)
ALICE, BOB, CAROL = "alice@example.org", "bob@example.org", "carol@example.org"
MESSAGE = b"From: x@outside.test\r\nSubject: over LMTP\r\n\r\n.a dot-stuffed line\r\n"

pytestmark = pytest.mark.skipif(dovecot_unavailable() is not None,
                                reason=str(dovecot_unavailable()))


@contextlib.contextmanager
def private_dovecot(users, inet=None):
    """A started L{DovecotInstance} in a fresh work folder, stopped and removed after."""
    workdir = make_workdir("pullmail-dovecot-")
    instance = DovecotInstance(workdir, users, inet=inet)
    try:
        with instance:
            yield instance
    finally:
        instance.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def dovecot():
    with private_dovecot([ALICE, BOB], inet=DOVECOT_INET) as instance:
        yield instance


def lmtp_node(make_node, local: str, aliases: str = "", retry: str = "1s"):
    return make_node(
        "mx", NODE_IP, ["example.org"], "mx.example.org",
        users={ALICE: "pw-alice-1", BOB: "pw-bob-22", CAROL: "pw-carol-3"},
        aliases=aliases,
        settings={"delivery": {"local": local, "push_retry": [retry], "connect_timeout": "2s"}},
    )


def send(node, recipients, message=MESSAGE):
    with smtp(node) as client:
        refused = client.sendmail("x@outside.test", recipients, message)
        client.quit()
    return refused


def test_message_ends_up_in_dovecots_maildir(dovecot, make_node):
    """SMTP in, LMTP out over the UNIX socket: the message lies in Dovecot's store."""
    node = lmtp_node(make_node, f"lmtp:unix:{dovecot.socket}")
    assert send(node, [ALICE, BOB]) == {}
    for address in (ALICE, BOB):
        [stored] = dovecot.wait_delivered(address)
        text = stored.replace(b"\r\n", b"\n")
        assert b"by mx.example.org (pullmail)" in text
        assert text.endswith(b"Subject: over LMTP\n\n.a dot-stuffed line\n")
    assert not (node.state_dir / "mail" / "example.org" / "alice").exists()
    node.wait_log(r"LMTP delivery of \w+ to LMTP server unix:\S+: "
                  r"delivered \['alice@example.org', 'bob@example.org'\], refused \{\}")


def test_over_tcp(dovecot, make_node):
    """The endpoint may be TCP too: ``lmtp:tcp:127.0.0.82:2424``."""
    node = lmtp_node(make_node, "lmtp:tcp:{}:{}".format(*DOVECOT_INET))
    send(node, [ALICE])
    dovecot.wait_delivered(ALICE)


def test_unknown_user_at_dovecot_is_5xx(dovecot, make_node):
    """Carol is a pullmail user Dovecot does not know: its 550 goes back to the client."""
    node = lmtp_node(make_node, f"lmtp:unix:{dovecot.socket}")
    with pytest.raises(smtplib.SMTPDataError) as raised:
        send(node, [CAROL])
    assert raised.value.smtp_code == 550
    assert b"5.1.1" in raised.value.smtp_error


def test_unknown_user_beside_a_known_one_bounces(dovecot, make_node):
    """
    Bob submits to Alice and Carol: Alice's copy is delivered, Carol's
    refused, so Bob hears 250 and gets a DSN for Carol, itself delivered
    into his Dovecot mailbox over LMTP.
    """
    node = lmtp_node(make_node, f"lmtp:unix:{dovecot.socket}")
    assert submit(node, BOB, "pw-bob-22", [ALICE, CAROL], MESSAGE) == {}
    dovecot.wait_delivered(ALICE)
    [dsn] = dovecot.wait_delivered(BOB)
    assert b"report-type=delivery-status" in dsn
    assert b"Final-Recipient: rfc822; carol@example.org" in dsn
    assert b"Status: 5.1.1" in dsn


def test_dovecot_stopped_is_4xx_and_nothing_is_lost(dovecot, make_node):
    """Dovecot down: the client hears 4xx (it keeps the mail); never a 250."""
    node = lmtp_node(make_node, f"lmtp:unix:{dovecot.socket}")
    dovecot.stop()
    with pytest.raises(smtplib.SMTPDataError) as raised:
        send(node, [ALICE])
    assert raised.value.smtp_code == 451
    dovecot.start()
    send(node, [ALICE])
    assert len(dovecot.wait_delivered(ALICE)) == 1


def test_dovecot_stopped_with_a_remote_copy_is_queued_and_retried(dovecot, make_node):
    """
    An alias to Alice and a remote address: the remote copy is queued, so
    the client hears 250 while Dovecot is down; Alice's copy waits in the
    local queue and arrives once Dovecot is back.
    """
    node = lmtp_node(make_node, f"lmtp:unix:{dovecot.socket}",
                     aliases="team@example.org: alice@example.org, dave@remote.test\n")
    dovecot.stop()
    assert send(node, ["team@example.org"]) == {}
    node.wait_log(r"deferred local delivery of \w+ to \['alice@example.org'\]")
    assert list((node.state_dir / "local-queue" / "entries").iterdir())
    dovecot.start()
    [stored] = dovecot.wait_delivered(ALICE, timeout=20)
    assert b"Subject: over LMTP" in stored


def _local_rows(node) -> list[dict]:
    document = json.loads(node.cli("queue", "--json").stdout)
    return [m for m in document["messages"] if m["queue"] == "local"]


def test_the_local_queue_in_pullmail_queue(dovecot, make_node):
    """
    ``pullmail queue`` shows the local queue (text and --json), flushes it
    (Dovecot back: delivered at once, not at the next retry an hour away)
    and deletes from it, with the node running and stopped.
    """
    node = lmtp_node(make_node, f"lmtp:unix:{dovecot.socket}",
                     aliases="team@example.org: alice@example.org, dave@remote.test\n",
                     retry="1h")
    dovecot.stop()
    assert send(node, ["team@example.org"]) == {}
    node.wait_log(r"deferred local delivery of \w+ to \['alice@example.org'\]")
    [row] = _local_rows(node)
    assert (row["recipients"], row["state"], row["sender"]) == ([ALICE], "queued",
                                                               "x@outside.test")
    assert "Local queue (deferred by the mail store, LMTP): 1" in node.cli("queue").stdout.decode()
    dovecot.start()
    node.cli("queue", "--flush")
    dovecot.wait_delivered(ALICE, timeout=20)
    wait_until(lambda: _local_rows(node) == [], 10)

    dovecot.stop()
    assert send(node, ["team@example.org"]) == {}
    node.wait_log(r"deferred local delivery of \w+ to \['alice@example.org'\]", timeout=10)
    [row] = _local_rows(node)
    assert node.cli("queue", "--delete", row["id"]).stdout == f"deleted {row['id']}\n".encode()
    assert _local_rows(node) == []
    assert send(node, ["team@example.org"]) == {}
    wait_until(lambda: len(_local_rows(node)) == 1, 10)
    node.stop()
    [row] = _local_rows(node)   # from the files
    node.cli("queue", "--delete", row["id"])
    assert _local_rows(node) == []
    assert not list((node.state_dir / "local-queue" / "entries").iterdir())


def test_one_recipient_deferred_by_dovecot_is_retried(dovecot, make_node):
    """
    Dovecot delivers to Alice and answers 4xx for Bob (his maildir is not
    writable): 250 to the client, Bob queued, and delivered on a retry once
    his maildir is fixed.  Alice gets exactly one copy.
    """
    node = lmtp_node(make_node, f"lmtp:unix:{dovecot.socket}")
    bob = dovecot.maildir(BOB)
    bob.mkdir(parents=True)
    os.chown(bob.parent, dovecot.uid, dovecot.gid)
    bob.chmod(0o500)                  # root's, not writable by the mail user
    assert send(node, [ALICE, BOB]) == {}
    dovecot.wait_delivered(ALICE)
    node.wait_log(r"deferred local delivery of \w+ to \['bob@example.org'\]")
    assert dovecot.delivered(BOB) == []
    os.chown(bob, dovecot.uid, dovecot.gid)
    bob.chmod(0o700)
    dovecot.wait_delivered(BOB, timeout=20)
    assert len(dovecot.delivered(ALICE)) == 1


def test_deferred_recipient_keeps_its_dsn_parameters(dovecot, make_node):
    """
    RFC 3461 with the local queue: Bob deferred by Dovecot, with
    NOTIFY=SUCCESS, ENVID and ORCPT; his later delivery sends Alice the
    success report that echoes them (RET=HDRS: the header only).
    """
    import ssl

    node = lmtp_node(make_node, f"lmtp:unix:{dovecot.socket}")
    bob = dovecot.maildir(BOB)
    bob.mkdir(parents=True)
    os.chown(bob.parent, dovecot.uid, dovecot.gid)
    bob.chmod(0o500)
    with smtplib.SMTP(node.address, SUBMISSION_PORT, local_hostname="client.test",
                      timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(ALICE, "pw-alice-1")
        client.ehlo()
        assert client.mail(ALICE, ["RET=HDRS", "ENVID=later+2B1"])[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        assert client.rcpt(BOB, ["NOTIFY=SUCCESS", "ORCPT=rfc822;robert+40example.org"])[0] == 250
        assert client.data(MESSAGE.replace(b"over LMTP", b"report later"))[0] == 250
    node.wait_log(r"deferred local delivery of \w+ to \['bob@example.org'\]")
    assert len(dovecot.delivered(ALICE)) == 1          # her copy; no report yet
    os.chown(bob, dovecot.uid, dovecot.gid)
    bob.chmod(0o700)
    dovecot.wait_delivered(BOB, timeout=20)
    [report] = [m for m in dovecot.wait_delivered(ALICE, count=2, timeout=20)
                if b"Successful Mail Delivery Report" in m]
    assert b"Action: delivered" in report and b"Final-Recipient: rfc822; bob@example.org" in report
    assert b"Original-Recipient: rfc822; robert@example.org" in report
    assert b"Original-Envelope-Id: later+1" in report
    assert b"Subject: report later" in report and b"dot-stuffed" not in report


# -- General Delivery: retrieved mail takes the same way ---------------------------


@pytest.fixture
def gd_dovecot():
    from .world import BOB as GD_BOB

    with private_dovecot([GD_BOB]) as instance:
        yield instance


def test_retrieved_mail_goes_to_dovecot_and_waits_while_it_is_down(tmp_path, world_dns,
                                                                   gd_dovecot):
    """
    The world of the General Delivery tests, the receiver delivering over
    LMTP: with Dovecot down its retrieval gets 4xx, so the sender keeps the
    message; once Dovecot is back, a later retrieval puts it in Dovecot's
    store, once.
    """
    from .world import ALICE as GD_ALICE
    from .world import BOB as GD_BOB
    from .world import PASSWORD, Network

    fast = {"retrieval": {"schedule": ["0s", "2s", "2s", "2s", "2s", "2s"]},
            "delivery": {"push_retry": ["1s"], "connect_timeout": "3s"}}
    network = Network(tmp_path, world_dns, fast)
    try:
        sender = network.sender()
        receiver = network.receiver(
            {"delivery": {"local": f"lmtp:unix:{gd_dovecot.socket}"}})
        gd_dovecot.stop()
        assert submit(sender, GD_ALICE, PASSWORD, [GD_BOB], MESSAGE) == {}
        receiver.wait_log(r"LMTP delivery of \w+ to .*: delivered \[\], refused", 15)
        receiver.wait_log(r"retrieval of \S+ from \S+ failed", 10)
        gd_dovecot.start()
        [stored] = gd_dovecot.wait_delivered(GD_BOB, timeout=20)
        assert b"by mx.receiver.test (pullmail)" in stored.replace(b"\r\n", b"\n")
        receiver.wait_log(r"retrieved \S+ from 127\.0\.0\.2", 10)
        assert len(gd_dovecot.delivered(GD_BOB)) == 1
    finally:
        network.close()
