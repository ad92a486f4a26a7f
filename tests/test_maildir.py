"""
Tests for L{pullmail.storage.maildir} and L{pullmail.storage.durable}: local delivery into
maildirs, through a synchronous stand-in for the thread pool.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path
from unittest import mock

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pullmail.storage import durable
from pullmail.storage.maildir import (
    BlockingFsync,
    MaildirDelivery,
    MaildirNames,
    ensure_maildir,
    mailbox_path,
    store,
)


def _tempdir(case) -> Path:
    """A fresh folder outside the source tree, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="pullmail-test-")).resolve()
    case.addCleanup(shutil.rmtree, path, True)
    return path

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


class NamesTests(SynchronousTestCase):
    """Maildir file names come from the injected clock and a counter."""

    def test_unique_and_timed(self):
        """Names carry the clock's time, the pid and the queue id, and differ."""
        clock = Clock()
        clock.advance(1700000000.25)
        names = MaildirNames(clock, "mx.example.org", 4242)
        first, second = names.next("Q1"), names.next("Q1")
        self.assertNotEqual(first, second)
        self.assertTrue(first.startswith("1700000000.M250000P4242"))
        self.assertIn("_Q1.", first)
        self.assertTrue(first.endswith(".mx.example.org"))

    def test_host_escaped(self):
        """'/' and ':' in the host name are escaped (they would break a file name)."""
        name = MaildirNames(Clock(), "a/b:c", 1).next("Q")
        self.assertNotIn("/", name)
        self.assertNotIn(":", name)


class MailboxPathTests(SynchronousTestCase):
    """Mailbox paths stay inside the mail root."""

    def test_layout(self):
        """<root>/<domain>/<localpart> (SPEC 10)."""
        self.assertEqual(mailbox_path(Path("/m"), "alice@example.org"), Path("/m/example.org/alice"))

    def test_unsafe(self):
        """Names that could leave the root or hide a file are refused."""
        for address in ("../x@example.org", "a/b@example.org", ".x@example.org", "@example.org",
                        "x@..", "x@.", "x@", "x@a/b", "x@../etc", "noat", "x\0@example.org",
                        "x@exa\0mple.org", "..@example.org"):
            with self.assertRaises(ValueError, msg=repr(address)):
                mailbox_path(Path("/m"), address)


class StoreTests(SynchronousTestCase):
    """The blocking store: tmp/, fsync, new/, hard links."""

    def setUp(self):
        self.root = _tempdir(self)
        self.message = [b"Subject: hi\r\n", b"\r\nbody\r\n"]

    def files(self, address: str, sub: str) -> list[Path]:
        box = mailbox_path(self.root, address) / sub
        return sorted(box.iterdir()) if box.exists() else []

    def test_one_box(self):
        """The message lands in new/, with nothing left in tmp/."""
        written = store(self.root, "name1", ["alice@example.org"], self.message)
        [path] = self.files("alice@example.org", "new")
        self.assertEqual(written, [path])
        self.assertEqual(path.name, "name1")
        self.assertEqual(path.read_bytes(), b"Subject: hi\r\n\r\nbody\r\n")
        self.assertEqual(self.files("alice@example.org", "tmp"), [])
        self.assertTrue((self.root / "example.org" / "alice" / "cur").is_dir())

    def test_several_boxes_hard_linked(self):
        """Several boxes share one inode through hard links."""
        addresses = ["alice@example.org", "bob@example.org", "carol@example.net"]
        written = store(self.root, "name2", addresses, self.message)
        self.assertEqual(len(written), 3)
        inodes = set()
        for address in addresses:
            [path] = self.files(address, "new")
            self.assertEqual(path.read_bytes(), b"Subject: hi\r\n\r\nbody\r\n")
            self.assertEqual(self.files(address, "tmp"), [])
            inodes.add(path.stat().st_ino)
        self.assertEqual(len(inodes), 1)
        self.assertEqual(written[0].stat().st_nlink, 3)

    def test_link_fails_copies(self):
        """When a hard link is impossible (another file system), a copy is made."""
        with mock.patch("os.link", side_effect=OSError(errno.EXDEV, "cross-device")):
            store(self.root, "name3", ["alice@example.org", "bob@example.org"], self.message)
        for address in ("alice@example.org", "bob@example.org"):
            [path] = self.files(address, "new")
            self.assertEqual(path.read_bytes(), b"Subject: hi\r\n\r\nbody\r\n")
            self.assertEqual(self.files(address, "tmp"), [])

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
        self.assertIn(str((alice / "tmp" / "name4").resolve()), synced)
        self.assertIn(str((alice / "new").resolve()), synced)
        self.assertIn(str((bob / "new").resolve()), synced)

    def test_failure_cleans_up(self):
        """A failure leaves no partial file behind and raises."""
        with mock.patch.object(durable.os, "fsync", side_effect=OSError(errno.EIO, "I/O error")):
            with self.assertRaises(OSError):
                store(self.root, "name5", ["alice@example.org", "bob@example.org"], self.message)
        for address in ("alice@example.org", "bob@example.org"):
            self.assertEqual(self.files(address, "new"), [])
            self.assertEqual(self.files(address, "tmp"), [])

    def test_unsafe_refused(self):
        """An unsafe name is refused before anything is written."""
        with self.assertRaises(ValueError):
            store(self.root, "n", ["../../etc@example.org"], self.message)
        with self.assertRaises(ValueError):
            store(self.root, "n", ["x@.."], self.message)
        self.assertEqual(list(self.root.iterdir()), [])

    def test_ensure_maildir(self):
        """ensure_maildir makes tmp, new and cur and may run twice."""
        box = self.root / "d" / "u"
        ensure_maildir(box)
        ensure_maildir(box)
        self.assertEqual(sorted(p.name for p in box.iterdir()), ["cur", "new", "tmp"])


