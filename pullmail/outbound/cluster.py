# -*- test-case-name: tests.test_postgresql -*-
"""
Outbound work in a cluster (SPEC 11.3): each node keeps its own timers
over the entries it knows, but when an entry comes due it is *taken* in
the shared outbox first, so that exactly one node sends each notification,
pushes each message, runs each expiry and writes each bounce.  Entries of
other nodes (a node that died, a flush) come in through the periodic poll
and the LISTEN/NOTIFY wake-ups of L{pullmail.storage.postgresql.watch}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pullmail.outbound.lifecycle import ClaimReleased, Due, due_at
from pullmail.storage.postgresql.database import take_once

if TYPE_CHECKING:
    from pullmail.outbound.delivery import Outbound

__all__ = ["ClusterWork"]


class ClusterWork:
    """The due work of one node of a cluster, for its L{Outbound}."""

    def __init__(self, outbound: Outbound) -> None:
        self.outbound = outbound
        self._taking: set[str] = set()

    def take_due(self, entry_id: str) -> None:
        """The entry's due time came here: take it in the database, then step it."""
        take_once(self._taking, entry_id, self.outbound.outbox.take, self._taken)

    def _taken(self, entry) -> None:
        if entry is None:
            return   # gone, or another node has it
        outbound = self.outbound
        due = due_at(entry, outbound.config)
        if due is None:
            if not entry.claimed:
                outbound.outbox.update(entry)   # nothing to do (held): let it go
            return
        if due > outbound.clock.seconds():
            # Our copy was stale: another node moved it on.  Let it go again.
            outbound.outbox.update(entry)
            outbound._dispatcher.schedule(due, entry.id)
        else:
            outbound._step(entry, Due())
            outbound._dispatcher.dispatch()
        outbound._arm()

    def polled(self, found) -> None:
        """What the poll found: entries due that no node holds, transfers released."""
        due, released = found
        outbound = self.outbound
        for entry in released:
            outbound._step(entry, ClaimReleased())
        for entry in due:
            if not outbound._dispatcher.busy(entry.id):
                outbound._push(entry)
        outbound._arm()
