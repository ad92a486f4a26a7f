"""
Tests for L{pullmail.storage.maildir} and L{pullmail.storage.durable}: local delivery into
maildirs, through a synchronous stand-in for the thread pool.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from unittest import mock

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from pullmail.storage import durable
from pullmail.storage.maildir import (
    JUNK,
    BlockingFsync,
    MaildirDelivery,
    MaildirNames,
    ensure_maildir,
    mailbox_path,
    store,
)
from pullmail.testing import assert_no_result, failure_of, result_of

pytestmark = pytest.mark.usefixtures("no_logged_failures")


class HeldSyncer:
    """Records fsync and store requests; the test fires them."""

    def __init__(self, inline_limit: int = 0) -> None:
        self.inline_limit = inline_limit
        self.files: list[tuple[str, Deferred]] = []
        self.directories: list[tuple[str, Deferred]] = []
        self.stores: list[tuple[str, str, bytes, Deferred]] = []

    def store(self, temporary: str, final: str, data: bytes) -> Deferred:
        d = Deferred()
        self.stores.append((temporary, final, data, d))
        return d

    def fsync(self, fd: int) -> Deferred:
        path = os.readlink(f"/proc/self/fd/{fd}")
        os.close(fd)
        d = Deferred()
        self.files.append((path, d))
        return d

    def fsync_directory(self, directory: str) -> Deferred:
        d = Deferred()
        self.directories.append((directory, d))
        return d


class NamesTests:
    """Maildir file names come from the injected clock and a counter."""

    def test_unique_and_timed(self):
        """Names carry the clock's time, the pid and the queue id, and differ."""
        clock = Clock()
        clock.advance(1700000000.25)
        names = MaildirNames(clock, "mx.example.org", 4242)
        first, second = names.next("Q1"), names.next("Q1")
        assert first != second
        assert first.startswith("1700000000.M250000P4242")
        assert "_Q1." in first
        assert first.endswith(".mx.example.org")

    def test_host_escaped(self):
        """'/' and ':' in the host name are escaped (they would break a file name)."""
        name = MaildirNames(Clock(), "a/b:c", 1).next("Q")
        assert "/" not in name
        assert ":" not in name


class MailboxPathTests:
    """Mailbox paths stay inside the mail root."""

    def test_layout(self):
        """<root>/<domain>/<localpart> (SPEC 10)."""
        assert mailbox_path(Path("/m"), "alice@example.org") == Path("/m/example.org/alice")

    def test_unsafe(self):
        """Names that could leave the root or hide a file are refused."""
        accepted = []
        for address in ("../x@example.org", "a/b@example.org", ".x@example.org", "@example.org",
                        "x@..", "x@.", "x@", "x@a/b", "x@../etc", "noat", "x\0@example.org",
                        "x@exa\0mple.org", "..@example.org"):
            try:
                mailbox_path(Path("/m"), address)
            except ValueError:
                continue
            accepted.append(address)
        assert accepted == []


