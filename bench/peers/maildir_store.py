"""
The durable maildir write both script peers make before their 250, the way
pullmail does: write into tmp/, fsync the file, rename into new/, fsync new/
(maildir(5); the rename is durable only once the directory is synced).
Standard library only: the aiosmtpd peer runs in the bench venv, the floor
peer in the project's.
"""

from __future__ import annotations

import itertools
import os
import socket
import time


class Maildir:
    def __init__(self, root: str) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        self.new_fd = os.open(os.path.join(root, "new"), os.O_RDONLY | os.O_DIRECTORY)
        self.counter = itertools.count()
        self.tail = f"P{os.getpid()}.{socket.gethostname()}"

    def store(self, data: bytes) -> str:
        """Make C{data} durable in new/; its file name."""
        name = f"{time.time():.6f}.Q{next(self.counter)}{self.tail}"
        tmp = os.path.join(self.root, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.root, "new", name))
        os.fsync(self.new_fd)
        return name
