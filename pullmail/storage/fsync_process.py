"""
The fsync helper process (``python -m pullmail.storage.fsync_process FD NODE_PID``), started by
L{pullmail.storage.fsync_helper.FsyncHelper}.

It reads requests from the UNIX socket FD, one per datagram: FSYNC, with
one file descriptor attached (SCM_RIGHTS), or STORE, with two paths and the
data: create the first, write, fsync, rename to the second, fsync its
directory.  A few threads work in parallel and answer each tag with an
errno (0: on disk).  It ends when the node closes its end of the socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import queue
import signal
import socket
import struct
import sys
import threading

from pullmail.storage.durable import DirectorySyncs, publish_new_file

REQUEST = struct.Struct("!QBHH")      # tag, operation, path lengths (STORE)
ANSWER = struct.Struct("!QI")          # tag, errno (0 = done)
FSYNC, STORE = 1, 2
INLINE_LIMIT = 128 * 1024              # STORE data fits one datagram below this
MAX_REQUEST = REQUEST.size + 2 * 4096 + INLINE_LIMIT
THREADS = 8


def _run(request: bytes, fds: list[int], sync_directory) -> None:
    tag, operation, temporary_size, final_size = REQUEST.unpack_from(request)
    if operation == FSYNC:
        try:
            os.fsync(fds[0])
        finally:
            os.close(fds[0])
    else:
        view = memoryview(request)[REQUEST.size:]
        publish_new_file(os.fsdecode(bytes(view[:temporary_size])),
                         os.fsdecode(bytes(view[temporary_size:temporary_size + final_size])),
                         [view[temporary_size + final_size:]], sync_directory)


def serve(channel: socket.socket, threads: int = THREADS) -> None:
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    answering = threading.Lock()
    sync_directory = DirectorySyncs()

    def work() -> None:
        while (job := jobs.get()) is not None:
            request, fds = job
            try:
                _run(request, fds, sync_directory)
                error = 0
            except OSError as e:
                error = e.errno or 5
            with answering, contextlib.suppress(OSError):   # the node is gone
                channel.sendall(ANSWER.pack(REQUEST.unpack_from(request)[0], error))

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    while True:
        try:
            request, fds, flags, _ = socket.recv_fds(channel, MAX_REQUEST, 1)
        except ConnectionError:               # the node is gone (killed)
            break
        if not request:
            break
        if flags & socket.MSG_TRUNC:          # never store part of a message
            for fd in fds:
                os.close(fd)
            with answering, contextlib.suppress(OSError):
                channel.sendall(ANSWER.pack(REQUEST.unpack_from(request)[0], errno.EMSGSIZE))
            continue
        jobs.put((request, fds))
    for _ in workers:
        jobs.put(None)
    for worker in workers:
        worker.join()


def die_with_the_node(node_pid: int) -> None:
    """
    Linux: if the node is killed, so is the helper (PR_SET_PDEATHSIG), at
    once, as the node's own threads would be: nothing it had not answered
    yet becomes visible after the node's death.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != node_pid:               # the node died before that
        sys.exit(1)


if __name__ == "__main__":
    die_with_the_node(int(sys.argv[2]))
    # Ctrl-C in a terminal reaches the whole process group; the helper
    # ends when the node closes the socket, after its last answers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(socket.socket(fileno=int(sys.argv[1])))
