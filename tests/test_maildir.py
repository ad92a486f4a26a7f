"""
Tests for L{pullmail.maildir} and L{pullmail.durable}: local delivery into
maildirs, through a synchronous stand-in for the thread pool.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pullmail import durable
from pullmail.maildir import MaildirDelivery, MaildirNames, ensure_maildir, mailbox_path, store



def _tempdir(case) -> Path:
    """A fresh folder outside the source tree, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="pullmail-test-")).resolve()
    case.addCleanup(shutil.rmtree, path, True)
    return path

class ImmediateThreadPool:
    """
    Runs work at once, in the calling thread, the way
    C{deferToThreadPool} expects a pool to report (C{callInThreadWithCallback}).
    """

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(self, onResult, function, *args, **kwargs):
        self.calls += 1
        try:
            result = function(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class HeldThreadPool:
    """Queues work until the test runs it: to see what waits for what."""

    def __init__(self) -> None:
        self.work = []

    def callInThreadWithCallback(self, onResult, function, *args, **kwargs):
        self.work.append((onResult, function, args, kwargs))

    def run_next(self, name: str | None = None):
        """Run the oldest job (of the function called C{name}, if given)."""
        index = next(i for i, job in enumerate(self.work)
                     if name is None or job[1].__name__ == name)
        onResult, function, args, kwargs = self.work.pop(index)
        try:
            result = function(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)
        return function


class ImmediateReactor:
    """callFromThread runs the call at once."""

    def callFromThread(self, function, *args, **kwargs):
        function(*args, **kwargs)


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
    """MaildirDelivery runs store in the pool and fires its Deferred."""

    def setUp(self):
        self.root = _tempdir(self)
        self.pool = ImmediateThreadPool()
        clock = Clock()
        clock.advance(1700000000)
        self.delivery = MaildirDelivery(
            self.root, MaildirNames(clock, "mx.example.org", 7), ImmediateReactor(), self.pool
        )

    def test_deliver(self):
        """The Deferred fires with the paths written, via the pool."""
        paths = self.successResultOf(
            self.delivery.deliver("QID", ["alice@example.org"], [b"x\r\n"])
        )
        # Both the file write and the directory fsync ran in the pool.
        self.assertEqual(self.pool.calls, 2)
        [path] = paths
        self.assertEqual(path.parent, self.root / "example.org" / "alice" / "new")
        self.assertIn("_QID.", path.name)
        self.assertEqual(path.read_bytes(), b"x\r\n")

    def test_deliver_fails(self):
        """An OSError in the pool fails the Deferred with it."""
        (self.root / "example.org").write_text("not a directory")
        failure = self.failureResultOf(
            self.delivery.deliver("QID", ["alice@example.org"], [b"x\r\n"]), OSError
        )
        self.assertIsInstance(failure.value, OSError)

    def test_two_messages(self):
        """Two deliveries make two files."""
        self.successResultOf(self.delivery.deliver("A", ["alice@example.org"], [b"1\r\n"]))
        self.successResultOf(self.delivery.deliver("B", ["alice@example.org"], [b"2\r\n"]))
        self.assertEqual(len(list((self.root / "example.org" / "alice" / "new").iterdir())), 2)


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

    def test_new_file_exclusive(self):
        """write_new_file refuses to overwrite."""
        path = self.dir / "g"
        durable.write_new_file(path, [b"a", b"b"])
        self.assertEqual(path.read_bytes(), b"ab")
        with self.assertRaises(FileExistsError):
            durable.write_new_file(path, [b"c"])
        self.assertEqual(path.read_bytes(), b"ab")


class DirectorySyncTests(SynchronousTestCase):
    """Directory fsyncs are shared by deliveries that wait at the same time."""

    def setUp(self):
        self.root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root)
        self.pool = HeldThreadPool()
        self.delivery = MaildirDelivery(
            self.root, MaildirNames(Clock(), "mx.example.org", 1), ImmediateReactor(), self.pool
        )
        self.synced = []
        real = durable.fsync_directory

        def recording(path):
            self.synced.append(path)
            real(path)

        patcher = mock.patch("pullmail.durable.fsync_directory", recording)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_waits_for_its_directory_fsync(self):
        """A delivery fires only after an fsync of its directory that began after its rename."""
        d = self.delivery.deliver("Q1", ["alice@example.org"], [b"x\r\n"])
        self.pool.run_next()                      # write + fsync + rename
        self.assertNoResult(d)
        self.pool.run_next()                      # the directory fsync
        self.assertEqual(len(self.successResultOf(d)), 1)
        self.assertEqual(self.synced, [self.root / "example.org" / "alice" / "new"])

    def test_shared_by_deliveries_waiting_together(self):
        """
        Three deliveries renamed while one directory fsync runs share the next
        one: four messages, two directory fsyncs; none fires early.
        """
        first = self.delivery.deliver("Q0", ["alice@example.org"], [b"0\r\n"])
        self.pool.run_next()                      # Q0 placed; its dir fsync queued
        later = [self.delivery.deliver(f"Q{n}", ["alice@example.org"], [b"n\r\n"])
                 for n in (1, 2, 3)]
        for _ in later:
            self.pool.run_next("place")           # placed while Q0's fsync runs
        for d in later:
            self.assertNoResult(d)
        self.pool.run_next("recording")           # Q0's directory fsync
        self.successResultOf(first)
        for d in later:
            self.assertNoResult(d)                # their renames came after it began
        self.pool.run_next()                      # one fsync for all three
        for d in later:
            self.successResultOf(d)
        self.assertEqual(len(self.synced), 2)
        self.assertEqual(self.pool.work, [])
