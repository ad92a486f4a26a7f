"""
The state directory fills up: a node whose whole state_dir is a 2 MB tmpfs
(mounted by the test; we need root -- the test is skipped LOUDLY otherwise).

With the disk full, a pushed message, a submitted one for the outbox and a
notification all get ``452 4.3.1`` (RFC 3463: mail system full), no partial
file is left in a maildir (new/ or tmp/) or in the outbox, and once space
returns the next message is accepted and delivered whole.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from integration.harness import (
    RawSMTP,
    wait_until,
)

from .faultlib import (
    Ledger,
    message,
    submit_as,
)

NODE_IP, CLIENT_IP = "127.0.2.21", "127.0.2.55"
BOB = "bob@full.test"


@pytest.fixture
def small_disk(tmp_path):
    mountpoint = tmp_path / "state"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        note = (f"!!! test_disk_full SKIPPED: cannot mount a tmpfs on {mountpoint} "
                f"(root needed): {result.stderr.strip()} !!!")
        print(note, file=sys.stderr)
        pytest.skip(note)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(directory) -> int:
    """Write a filler file until the disk is full; its size."""
    path = directory / "filler"
    written = 0
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        # The last pages, in small pieces.
        for size in (4096, 512, 64, 1):
            while True:
                try:
                    written += f.write(block[:size])
                except OSError:
                    break
    return written


def files_under(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) \
        if path.is_dir() else []


def start_node(net, state_dir):
    dns = net.dns({})
    return net.node("full", NODE_IP, "full.test", [BOB], dns, settings={
        "node": {"state_dir": str(state_dir)},
        "trust": {"allow": ["127.0.2.0/24"]},   # so a raw GDEL needs no SPF
    })


def notify(node, gdel_id: str = "FullDiskNotification0123456789"):
    """A GDEL transaction from a trusted address; its reply."""
    with RawSMTP(NODE_IP, source=CLIENT_IP) as client:
        client.ehlo("mx.elsewhere.test")
        assert client.command("MAIL FROM:<someone@elsewhere.test>")[0] == 250
        assert client.command(f"RCPT TO:<{BOB}>")[0] == 250
        return client.command(f"GDEL {gdel_id}")


def test_full_state_dir_gives_452_and_recovers(net, small_disk):
    node = start_node(net, small_disk)
    ledger = Ledger(node, BOB)
    maildir = node.maildir(BOB)

    def push(token: str) -> tuple[int, list[str]]:
        with RawSMTP(NODE_IP, source=CLIENT_IP) as client:
            client.ehlo()
            return client.sendmail("load@outside.test", [BOB],
                                   message(token, "load@outside.test", BOB))

    assert push("full-before")[0] == 250
    size = fill(small_disk)
    assert size > 0
    state_before = {sub: files_under(small_disk / sub) for sub in ("mail", "outbox", "pending")}

    try:
        # A push to a local mailbox.
        code, texts = push("full-during")
        assert (code, texts[0][:5]) == (452, "4.3.1"), f"push on a full disk: {code} {texts}"
        # A submission for the outbox.
        with pytest.raises(Exception) as refused:
            submit_as(NODE_IP, BOB, ["someone@elsewhere.test"],
                      message("full-outbox", BOB, "someone@elsewhere.test"), source=CLIENT_IP)
        assert getattr(refused.value, "smtp_code", None) == 452 and b"4.3.1" in getattr(
            refused.value, "smtp_error", b""), f"submission on a full disk: {refused.value!r}"
        # A notification (the sender is trusted by [trust] allow).
        gdel = notify(node)
        node_alive = node.running()
        # Nothing half-written anywhere; the maildir holds the first message only.
        state_during = {sub: files_under(small_disk / sub) for sub in ("mail", "outbox", "pending")}
        tmp_files = files_under(maildir / "tmp")
    finally:
        os.unlink(small_disk / "filler")

    assert node_alive, node.diagnostics()
    assert tmp_files == [], f"partial files in tmp/: {tmp_files}"
    assert state_during == state_before, (
        f"files appeared on the full disk: before {state_before}, after {state_during}")
    counts = ledger.scan()[0]
    assert dict(counts) == {"full-before": 1}, dict(counts)

    # Space is back: the next message is accepted and stored whole.
    code, texts = push("full-after")
    assert code == 250, (code, texts)
    wait_until(lambda: ledger.scan()[0].get("full-after") == 1, 5)
    counts, bounces, broken = ledger.scan()
    assert dict(counts) == {"full-before": 1, "full-after": 1} and not broken, (counts, broken)
    assert submit_as(NODE_IP, BOB, ["someone@elsewhere.test"],
                     message("full-outbox-after", BOB, "someone@elsewhere.test"),
                     source=CLIENT_IP) == {}
    assert 400 <= gdel[0] < 500, f"GDEL on a full disk got {gdel}, expected a 4xx"
    assert node.running(), node.diagnostics()


def test_full_state_dir_notification_gets_452(net, small_disk):
    node = start_node(net, small_disk)
    fill(small_disk)
    try:
        code, texts = notify(node)
    finally:
        os.unlink(small_disk / "filler")
    assert (code, texts[0][:5]) == (452, "4.3.1"), (
        f"GDEL on a full disk got {code} {texts}, expected 452 4.3.1")
    assert "critical" not in node.log_text(), node.diagnostics()
