"""
fsync(2) in a helper process, for the hot path of local delivery.

Every blocking call a Python thread makes gives up the GIL and takes it
back.  With disk threads in the node, the reactor thread queues behind them
for the GIL many times per message; on a 2-CPU machine that cost more than
the disk itself (PERF-NOTES; the push benchmark went from ~1,200 to ~1,650
messages/s when the threads left).  The helper (L{pullmail.storage.fsync_process}) has a
GIL of its own: the reactor thread writes the file at page-cache speed,
passes the descriptor over a UNIX socket (SCM_RIGHTS), and the Deferred
fires when the helper reports the data on disk.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections import deque

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from pullmail.storage.fsync_process import (
    ANSWER,
    FSYNC,
    INLINE_LIMIT,
    MAX_REQUEST,
    REQUEST,
    STORE,
)

__all__ = ["FsyncHelper"]

log = Logger(namespace="pullmail.storage.fsync_helper")


class FsyncHelper:
    """
    The node's end of the helper: C{fsync(fd)} and C{fsync_directory(path)}
    return Deferreds.  If the helper dies, what it held fails with EIO (the
    client hears 451) and the next request starts a new one.
    """

    inline_limit = INLINE_LIMIT

    def __init__(self, reactor: IReactorFDSet) -> None:
        self._reactor = reactor
        self._socket: socket.socket | None = None
        self._process: subprocess.Popen | None = None
        self._waiting: dict[int, Deferred] = {}
        self._unsent: deque[tuple[bytes, int | None]] = deque()
        self._tags = 0

    # -- the process ------------------------------------------------------------

    def start(self) -> None:
        self._reap()
        node_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "pullmail.storage.fsync_process", str(helper_end.fileno()),
                 str(os.getpid())],
                pass_fds=[helper_end.fileno()], stdin=subprocess.DEVNULL,
            )
        except BaseException:
            node_end.close()
            raise
        finally:
            helper_end.close()
        node_end.setblocking(False)
        node_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_REQUEST)
        self._socket = node_end
        self._reactor.addReader(self)
        log.info("fsync helper started, pid {pid}", pid=self._process.pid)

    def stop(self) -> None:
        """Close our end: the helper finishes what it holds and exits."""
        if self._socket is not None:
            self._drop(errno.ESHUTDOWN)
        self._reap(timeout=10)

    def _reap(self, timeout: float = 0) -> None:
        if self._process is None:
            return
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def _drop(self, error: int) -> None:
        """Close our end; fail every request the helper held or had not got."""
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)
        self._socket.close()
        self._socket = None
        for _, fd in self._unsent:
            if fd is not None:
                os.close(fd)
        self._unsent.clear()
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(OSError(error, os.strerror(error)))

    # -- requests ---------------------------------------------------------------

    def fsync(self, fd: int) -> Deferred:
        """fsync C{fd}, which this takes over (and closes once it is sent)."""
        try:
            tag = self._next_tag()
        except OSError:
            os.close(fd)
            raise
        return self._request(REQUEST.pack(tag, FSYNC, 0, 0), fd)

    def store(self, temporary: str, final: str, data: bytes) -> Deferred:
        """
        The whole durable write in the helper, for data under C{inline_limit}:
        create C{temporary}, write, fsync, rename to C{final}, fsync its
        directory.  Even creating a file can wait for the file system's
        journal, so the reactor thread leaves all of it to the helper.
        """
        paths = [os.fsencode(temporary), os.fsencode(final)]
        if REQUEST.size + len(paths[0]) + len(paths[1]) + len(data) > MAX_REQUEST:
            return fail(OSError(errno.EMSGSIZE, "too big for the fsync helper"))
        header = REQUEST.pack(self._next_tag(), STORE, len(paths[0]), len(paths[1]))
        return self._request(b"".join([header, *paths, data]), None)

    def _next_tag(self) -> int:
        if self._socket is None:
            self.start()
        self._tags += 1
        return self._tags

    def _request(self, frame: bytes, fd: int | None) -> Deferred:
        d = Deferred()
        self._waiting[REQUEST.unpack_from(frame)[0]] = d
        self._unsent.append((frame, fd))
        self._send()
        return d

    def fsync_directory(self, directory: str) -> Deferred:
        """
        fsync a directory (new entries in it).  Concurrent requests are not
        merged here: the kernel's journal already commits them together.
        """
        try:
            return self.fsync(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
        except OSError:
            return fail()

    # -- the socket (IReadDescriptor, IWriteDescriptor) ---------------------------

    def _send(self) -> None:
        while self._unsent:
            frame, fd = self._unsent[0]
            try:
                if fd is None:
                    self._socket.send(frame)
                else:
                    socket.send_fds(self._socket, [frame], [fd])
            except BlockingIOError:
                self._reactor.addWriter(self)
                return
            except OSError as e:
                if e.errno == errno.EMSGSIZE:     # this request only: too big to send
                    self._unsent.popleft()
                    if fd is not None:
                        os.close(fd)
                    self._waiting.pop(REQUEST.unpack_from(frame)[0]).errback(e)
                    continue
                log.error("fsync helper unreachable: {error}", error=str(e))
                self._drop(errno.EIO)
                return
            self._unsent.popleft()
            if fd is not None:
                os.close(fd)
        self._reactor.removeWriter(self)

    def doWrite(self) -> None:
        self._send()

    def doRead(self) -> None:
        while self._socket is not None:
            try:
                answer = self._socket.recv(ANSWER.size)
            except BlockingIOError:
                return
            except OSError:
                answer = b""
            if not answer:
                log.error("the fsync helper ended; {count} requests fail",
                          count=len(self._waiting))
                self._drop(errno.EIO)
                return
            tag, error = ANSWER.unpack(answer)
            d = self._waiting.pop(tag)
            if error:
                d.errback(OSError(error, os.strerror(error)))
            else:
                d.callback(None)

    def fileno(self) -> int:
        return self._socket.fileno() if self._socket is not None else -1

    def logPrefix(self) -> str:
        return "fsync-helper"

    def connectionLost(self, reason) -> None:
        if self._socket is not None:
            self._drop(errno.EIO)