class DeliveryTests(SynchronousTestCase):
    """
    MaildirDelivery writes in the calling thread and waits for its syncer:
    the Deferred fires only after the file and then its directory are synced.
    """

    def setUp(self):
        self.root = _tempdir(self)
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
        self.assertEqual(Path(path).parent, self.box / "tmp")
        self.assertEqual(list((self.box / "new").iterdir()), [])
        self.assertEqual(self.syncer.directories, [])
        file_synced.callback(None)
        [(directory, directory_synced)] = self.syncer.directories
        self.assertEqual(directory, str(self.box / "new"))
        self.assertNoResult(d)
        directory_synced.callback(None)
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.delivered, ("alice@example.org",))
        self.assertEqual(outcome.refused, {})
        [written] = outcome.paths
        self.assertEqual(written.parent, self.box / "new")
        self.assertIn("_QID.", written.name)
        self.assertEqual(written.read_bytes(), b"Return-Path: <x@remote.test>\r\n"
                         b"Delivered-To: alice@example.org\r\nx\r\n")
        self.assertEqual(list((self.box / "tmp").iterdir()), [])

    def test_file_sync_fails(self):
        """A failed fsync fails the delivery and leaves nothing behind."""
        d = self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n"])
        self.syncer.files[0][1].errback(OSError(errno.EIO, "I/O error"))
        self.failureResultOf(d, OSError)
        self.assertEqual(list((self.box / "tmp").iterdir()), [])
        self.assertEqual(list((self.box / "new").iterdir()), [])

    def test_directory_sync_fails(self):
        """
        A failed directory fsync fails the delivery, and the file leaves
        new/ again: the client will send the message again, once.
        """
        d = self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n"])
        self.syncer.files[0][1].callback(None)
        self.syncer.directories[0][1].errback(OSError(errno.EIO, "I/O error"))
        self.failureResultOf(d, OSError)
        self.assertEqual(list((self.box / "new").iterdir()), [])

    def test_unwritable_mailbox(self):
        """An OSError before any sync fails the Deferred with it."""
        (self.root / "example.org").write_text("not a directory")
        failure = self.failureResultOf(
            self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n"]), OSError
        )
        self.assertIsInstance(failure.value, OSError)

    def test_small_message_for_one_mailbox_is_one_store(self):
        """Under the syncer's inline limit, one mailbox: the whole write is one request."""
        self.syncer.inline_limit = 1000
        d = self.delivery.deliver("QID", "x@remote.test", ["alice@example.org"], [b"x\r\n", b"y\r\n"])
        [(temporary, final, data, stored)] = self.syncer.stores
        self.assertEqual(Path(temporary).parent, self.box / "tmp")
        self.assertEqual(Path(final), self.box / "new" / Path(temporary).name)
        self.assertEqual(data, b"Return-Path: <x@remote.test>\r\n"
                         b"Delivered-To: alice@example.org\r\nx\r\ny\r\n")
        self.assertEqual(self.syncer.files, [])
        self.assertNoResult(d)
        stored.callback(None)
        self.assertEqual(self.successResultOf(d).paths, (Path(final),))

    def test_big_or_shared_messages_take_the_fsync_path(self):
        """At the limit, or for two mailboxes, the file is written here and fsynced."""
        self.syncer.inline_limit = 3
        self.delivery.deliver("Q1", "x@remote.test", ["alice@example.org"], [b"x\r\n"])
        self.syncer.inline_limit = 1000
        self.delivery.deliver("Q2", "x@remote.test", ["alice@example.org", "bob@example.org"], [b"x\r\n"])
        self.assertEqual(len(self.syncer.files), 2)
        self.assertEqual(self.syncer.stores, [])

    def test_blocking_syncer(self):
        """With BlockingFsync, two deliveries make two files at once."""
        delivery = MaildirDelivery(self.root, MaildirNames(Clock(), "h", 1), BlockingFsync())
        self.successResultOf(delivery.deliver("A", "x@remote.test", ["alice@example.org"], [b"1\r\n"]))
        self.successResultOf(delivery.deliver("B", "x@remote.test", ["alice@example.org"], [b"2\r\n"]))
        self.assertEqual(len(list((self.box / "new").iterdir())), 2)


