# -*- test-case-name: tests.test_snapshot -*-
"""
Keeping the outbox's snapshot (L{pullmail.storage.snapshot}) fresh while
the node runs.  Written only at start-up, a snapshot grows stale with every
entry added, changed or removed, and a long-running node with a high
turnover would read more and more record files at its next start.

Every L{CHECK_INTERVAL} the count of entries changed since the snapshot's
listing is held against the outbox's size; past L{SNAPSHOT_SHARE} of it
the snapshot is written again in a thread (L{MaildirOutbox.refresh_snapshot}:
tmp, fsync, rename, fsync of the folder; the old one stays whole until
then).  A clean stop writes it once more if anything changed, so that the
next start reads only what changed after.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from pullmail.storage.outbox import SNAPSHOT_SHARE, MaildirOutbox, snapshot_worth_writing

__all__ = ["SnapshotRefresh", "CHECK_INTERVAL"]

CHECK_INTERVAL = 300.0


class SnapshotRefresh:
    """Writes C{outbox}'s snapshot again when enough changed, and at a clean stop."""

    def __init__(self, outbox: MaildirOutbox, clock: IReactorTime,
                 interval: float = CHECK_INTERVAL, share: float = SNAPSHOT_SHARE) -> None:
        self.outbox = outbox
        self.interval = interval
        self.share = share
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> Deferred | None:
        """A last snapshot if anything changed (not while one is being written or read)."""
        if self._loop.running:
            self._loop.stop()
        if self._busy() or not self.outbox.unsnapshotted:
            return None
        return self.outbox.refresh_snapshot()

    def check(self) -> Deferred | None:
        """The snapshot written again if more than C{share} of the entries changed since."""
        if self._busy() or not snapshot_worth_writing(
                self.outbox.unsnapshotted, len(self.outbox), self.share):
            return None
        return self.outbox.refresh_snapshot()

    def _busy(self) -> bool:
        return self.outbox.loading or self.outbox.snapshot_writing