class StoreTests:
    """The blocking store: tmp/, fsync, new/, hard links."""

    @pytest.fixture(autouse=True)
    def _root(self, tmp_path):
        self.root = tmp_path.resolve()
        self.message = [b"Subject: hi\r\n", b"\r\nbody\r\n"]

    def files(self, address: str, sub: str) -> list[Path]:
        box = mailbox_path(self.root, address) / sub
        return sorted(box.iterdir()) if box.exists() else []

    def test_one_box(self):
        """The message lands in new/, with nothing left in tmp/."""
        written = store(self.root, "name1", ["alice@example.org"], self.message)
        [path] = self.files("alice@example.org", "new")
        assert written == [path]
        assert path.name == "name1"
        assert path.read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"
        assert self.files("alice@example.org", "tmp") == []
        assert (self.root / "example.org" / "alice" / "cur").is_dir()

    def test_several_boxes_hard_linked(self):
        """Several boxes share one inode through hard links."""
        addresses = ["alice@example.org", "bob@example.org", "carol@example.net"]
        written = store(self.root, "name2", addresses, self.message)
        assert len(written) == 3
        inodes = set()
        for address in addresses:
            [path] = self.files(address, "new")
            assert path.read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"
            assert self.files(address, "tmp") == []
            inodes.add(path.stat().st_ino)
        assert len(inodes) == 1
        assert written[0].stat().st_nlink == 3

    def test_link_fails_copies(self):
        """When a hard link is impossible (another file system), a copy is made."""
        with mock.patch("os.link", side_effect=OSError(errno.EXDEV, "cross-device")):
            store(self.root, "name3", ["alice@example.org", "bob@example.org"], self.message)
        for address in ("alice@example.org", "bob@example.org"):
            [path] = self.files(address, "new")
            assert path.read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"
            assert self.files(address, "tmp") == []

    def test_fsyncs(self):
        """The file and each new/ directory are fsynced before store returns."""
        synced = []
        real_fsync = os.fsync

        def fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        with mock.patch("os.fsync", fsync):
            store(self.root, "name4", ["alice@example.org", "bob@example.org"], self.message)
        alice = mailbox_path(self.root, "alice@example.org")
        bob = mailbox_path(self.root, "bob@example.org")
        assert str((alice / "tmp" / "name4").resolve()) in synced
        assert str((alice / "new").resolve()) in synced
        assert str((bob / "new").resolve()) in synced

    def test_failure_cleans_up(self):
        """A failure leaves no partial file behind and raises."""
        with mock.patch.object(durable.os, "fsync", side_effect=OSError(errno.EIO, "I/O error")):
            with pytest.raises(OSError):
                store(self.root, "name5", ["alice@example.org", "bob@example.org"], self.message)
        for address in ("alice@example.org", "bob@example.org"):
            assert self.files(address, "new") == []
            assert self.files(address, "tmp") == []

    def test_unsafe_refused(self):
        """An unsafe name is refused before anything is written."""
        with pytest.raises(ValueError):
            store(self.root, "n", ["../../etc@example.org"], self.message)
        with pytest.raises(ValueError):
            store(self.root, "n", ["x@.."], self.message)
        assert list(self.root.iterdir()) == []

    def test_ensure_maildir(self):
        """ensure_maildir makes tmp, new and cur and may run twice."""
        box = self.root / "d" / "u"
        ensure_maildir(box)
        ensure_maildir(box)
        assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]


