"""
The RMTA's side of General Delivery (SPEC 3-5): taking notifications, and
retrieving the messages they announce.

A notification is trust-checked before the reply, stored durably, and
scheduled on ``[retrieval] schedule``.  When it is due, the retriever
connects back to the address that notified it (the only address that has
passed the check), says ``RETR <id>``, and on ``250`` serves the SMTA's turn
with a L{TurnMachine}: the message goes through the same router, with the
same durability, as pushed mail.  One connection carries every due id of
that address.  A ``5xx`` to RETR, or the end of the schedule, drops the
notification (logged).

This module keeps the records and the schedule; L{fetch} runs the
connections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.interfaces import IPendingStore, ITrustPolicy
from pullmail.logsafe import printable
from pullmail.pull.cluster import ClusterRetrieval
from pullmail.pull.fetch import Fetcher
from pullmail.pull.handover import Handover
from pullmail.pull.verbs import Notify
from pullmail.scheduling.dispatch import Dispatcher, Work
from pullmail.scheduling.rate import RateWindow
from pullmail.scheduling.schedule import retrieval_at
from pullmail.smtp import dsn, replies
from pullmail.smtp.replies import Reply, storage_failure
from pullmail.smtp.server import ServerPolicy
from pullmail.storage.pending import (
    PENDING,
    RETRIEVED,
    Notification,
    RecordWrites,
    TooManyPending,
)

__all__ = ["Retriever"]

log = Logger(namespace="pullmail.pull.retrieve")

# Retrieval connections open at once, in all and to one notifying address.
MAX_CONNECTIONS = 20
CONNECTIONS_PER_PEER = 4


class Retriever:
    def __init__(
        self,
        *,
        store: IPendingStore,
        trust: ITrustPolicy,
        connect: Callable,
        clock: IReactorTime,
        run_blocking: Callable,
        hostname: str,
        schedule: tuple[float, ...],
        remote_port: int,
        keep_for: float,
        pending_per_origin: int,
        policy: ServerPolicy,
        per_minute: int = 600,
        deliver: Callable,
        client_tls=None,
        resolver=None,
        sender_authorised: Callable[[str, str], defer.Deferred] | None = None,
        store_file: Callable[[str, str, bytes], defer.Deferred] | None = None,
        delivered_of: Callable[[Mapping[str, Sequence[str]]], set[str]] | None = None,
        mx_limit: int = 5,
        blocked_networks: tuple = (),
        in_doubt: Path | None = None,
        connection_cache_time: float = 0.0,
    ) -> None:
        """
        @param in_doubt: with a mail store that cannot be searched (LMTP),
            the folder for copies whose earlier delivery was cut off
            (L{Handover}); None with maildirs.
        @param connection_cache_time: how long a retrieval connection idles
            for the next notification of its peer.
        """
        self.connection_cache_time = connection_cache_time
        self.mx_limit = mx_limit
        self.blocked_networks = tuple(blocked_networks)
        self.delivered_of = delivered_of
        self.store = store
        self.resolver = resolver
        self.sender_authorised = sender_authorised
        self.trust = trust
        self.connect = connect
        self.clock = clock
        self.run_blocking = run_blocking
        self.hostname = hostname
        self.schedule = schedule
        self.remote_port = remote_port
        self.keep_for = keep_for
        self.pending_per_origin = pending_per_origin
        self.per_minute = per_minute
        # RETRs sent per peer in the last minute: a flood of notifications
        # from one origin cannot make us hammer it, or anyone else.
        self._rate = RateWindow(per_minute, 60.0)
        self.policy = policy
        self.deliver = deliver
        self.client_tls = client_tls
        # Connections up to CONNECTIONS_PER_PEER per peer, MAX_CONNECTIONS
        # in all, each taking its share of the peer's line.
        self._dispatcher: Dispatcher[Notification] = Dispatcher(
            clock, wake=self._wake, start=self._connect_to, ident=lambda n: n.key,
            total=MAX_CONNECTIONS, per_key=CONNECTIONS_PER_PEER, current=self._current,
            spare=1,
        )
        self._fetcher = Fetcher(self, self._dispatcher)
        self.cluster = ClusterRetrieval(self)
        self.handover = Handover(
            in_doubt, store,
            lambda notification, keep_taken: defer.Deferred.fromCoroutine(
                self._save(notification, keep_taken=keep_taken)),
            run_blocking, clock)
        self._records = RecordWrites(store, run_blocking, store_file)

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Resume from stored state: due times are kept, not restarted."""
        self.store.load()
        self._look_for_interrupted_deliveries()
        for notification in self.store:
            self._push(notification)
        self._arm()
        log.info("{count} notifications loaded", count=len(self.store))

    def stop(self) -> None:
        self._dispatcher.stop()

    def _look_for_interrupted_deliveries(self) -> None:
        """
        Blocking, at start-up.  Every pending record read may be one whose
        delivery the dead process had begun (nothing is written before a
        delivery), so its retrieval would look in the mailboxes first.  One
        look now, each mailbox concerned listed once, clears the many whose
        message is nowhere; only those found are looked for again when
        retrieved.  (A turn's recipients are bound to the notification's.)
        """
        if self.delivered_of is None:
            return
        suspects = [n for n in self.store if n.delivering and n.recipients]
        found = self.delivered_of({n.queue_id: n.recipients for n in suspects}) if suspects else set()
        for notification in suspects:
            notification.delivering = notification.queue_id in found

    # -- notifications (the Notify performer) ----------------------------------------

    # Each refusal of a notification is logged here, once, with what the
    # protocol's command-rejected would say (L{SMTPServerFactory}).
    logs_refusals = True

    def __call__(self, connection, request: Notify) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.notify(request))

    async def notify(self, request: Notify) -> Reply:
        session = request.session
        envelope = request.envelope
        sender = envelope.sender if envelope is not None else None
        identity = sender.rpartition("@")[2] if sender else session.helo
        verdict = await self.trust.check(session.peer, identity, session.helo, sender)
        if verdict is not None:
            return _refused(request, identity, verdict)
        now = self.clock.seconds()
        try:
            existing = await self.store.find(identity, request.gdel_id)
        except OSError as e:   # a shared store out of reach (SPEC 11.3)
            return _refused(request, identity, _store_failed(request.gdel_id, e))
        if existing is not None and existing.state == PENDING:
            if self._dispatcher.busy(existing.key):
                # Being retrieved now, perhaps from another node of the
                # notifier's cluster: retrieve once more when that is done.
                existing.notified_again = True
            return _accepted(request.gdel_id)
        # A shared store counts the peer's notifications of the whole
        # cluster as it inserts (SPEC 11.3); this node's index knows only some.
        limit = self.pending_per_origin if existing is None else None
        if limit is not None and not self.store.shared \
                and self.store.pending_from(session.peer) >= limit:
            return _refused(request, identity, replies.S452_TOO_MANY_PENDING)
        notification = existing or Notification(
            gdel_id=request.gdel_id, origin=identity.lower(), peer=session.peer,
            helo=session.helo, sender=sender,
            recipients=list(envelope.recipients) if envelope is not None else None,
            notified_at=now, size=envelope.size if envelope is not None else None,
            dsn=dsn.for_recipients(envelope.params, envelope.rcpt_params)
            if envelope is not None else {},
        )
        # A re-notified id that was retrieved before is fetched again, so the
        # SMTA sees its 250, but its copy is dropped at delivery.
        self._pend_again(notification, now)
        notification.notified_at, notification.peer = now, session.peer
        notification.esmtp = session.esmtp     # what the turn may use (SPEC 4)
        try:
            await self._save(notification, limit)
        except TooManyPending:
            return _refused(request, identity, replies.S452_TOO_MANY_PENDING)
        except OSError as e:
            return _refused(request, identity, _store_failed(request.gdel_id, e))
        maillog.NOTIFICATION_ACCEPTED(
            log, id=request.gdel_id, peer=session.peer, identity=identity,
            recipients=notification.recipients,
        )
        self._push(notification)
        self._arm()
        return _accepted(request.gdel_id)

    async def _save(self, notification: Notification, limit: int | None = None,
                    keep_taken: bool = False) -> None:
        """
        Store a record durably, after the writes of it asked before
        (L{RecordWrites}).  The store checks C{limit} as it writes; through
        the fsync helper it cannot, and L{notify} checked it just before.
        """
        await self._records.save(notification, limit, keep_taken)

    # -- the timer --------------------------------------------------------------------

    def _due(self, notification: Notification) -> float:
        if notification.state == PENDING:
            return notification.next_attempt
        return notification.keep_until

    def _push(self, notification: Notification) -> None:
        self._dispatcher.schedule(self._due(notification), notification.key)

    def _arm(self) -> None:
        self._dispatcher.arm()

    def flush(self) -> None:
        now = self.clock.seconds()
        for notification in self.store:
            if notification.state == PENDING:
                notification.next_attempt = now
                self._push(notification)
        self._arm()

    def delete(self, gdel_id: str) -> bool:
        """Forget every notification with this id (``pullmail queue --delete``)."""
        found = [n for n in self.store if n.gdel_id == gdel_id]
        for notification in found:
            self._records.forget(notification)
        return bool(found)

    def _wake(self) -> None:
        """Move due notifications to their peer's line; open connections."""
        now = self.clock.seconds()
        for due, key in self._dispatcher.due(now):
            notification = self.store.by_key(key)
            if notification is None or self._due(notification) != due:
                continue
            if self.store.shared:
                self.cluster.take_due(key)
            elif notification.state == RETRIEVED:
                self._records.forget(notification)
            else:
                self._line_up(notification, now)
        self._rate.forget_quiet(now)
        self._dispatcher.dispatch()
        self._arm()

    def _line_up(self, notification: Notification, now: float) -> None:
        next_slot = self._rate.count(notification.peer, now)
        if next_slot is not None:
            notification.next_attempt = next_slot
            self._push(notification)
            return
        self._dispatcher.line_up(notification.peer, notification)

    def polled(self, notifications) -> None:
        """Notifications due that no node holds, found by the cluster's poll."""
        self.cluster.polled(notifications)

    def _current(self, notification: Notification) -> bool:
        """Still pending, not held, and still the stored record (not deleted meanwhile)."""
        return self.store.by_key(notification.key) is notification and (
            notification.state == PENDING and not notification.held
        )

    def _connect_to(self, work: Work[Notification]) -> None:
        d = defer.Deferred.fromCoroutine(self._fetcher.retrieve_from(work))
        d.addErrback(lambda f: log.failure("retrieval from {peer}", f, peer=work.key))
        d.addBoth(lambda _: self._dispatcher.finished(work))

    # -- outcomes (reported by the connections' L{Fetcher}) -----------------------------

    async def retrieved(self, notification: Notification) -> None:
        """
        Delivered: keep the record, marked, until C{keep_for} has passed; or,
        when it was notified again meanwhile, retrieve it once more (the copy
        is then dropped as a duplicate), so that the re-notifier sees a 250.

        The mark is a durable write only where the copy cannot be found
        again (L{RecordWrites.retrieved}).
        """
        now = self.clock.seconds()
        notification.state, notification.handed_over = RETRIEVED, 0.0
        notification.keep_until = now + self.keep_for
        if notification.notified_again:
            notification.notified_again = False
            self._pend_again(notification, now)
        # The mark clears a handover, or stands where no copy can be found: durable then.
        searchable = self.delivered_of is not None and not self.handover.marking
        await self._records.retrieved(notification, searchable=searchable)
        maillog.RETRIEVED(log, id=notification.gdel_id, peer=notification.peer)
        self._dispatcher.done_with(notification.key)
        self._push(notification)

    def _pend_again(self, notification: Notification, now: float) -> None:
        notification.state, notification.attempts = PENDING, 0
        notification.next_attempt = retrieval_at(0, now, self.schedule)

    def attempt_failed(self, notification: Notification, reason: str) -> None:
        """Try again on the schedule, or drop it once the schedule is used up."""
        self._dispatcher.done_with(notification.key)
        notification.attempts += 1
        notification.last_error = reason[:500]
        when = retrieval_at(notification.attempts, notification.notified_at, self.schedule)
        if when is None:
            self.drop(notification, f"schedule used up; last error: {reason}")
            return
        notification.next_attempt = max(when, self.clock.seconds())
        maillog.RETRIEVAL_DEFERRED(
            log, id=notification.gdel_id, peer=notification.peer, reason=reason,
            when=notification.next_attempt, attempts=notification.attempts,
        )
        d = defer.Deferred.fromCoroutine(self._save(notification))
        d.addCallback(lambda _: (self._push(notification), self._arm()))
        d.addErrback(lambda f: log.failure("saving notification {id}", f,
                                           id=notification.gdel_id))

    def drop(self, notification: Notification, reason: str) -> None:
        maillog.NOTIFICATION_DROPPED(
            log, id=notification.gdel_id, peer=notification.peer, reason=reason,
        )
        self._dispatcher.done_with(notification.key)
        self._records.forget(notification)


def _refused(request: Notify, identity: str, reply: Reply) -> Reply:
    """
    The one event of a refused GDEL: the notification's id and identity, and
    the command's peer, verb and reply (for the replies and gdel counters).
    """
    maillog.NOTIFICATION_REFUSED(
        log, id=request.gdel_id, peer=request.session.peer, identity=identity, verb="GDEL",
        reply=printable(reply), code=reply.code,
    )
    return reply


def _store_failed(gdel_id: str, error: OSError) -> Reply:
    maillog.NOTIFICATION_STORE_FAILED(log, id=gdel_id, error=str(error))
    return storage_failure(error)


def _accepted(gdel_id: str) -> Reply:
    return Reply(250, "2.0.0", f"{gdel_id} notification accepted")
