"""
The fsync helper process: a real helper, driven by the real reactor
(pullmail.storage.fsync_helper.FsyncHelper), and its serving loop on a socket pair
(pullmail.storage.fsync_process.serve).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import tempfile
import threading

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pullmail.storage.fsync_helper import FsyncHelper
from pullmail.storage.fsync_process import (
    ANSWER,
    FSYNC,
    MAX_REQUEST,
    REQUEST,
    STORE,
    serve,
)


class ServeTests(SynchronousTestCase):
    """The helper's loop answers each tag with an errno, then ends on EOF."""

    def test_answers(self):
        node, helper = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(node.close)
        thread = threading.Thread(target=serve, args=(helper, 2))
        thread.start()
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        file_fd = os.open(os.path.join(folder, "f"), os.O_WRONLY | os.O_CREAT)
        read_end, write_end = os.pipe()          # fsync of a pipe: EINVAL
        for tag, fd in ((1, file_fd), (2, read_end)):
            socket.send_fds(node, [REQUEST.pack(tag, FSYNC, 0, 0)], [fd])
            os.close(fd)
        os.close(write_end)
        answers = dict(ANSWER.unpack(node.recv(ANSWER.size)) for _ in range(2))
        self.assertEqual(answers, {1: 0, 2: errno.EINVAL})
        temporary, final = os.path.join(folder, "t"), os.path.join(folder, "done")
        for tag in (3, 4):          # a second STORE to the same name replaces the first
            paths = [os.fsencode(temporary), os.fsencode(final)]
            node.send(b"".join([REQUEST.pack(tag, STORE, len(paths[0]), len(paths[1])), *paths,
                                b"message %d" % tag]))
            answer = ANSWER.unpack(node.recv(ANSWER.size))
            self.assertEqual(answer, (tag, 0))
            with open(final, "rb") as f:
                self.assertEqual(f.read(), b"message %d" % tag)
            self.assertFalse(os.path.exists(temporary))
        oversized = REQUEST.pack(6, STORE, len(paths[0]), len(paths[1])) + b"".join(paths)
        node.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_REQUEST)
        node.send(oversized + b"y" * MAX_REQUEST)    # would be cut: refused, nothing written
        self.assertEqual(ANSWER.unpack(node.recv(ANSWER.size)), (6, errno.EMSGSIZE))
        with open(final, "rb") as f:
            self.assertEqual(f.read(), b"message 4")
        open(temporary, "w").close()        # O_EXCL: a temporary that exists is refused
        node.send(b"".join([REQUEST.pack(5, STORE, len(paths[0]), len(paths[1])), *paths, b"x"]))
        self.assertEqual(ANSWER.unpack(node.recv(ANSWER.size)), (5, errno.EEXIST))
        node.shutdown(socket.SHUT_WR)
        thread.join(10)
        self.assertFalse(thread.is_alive())
        helper.close()


class FsyncHelperTests(TestCase):
    """A real helper process."""

    def setUp(self):
        self.helper = FsyncHelper(reactor)
        self.helper.start()
        self.addCleanup(self.helper.stop)
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)

    def _file(self, name="f") -> int:
        fd = os.open(os.path.join(self.folder, name), os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"data")
        return fd

    @inlineCallbacks
    def test_file_and_directory(self):
        """fsync of a file and of a directory succeed; the caller's fd is taken over."""
        fd = self._file()
        path = os.readlink(f"/proc/self/fd/{fd}")
        yield self.helper.fsync(fd)
        still_ours = [n for n in os.listdir("/proc/self/fd")
                      if os.path.realpath(f"/proc/self/fd/{n}") == path]
        self.assertEqual(still_ours, [])          # closed once sent
        yield self.helper.fsync_directory(self.folder)

    @inlineCallbacks
    def test_error_comes_back(self):
        """An fsync that fails fails its Deferred with the errno."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        with self.assertRaises(OSError) as caught:
            yield self.helper.fsync(read_end)
        self.assertEqual(caught.exception.errno, errno.EINVAL)

    @inlineCallbacks
    def test_store(self):
        """store(): the data lands under the final name, the temporary is gone."""
        temporary, final = os.path.join(self.folder, "tmp1"), os.path.join(self.folder, "new1")
        yield self.helper.store(temporary, final, b"hello\r\n")
        with open(final, "rb") as f:
            self.assertEqual(f.read(), b"hello\r\n")
        self.assertFalse(os.path.exists(temporary))
        with self.assertRaises(FileNotFoundError):
            yield self.helper.store(os.path.join(self.folder, "no", "t"), final, b"x")

    @inlineCallbacks
    def test_too_big_fails_alone(self):
        """A request too big for one datagram fails by itself; the helper keeps serving."""
        big = os.path.join(self.folder, "big")
        with self.assertRaises(OSError) as caught:
            yield self.helper.store(big + ".tmp", big, b"x" * (4 << 20))
        self.assertEqual(caught.exception.errno, errno.EMSGSIZE)
        yield self.helper.fsync(self._file("after"))

    def test_missing_directory(self):
        """A directory that cannot be opened fails at once."""
        self.failureResultOf(self.helper.fsync_directory(os.path.join(self.folder, "no")),
                             FileNotFoundError)

    @inlineCallbacks
    def test_helper_death_fails_waiters_and_restarts(self):
        """
        If the helper dies, what it held fails with EIO (nothing waits for
        ever), and the next request starts a new helper.
        """
        old = self.helper._process
        os.kill(old.pid, signal.SIGSTOP)          # hold the request in the helper
        waiting = self.helper.fsync(self._file("a"))
        os.kill(old.pid, signal.SIGKILL)
        with self.assertRaises(OSError) as caught:
            yield waiting
        self.assertEqual(caught.exception.errno, errno.EIO)
        yield self.helper.fsync(self._file("b"))
        self.assertIsNot(self.helper._process, old)
        self.assertEqual(old.poll(), -signal.SIGKILL)

    def test_stop_ends_the_helper(self):
        """stop() closes the socket; the helper exits by itself."""
        process = self.helper._process
        self.helper.stop()
        self.assertEqual(process.returncode, 0)