class DeliveryTests:
    """
    MaildirDelivery writes in the calling thread and waits for its syncer:
    the Deferred fires only after the file and then its directory are synced.
    """

    @pytest.fixture(autouse=True)
    def _delivery(self, tmp_path):
        self.root = tmp_path.resolve()
        self.syncer = HeldSyncer()
        clock = Clock()
        clock.advance(1700000000)
        self.delivery = MaildirDelivery(self.root, MaildirNames(clock, "mx.example.org", 7),
                                        self.syncer)
        self.box = self.root / "example.org" / "alice"

    def test_deliver(self):
        """tmp/ file synced, then renamed into new/, then new/ synced, then the result."""
        d = self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n"])
        [(path, file_synced)] = self.syncer.files
        assert Path(path).parent == self.box / "tmp"
        assert list((self.box / "new").iterdir()) == []
        assert self.syncer.directories == []
        file_synced.callback(None)
        [(directory, directory_synced)] = self.syncer.directories
        assert directory == str(self.box / "new")
        assert_no_result(d)
        directory_synced.callback(None)
        outcome = result_of(d)
        assert outcome.delivered == ("alice@example.org",)
        assert outcome.refused == {}
        [written] = outcome.paths
        assert written.parent == self.box / "new"
        assert "_QID." in written.name
        assert written.read_bytes() == (b"Return-Path: <x@remote.test>\r\n"
                                        b"Delivered-To: alice@example.org\r\nx\r\n")
        assert list((self.box / "tmp").iterdir()) == []

    def test_file_sync_fails(self):
        """A failed fsync fails the delivery and leaves nothing behind."""
        d = self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n"])
        self.syncer.files[0][1].errback(OSError(errno.EIO, "I/O error"))
        failure_of(d, OSError)
        assert list((self.box / "tmp").iterdir()) == []
        assert list((self.box / "new").iterdir()) == []

    def test_directory_sync_fails(self):
        """
        A failed directory fsync fails the delivery, and the file leaves
        new/ again: the client will send the message again, once.
        """
        d = self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n"])
        self.syncer.files[0][1].callback(None)
        self.syncer.directories[0][1].errback(OSError(errno.EIO, "I/O error"))
        failure_of(d, OSError)
        assert list((self.box / "new").iterdir()) == []

    def test_unwritable_mailbox(self):
        """An OSError before any sync fails the Deferred with it."""
        (self.root / "example.org").write_text("not a directory")
        failure = failure_of(
            self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n"]), OSError
        )
        assert isinstance(failure.value, OSError)

    def test_small_message_for_one_mailbox_is_one_store(self):
        """Under the syncer's inline limit, one mailbox: the whole write is one request."""
        self.syncer.inline_limit = 1000
        d = self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n", b"y\r\n"])
        [(temporary, final, data, stored)] = self.syncer.stores
        assert Path(temporary).parent == self.box / "tmp"
        assert Path(final) == self.box / "new" / Path(temporary).name
        assert data == (b"Return-Path: <x@remote.test>\r\n"
                        b"Delivered-To: alice@example.org\r\nx\r\ny\r\n")
        assert self.syncer.files == []
        assert_no_result(d)
        stored.callback(None)
        assert result_of(d).paths == (Path(final),)

    def test_big_or_shared_messages_take_the_fsync_path(self):
        """At the limit, or for two mailboxes, the file is written here and fsynced."""
        self.syncer.inline_limit = 3
        self.delivery.deliver("Q1", "x@remote.test", ["alice@example.org"], [b"x\r\n"])
        self.syncer.inline_limit = 1000
        self.delivery.deliver("Q2", "x@remote.test", ["alice@example.org", "bob@example.org"], [b"x\r\n"])
        assert len(self.syncer.files) == 2
        assert self.syncer.stores == []

    def test_blocking_syncer(self):
        """With BlockingFsync, two deliveries make two files at once."""
        delivery = MaildirDelivery(self.root, MaildirNames(Clock(), "h", 1), BlockingFsync())
        result_of(delivery.deliver("A", "x@remote.test", ["alice@example.org"], [b"1\r\n"]))
        result_of(delivery.deliver("B", "x@remote.test", ["alice@example.org"], [b"2\r\n"]))
        assert len(list((self.box / "new").iterdir())) == 2


class DurableTests:
    """write_atomically and write_new_file."""

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path):
        self.dir = tmp_path.resolve()

    def test_replace(self):
        """write_atomically replaces the file whole and leaves no temporary."""
        path = self.dir / "f"
        durable.write_atomically(path, b"one")
        durable.write_atomically(path, b"two", mode=0o640)
        assert path.read_bytes() == b"two"
        assert [p.name for p in self.dir.iterdir()] == ["f"]

    def test_publish_new_file(self):
        """publish_new_file: the data under the final name, no temporary left."""
        durable.publish_new_file(str(self.dir / "t"), str(self.dir / "f"), [b"a", b"b"])
        assert sorted(p.name for p in self.dir.iterdir()) == ["f"]
        assert (self.dir / "f").read_bytes() == b"ab"

    def test_publish_new_file_directory_sync_fails(self):
        """A failed directory fsync takes the published file away again, and raises."""
        with mock.patch.object(durable, "fsync_directory", side_effect=OSError(errno.EIO, "EIO")):
            with pytest.raises(OSError):
                durable.publish_new_file(str(self.dir / "t"), str(self.dir / "f"), [b"a"])
        assert list(self.dir.iterdir()) == []

    def test_new_file_exclusive(self):
        """write_new_file refuses to overwrite."""
        path = self.dir / "g"
        durable.write_new_file(path, [b"a", b"b"])
        assert path.read_bytes() == b"ab"
        with pytest.raises(FileExistsError):
            durable.write_new_file(path, [b"c"])
        assert path.read_bytes() == b"ab"


