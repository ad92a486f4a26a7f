# -*- test-case-name: tests.test_handover -*-
"""
Retrieved mail handed to a mail store that cannot be searched (LMTP), once.

With maildirs a retrieval cut off by a crash looks in the mailboxes before
delivering again (L{pullmail.inbound.router.Router.delivered_of}).  An LMTP
store cannot be asked whether it has a message, and no order of writes
makes a delivery to it and our record of it one step: the store may commit
the message and we die before we hear (or record) its 250 (RFC 2033 offers
no way to ask afterwards).  So the doubt is made small and handled:

  1. Before the message goes to the store, the notification is written,
     durably, with C{handed_over} set (in a cluster, still taken by this
     node).  A crash before this write: the store never saw the message;
     the next retrieval delivers it, once.
  2. When the store has answered, C{handed_over} is cleared in the record
     that says what came of it: retrieved (before the SMTA hears 250), or
     deferred.  A crash after that write: the record says what happened.
  3. Between the two, the outcome is unknown.  The next retrieval of that
     notification (by this node restarted, or by another node of the
     cluster) finds C{handed_over} still set: it does not deliver the
     message again but keeps it aside, durably, in
     ``<state_dir>/in-doubt/<queue id>.eml`` with its envelope
     (L{pullmail.storage.indoubt}), logs C{retrieval-in-doubt} (error)
     naming the recipients, and answers the SMTA 250 so that it lets go.
     The operator looks in those mailboxes and re-sends the file if the
     message is not there.

The same window without a crash (the store's connection breaks after the
data) is the LMTP agent's to handle, on every path, with the same folder
and the same answer: L{pullmail.inbound.lmtp}.

No retrieved message is delivered twice to the store, and none is lost:
the window of doubt is one LMTP transaction, and what falls in it is kept
for the operator.  The price is one more durable write per retrieval with
LMTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.smtp.replies import Reply
from pullmail.storage.indoubt import InDoubt
from pullmail.storage.pending import Notification

__all__ = ["Handover", "S250_KEPT_ASIDE", "S451_TAKEN_ELSEWHERE"]

log = Logger(namespace="pullmail.pull.handover")

S250_KEPT_ASIDE = Reply(250, "2.0.0", "Ok: kept aside (an earlier delivery was cut off)")
# The record could not be marked: another node of the cluster took it.
S451_TAKEN_ELSEWHERE = Reply(451, "4.3.0", "Retrieval taken over by another node, try again")


class Handover:
    """
    The marks around a delivery of retrieved mail; C{folder} None: the
    store can be searched (maildirs), and nothing is marked.
    """

    def __init__(self, folder: Path | None, store, save: Callable, run_blocking: Callable,
                 clock: IReactorTime) -> None:
        """
        @param save: C{save(notification, keep_taken=True)}, a Deferred or
            coroutine writing the record durably (the Retriever's).
        """
        self.folder = folder
        self.kept = InDoubt(folder, run_blocking) if folder is not None else None
        self.store = store
        self.save = save
        self.clock = clock

    @property
    def marking(self) -> bool:
        """Deliveries are marked: the store cannot be searched for a copy."""
        return self.folder is not None

    def in_doubt(self, notification: Notification) -> bool:
        """An earlier delivery of it began and never said how it ended."""
        return self.folder is not None and bool(notification.handed_over)

    async def begin(self, notification: Notification) -> Reply | None:
        """
        Mark the delivery as begun, durably, before the store sees it.
        Returns a reply to give instead of delivering (the record is no
        longer ours), or None to go on.
        """
        if self.folder is None:
            return None
        notification.handed_over = self.clock.seconds()
        await self.save(notification, keep_taken=True)
        if self.store.by_key(notification.key) is not notification:
            return S451_TAKEN_ELSEWHERE
        return None

    @staticmethod
    def ended(notification: Notification) -> None:
        """The store answered: the next write of the record says how it went."""
        notification.handed_over = 0.0

    async def keep_aside(self, notification: Notification, sender: str | None,
                         recipients: Sequence[str], chunks: Sequence[bytes]) -> Reply:
        """Store the copy for the operator, durably, instead of delivering it again."""
        path = await self.kept.keep(notification.queue_id,
                                    f"{notification.gdel_id} from {notification.peer}",
                                    sender, recipients, chunks)
        maillog.RETRIEVAL_IN_DOUBT(log, id=notification.gdel_id, queue_id=notification.queue_id,
                                   recipients=list(recipients), path=str(path))
        self.ended(notification)
        return S250_KEPT_ASIDE

