# -*- test-case-name: tests.test_postgresql -*-
"""
Retrieval in a cluster (SPEC 11.3), the receiving side's counterpart of
L{pullmail.outbound.cluster}: each node keeps its own timers over the
notifications it knows, but when one comes due it is *taken* in the shared
store first, so that one node retrieves it (or forgets it); notifications
of other nodes come in through the periodic poll and LISTEN/NOTIFY.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer

from pullmail.storage.pending import PENDING, RETRIEVED, Notification
from pullmail.storage.postgresql.database import take_once

if TYPE_CHECKING:
    from pullmail.pull.retrieve import Retriever

__all__ = ["ClusterRetrieval"]


class ClusterRetrieval:
    """The due notifications of one node of a cluster, for its L{Retriever}."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever
        self._taking: set[str] = set()   # keys being taken

    def take_due(self, key: str) -> None:
        """The notification's due time came here: take it in the store, then line it up."""
        take_once(self._taking, key, self.retriever.store.take, self._taken)

    def _taken(self, notification: Notification | None) -> defer.Deferred | None:
        if notification is None:
            return None   # gone, or another node has it
        retriever = self.retriever
        now = retriever.clock.seconds()
        if notification.state == RETRIEVED and notification.keep_until <= now:
            return retriever.run_blocking(retriever.store.remove, notification)
        if notification.state == PENDING and notification.held:
            # `pullmail queue hold` from any node: let the row go, due never.
            return defer.Deferred.fromCoroutine(retriever._save(notification))
        if notification.state == PENDING and notification.next_attempt <= now:
            retriever._line_up(notification, now)
            retriever._dispatcher.dispatch()
            retriever._arm()
            return None
        # Our copy was stale: another node moved it on.  Let it go again.
        d = defer.Deferred.fromCoroutine(retriever._save(notification))
        return d.addCallback(lambda _: (retriever._push(notification), retriever._arm()))

    def polled(self, notifications) -> None:
        """Notifications due that no node holds, found by the cluster's poll."""
        retriever = self.retriever
        for notification in notifications:
            if not retriever._dispatcher.busy(notification.key):
                retriever._push(notification)
        retriever._arm()
