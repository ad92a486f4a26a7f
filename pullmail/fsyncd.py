"""
The fsync helper process (``python -m pullmail.fsyncd FD``), started by
L{pullmail.syncer.FsyncHelper}.

It reads requests from the UNIX socket FD: a frame (a tag) with one file
descriptor attached (SCM_RIGHTS).  A few threads fsync the descriptors in
parallel and answer each tag with the errno (0: on disk).  It ends when the
node closes its end of the socket.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import struct
import sys
import threading

REQUEST = struct.Struct("!Q")          # tag
ANSWER = struct.Struct("!QI")          # tag, errno (0 = done)
THREADS = 8


def serve(channel: socket.socket, threads: int = THREADS) -> None:
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    answering = threading.Lock()

    def work() -> None:
        while (job := jobs.get()) is not None:
            tag, fd = job
            try:
                os.fsync(fd)
                error = 0
            except OSError as e:
                error = e.errno or 5
            finally:
                os.close(fd)
            with answering, contextlib.suppress(OSError):   # the node is gone
                channel.sendall(ANSWER.pack(tag, error))

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    while True:
        frame, fds, _, _ = socket.recv_fds(channel, REQUEST.size, 1)
        if not frame:
            break
        (tag,) = REQUEST.unpack(frame)
        jobs.put((tag, fds[0]))
    for _ in workers:
        jobs.put(None)
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    # Ctrl-C in a terminal reaches the whole process group; the helper
    # ends when the node closes the socket, after its last answers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(socket.socket(fileno=int(sys.argv[1])))
