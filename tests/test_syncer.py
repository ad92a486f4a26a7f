"""
The fsync helper process: a real helper, driven by the real reactor
(pullmail.storage.fsync_helper.FsyncHelper), and its serving loop on a socket pair
(pullmail.storage.fsync_process.serve).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from pullmail.storage.fsync_helper import FsyncHelper
from pullmail.storage.fsync_process import (
    ANSWER,
    FSYNC,
    MAX_REQUEST,
    REQUEST,
    STORE,
    serve,
)
from pullmail.testing import failure_of

pytestmark = pytest.mark.usefixtures("no_logged_failures")

# A request that never comes back fails the test instead of hanging it (as
# trial's default timeout did).
TIMEOUT = 60


def within(d: Deferred) -> Deferred:
    """C{d}, failed with C{defer.TimeoutError} if it has no result in L{TIMEOUT} s."""
    return d.addTimeout(TIMEOUT, reactor)


class ServeTests:
    """The helper's loop answers each tag with an errno, then ends on EOF."""

    def test_answers(self, tmp_path, request):
        node, helper = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request.addfinalizer(node.close)
        thread = threading.Thread(target=serve, args=(helper, 2))
        thread.start()
        folder = str(tmp_path)
        file_fd = os.open(os.path.join(folder, "f"), os.O_WRONLY | os.O_CREAT)
        read_end, write_end = os.pipe()          # fsync of a pipe: EINVAL
        for tag, fd in ((1, file_fd), (2, read_end)):
            socket.send_fds(node, [REQUEST.pack(tag, FSYNC, 0, 0)], [fd])
            os.close(fd)
        os.close(write_end)
        answers = dict(ANSWER.unpack(node.recv(ANSWER.size)) for _ in range(2))
        assert answers == {1: 0, 2: errno.EINVAL}
        temporary, final = os.path.join(folder, "t"), os.path.join(folder, "done")
        for tag in (3, 4):          # a second STORE to the same name replaces the first
            paths = [os.fsencode(temporary), os.fsencode(final)]
            node.send(b"".join([REQUEST.pack(tag, STORE, len(paths[0]), len(paths[1])), *paths,
                                b"message %d" % tag]))
            answer = ANSWER.unpack(node.recv(ANSWER.size))
            assert answer == (tag, 0)
            with open(final, "rb") as f:
                assert f.read() == b"message %d" % tag
            assert not os.path.exists(temporary)
        oversized = REQUEST.pack(6, STORE, len(paths[0]), len(paths[1])) + b"".join(paths)
        node.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_REQUEST)
        node.send(oversized + b"y" * MAX_REQUEST)    # would be cut: refused, nothing written
        assert ANSWER.unpack(node.recv(ANSWER.size)) == (6, errno.EMSGSIZE)
        with open(final, "rb") as f:
            assert f.read() == b"message 4"
        open(temporary, "w").close()        # O_EXCL: a temporary that exists is refused
        node.send(b"".join([REQUEST.pack(5, STORE, len(paths[0]), len(paths[1])), *paths, b"x"]))
        assert ANSWER.unpack(node.recv(ANSWER.size)) == (5, errno.EEXIST)
        node.shutdown(socket.SHUT_WR)
        thread.join(10)
        assert not thread.is_alive()
        helper.close()


def _reactor_state() -> tuple:
    """What a test could leave behind in the reactor: readers, writers, timed calls."""
    return (set(reactor.getReaders()), set(reactor.getWriters()),
            {(c.func, c.getTime()) for c in reactor.getDelayedCalls() if c.active()})


class FsyncHelperTests:
    """A real helper process, on the real reactor (run by pytest-twisted)."""

    @pytest.fixture(autouse=True)
    def _helper(self, tmp_path):
        before = _reactor_state()
        self.helper = FsyncHelper(reactor)
        self.helper.start()
        self.folder = str(tmp_path)
        yield
        self.helper.stop()
        # As trial's janitor checked: the helper leaves nothing in the reactor.
        assert _reactor_state() == before

    def _file(self, name="f") -> int:
        fd = os.open(os.path.join(self.folder, name), os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"data")
        return fd

    @pytest_twisted.inlineCallbacks
    def test_file_and_directory(self):
        """fsync of a file and of a directory succeed; the caller's fd is taken over."""
        fd = self._file()
        path = os.readlink(f"/proc/self/fd/{fd}")
        yield within(self.helper.fsync(fd))
        still_ours = [n for n in os.listdir("/proc/self/fd")
                      if os.path.realpath(f"/proc/self/fd/{n}") == path]
        assert still_ours == []          # closed once sent
        yield within(self.helper.fsync_directory(self.folder))

    @pytest_twisted.inlineCallbacks
    def test_error_comes_back(self):
        """An fsync that fails fails its Deferred with the errno."""
        read_end, write_end = os.pipe()
        try:
            with pytest.raises(OSError) as caught:
                yield within(self.helper.fsync(read_end))
        finally:
            os.close(write_end)
        assert caught.value.errno == errno.EINVAL

    @pytest_twisted.inlineCallbacks
    def test_store(self):
        """store(): the data lands under the final name, the temporary is gone."""
        temporary, final = os.path.join(self.folder, "tmp1"), os.path.join(self.folder, "new1")
        yield within(self.helper.store(temporary, final, b"hello\r\n"))
        with open(final, "rb") as f:
            assert f.read() == b"hello\r\n"
        assert not os.path.exists(temporary)
        with pytest.raises(FileNotFoundError):
            yield within(self.helper.store(os.path.join(self.folder, "no", "t"), final, b"x"))

    @pytest_twisted.inlineCallbacks
    def test_too_big_fails_alone(self):
        """A request too big for one datagram fails by itself; the helper keeps serving."""
        big = os.path.join(self.folder, "big")
        with pytest.raises(OSError) as caught:
            yield within(self.helper.store(big + ".tmp", big, b"x" * (4 << 20)))
        assert caught.value.errno == errno.EMSGSIZE
        yield within(self.helper.fsync(self._file("after")))

    def test_missing_directory(self):
        """A directory that cannot be opened fails at once."""
        failure_of(self.helper.fsync_directory(os.path.join(self.folder, "no")),
                   FileNotFoundError)

    @pytest_twisted.inlineCallbacks
    def test_helper_death_fails_waiters_and_restarts(self):
        """
        If the helper dies, what it held fails with EIO (nothing waits for
        ever), and the next request starts a new helper.
        """
        old = self.helper._process
        os.kill(old.pid, signal.SIGSTOP)          # hold the request in the helper
        waiting = self.helper.fsync(self._file("a"))
        os.kill(old.pid, signal.SIGKILL)
        with pytest.raises(OSError) as caught:
            yield within(waiting)
        assert caught.value.errno == errno.EIO
        yield within(self.helper.fsync(self._file("b")))
        assert self.helper._process is not old
        assert old.poll() == -signal.SIGKILL

    def test_stop_ends_the_helper(self):
        """stop() closes the socket; the helper exits by itself."""
        process = self.helper._process
        self.helper.stop()
        assert process.returncode == 0