class DirectorySyncTests:
    """
    The fsync helper's threads share directory fsyncs: each returns after an
    fsync that began after it asked.  Real threads; each fsync is held on an
    Event, so the test decides who arrives while one runs.
    """

    @pytest.fixture(autouse=True)
    def _syncs(self, tmp_path):
        self.directory = tmp_path.resolve()
        self.threads: list[threading.Thread] = []
        self.started = [threading.Event() for _ in range(10)]   # one per fsync begun
        self.release = [threading.Event() for _ in range(10)]   # set by the test
        self.calls = 0
        self.failures = set()                                    # fsync numbers that fail

        def held(path):
            number, self.calls = self.calls, self.calls + 1
            self.started[number].set()
            assert self.release[number].wait(10)
            if number in self.failures:
                raise OSError(errno.EIO, "I/O error")
            durable.fsync_directory(path)

        self.syncs = durable.DirectorySyncs(fsync=held)
        yield
        for thread in reversed(self.threads):
            thread.join(10)

    def _thread(self, outcomes: list):
        def sync():
            try:
                outcomes.append(self.syncs(self.directory))
            except OSError as e:
                outcomes.append(e.errno)

        thread = threading.Thread(target=sync)
        thread.start()
        self.threads.append(thread)
        return thread

    def _wait_asked(self, count: int) -> None:
        """Wait until C{count} threads have asked (they block inside the call)."""
        with self.syncs._changed:
            assert self.syncs._changed.wait_for(
                lambda: self.directory in self.syncs._state
                and self.syncs._state[self.directory].asked >= count, 10)

    def test_waiters_share_the_next_fsync(self):
        """
        One fsync runs; three threads ask meanwhile; they share one more
        fsync, and none returns before it has finished.
        """
        first_done, later_done = [], []
        first = self._thread(first_done)
        assert self.started[0].wait(10)
        later = [self._thread(later_done) for _ in range(3)]
        self._wait_asked(4)
        self.release[0].set()
        first.join(10)
        assert first_done == [None]
        assert self.started[1].wait(10)   # one of the three runs the next
        assert later_done == []              # their renames came after #1 began
        self.release[1].set()
        for thread in later:
            thread.join(10)
        assert later_done == [None] * 3
        assert self.calls == 2

    def test_failed_fsync_is_retried_by_a_waiter(self):
        """An fsync that fails covers no one: the failing caller raises, a waiter runs another."""
        self.failures.add(0)
        failed, done = [], []
        failing = self._thread(failed)
        assert self.started[0].wait(10)
        waiter = self._thread(done)
        self._wait_asked(2)
        self.release[0].set()
        self.release[1].set()
        failing.join(10)
        waiter.join(10)
        assert failed == [errno.EIO]
        assert done == [None]
        assert self.calls == 2

    def test_published_file_taken_back_when_the_shared_fsync_fails(self):
        """publish_new_file through the shared fsync: a failure removes the new name."""
        self.failures.add(0)
        self.release[0].set()
        final = self.directory / "new-file"
        with pytest.raises(OSError):
            durable.publish_new_file(self.directory / ".tmp", final, [b"x"], self.syncs)
        assert not final.exists()
        assert not (self.directory / ".tmp").exists()


def test_quarantine_goes_to_the_maildirplusplus_junk_folder(tmp_path):
    """SPEC 11.1: <mailbox>/.Junk/{tmp,new,cur}, a folder IMAP servers show."""
    clock = Clock()
    delivery = MaildirDelivery(tmp_path, MaildirNames(clock, "mx", 1), BlockingFsync())
    [path] = result_of(delivery.deliver("Q1", "a@x.test", ["bob@example.org"],
                                        [b"Subject: x\r\n\r\n"], folder=JUNK)).paths
    box = tmp_path / "example.org" / "bob"
    assert path.parent == box / ".Junk" / "new"
    assert sorted(p.name for p in (box / ".Junk").iterdir()) == ["cur", "new", "tmp"]
    assert sorted(p.name for p in box.iterdir()) == [".Junk", "cur", "new", "tmp"]
    inbox, _ = result_of(delivery.deliver("Q2", "a@x.test", ["bob@example.org",
                                                             "alice@example.org"],
                                          [b"Subject: y\r\n\r\n"])).paths
    assert inbox.parent == box / "new"
    assert os.listdir(box / "new") == [inbox.name]
