"""
One node per state dir: an exclusive flock(2) on ``<state_dir>/pullmail.lock``,
held for the life of the process (a daemonised twistd keeps it across the
fork: the open file is shared).  Two nodes on one outbox would each deliver
and expire the same entries.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["LOCK_NAME", "StateLocked", "lock_state_dir"]

LOCK_NAME = "pullmail.lock"


class StateLocked(Exception):
    """Another process holds the state dir."""


def lock_state_dir(state_dir: Path) -> int:
    """
    Take the lock, or raise L{StateLocked} naming the holder's pid.  Returns
    the open descriptor: the lock lasts while it stays open.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
        os.close(fd)
        raise StateLocked(
            f"state dir {state_dir} is in use by pid {holder} (lock {path}); "
            "one node per state dir"
        ) from None
    record_pid(fd)
    return fd


def record_pid(fd: int) -> None:
    """The holder's pid, for the message another node gives."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