class DurableTests(SynchronousTestCase):
    """write_atomically and write_new_file."""

    def setUp(self):
        self.dir = _tempdir(self)

    def test_replace(self):
        """write_atomically replaces the file whole and leaves no temporary."""
        path = self.dir / "f"
        durable.write_atomically(path, b"one")
        durable.write_atomically(path, b"two", mode=0o640)
        self.assertEqual(path.read_bytes(), b"two")
        self.assertEqual([p.name for p in self.dir.iterdir()], ["f"])

    def test_publish_new_file(self):
        """publish_new_file: the data under the final name, no temporary left."""
        durable.publish_new_file(str(self.dir / "t"), str(self.dir / "f"), [b"a", b"b"])
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["f"])
        self.assertEqual((self.dir / "f").read_bytes(), b"ab")

    def test_publish_new_file_directory_sync_fails(self):
        """A failed directory fsync takes the published file away again, and raises."""
        with mock.patch.object(durable, "fsync_directory", side_effect=OSError(errno.EIO, "EIO")):
            with self.assertRaises(OSError):
                durable.publish_new_file(str(self.dir / "t"), str(self.dir / "f"), [b"a"])
        self.assertEqual(list(self.dir.iterdir()), [])

    def test_new_file_exclusive(self):
        """write_new_file refuses to overwrite."""
        path = self.dir / "g"
        durable.write_new_file(path, [b"a", b"b"])
        self.assertEqual(path.read_bytes(), b"ab")
        with self.assertRaises(FileExistsError):
            durable.write_new_file(path, [b"c"])
        self.assertEqual(path.read_bytes(), b"ab")


class DirectorySyncTests(SynchronousTestCase):
    """
    The fsync helper's threads share directory fsyncs: each returns after an
    fsync that began after it asked.  Real threads; each fsync is held on an
    Event, so the test decides who arrives while one runs.
    """

    def setUp(self):
        self.directory = _tempdir(self)
        self.started = [threading.Event() for _ in range(10)]   # one per fsync begun
        self.release = [threading.Event() for _ in range(10)]   # set by the test
        self.calls = 0
        self.failures = set()                                    # fsync numbers that fail

        def held(path):
            number, self.calls = self.calls, self.calls + 1
            self.started[number].set()
            self.assertTrue(self.release[number].wait(10))
            if number in self.failures:
                raise OSError(errno.EIO, "I/O error")
            durable.fsync_directory(path)

        self.syncs = durable.DirectorySyncs(fsync=held)

    def _thread(self, outcomes: list):
        def sync():
            try:
                outcomes.append(self.syncs(self.directory))
            except OSError as e:
                outcomes.append(e.errno)

        thread = threading.Thread(target=sync)
        thread.start()
        self.addCleanup(thread.join, 10)
        return thread

    def _wait_asked(self, count: int) -> None:
        """Wait until C{count} threads have asked (they block inside the call)."""
        with self.syncs._changed:
            self.assertTrue(self.syncs._changed.wait_for(
                lambda: self.directory in self.syncs._state
                and self.syncs._state[self.directory].asked >= count, 10))

    def test_waiters_share_the_next_fsync(self):
        """
        One fsync runs; three threads ask meanwhile; they share one more
        fsync, and none returns before it has finished.
        """
        first_done, later_done = [], []
        first = self._thread(first_done)
        self.assertTrue(self.started[0].wait(10))
        later = [self._thread(later_done) for _ in range(3)]
        self._wait_asked(4)
        self.release[0].set()
        first.join(10)
        self.assertEqual(first_done, [None])
        self.assertTrue(self.started[1].wait(10))   # one of the three runs the next
        self.assertEqual(later_done, [])              # their renames came after #1 began
        self.release[1].set()
        for thread in later:
            thread.join(10)
        self.assertEqual(later_done, [None] * 3)
        self.assertEqual(self.calls, 2)

    def test_failed_fsync_is_retried_by_a_waiter(self):
        """An fsync that fails covers no one: the failing caller raises, a waiter runs another."""
        self.failures.add(0)
        failed, done = [], []
        failing = self._thread(failed)
        self.assertTrue(self.started[0].wait(10))
        waiter = self._thread(done)
        self._wait_asked(2)
        self.release[0].set()
        self.release[1].set()
        failing.join(10)
        waiter.join(10)
        self.assertEqual(failed, [errno.EIO])
        self.assertEqual(done, [None])
        self.assertEqual(self.calls, 2)

    def test_published_file_taken_back_when_the_shared_fsync_fails(self):
        """publish_new_file through the shared fsync: a failure removes the new name."""
        self.failures.add(0)
        self.release[0].set()
        final = self.directory / "new-file"
        with self.assertRaises(OSError):
            durable.publish_new_file(self.directory / ".tmp", final, [b"x"], self.syncs)
        self.assertFalse(final.exists())
        self.assertFalse((self.directory / ".tmp").exists())
