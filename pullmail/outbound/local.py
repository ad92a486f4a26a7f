# -*- test-case-name: tests.test_local_queue -*-
"""
Local recipients that the mail store refused once the message was ours.

An SMTP reply to the data is one for all recipients (RFC 5321 4.1.1.4),
an LMTP store's are one per recipient (RFC 2033 4.2).  When the store took
the message for some and not for others, or when other recipients were
queued for remote domains, the client must hear ``250``, so the node takes
over: the recipients refused with 4xx wait here, durably, before that
``250``, and are delivered again on ``[delivery] push_retry`` until
``push_lifetime`` (then a 4.4.7 bounce); those refused with 5xx bounce
(RFC 3464), the DSN stored before the ``250`` too.  (When every local
recipient fared alike and nothing else was queued, the router passes the
store's reply straight back instead and nothing waits here.)

The entries are L{OutboxEntry} records in an outbox folder of their own
(``<state_dir>/local-queue``): one per message, its domain field unused.
"""

from __future__ import annotations

from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.config import DeliveryConfig
from pullmail.ids import new_gdel_id
from pullmail.interfaces import DeliveryOutcome, IDeliveryAgent, IOutbox
from pullmail.outbound import bounce
from pullmail.outbound.bouncer import Reports
from pullmail.scheduling.schedule import push_retry_at
from pullmail.scheduling.timers import DueQueue
from pullmail.smtp.replies import Reply
from pullmail.storage.outbox import OutboxEntry

__all__ = ["LocalQueue"]

log = Logger(namespace="pullmail.outbound.local")

# The domain field of a local-queue entry: its recipients are all local.
LOCAL = "(local)"


class LocalQueue:
    def __init__(
        self,
        *,
        store: IOutbox,
        agent: IDeliveryAgent,
        clock: IReactorTime,
        run_blocking: Callable,
        hostname: str,
        config: DeliveryConfig,
        send_bounce: Callable[[str, bytes], object],
        sender_authorised: Callable[[str, str], defer.Deferred] | None = None,
        reports: Reports | None = None,
    ) -> None:
        self.store = store
        self.agent = agent
        self.clock = clock
        self.run_blocking = run_blocking
        self.hostname = hostname
        self.config = config
        self.reports = reports or Reports(hostname, clock, send_bounce, sender_authorised)
        self._due = DueQueue(clock, self._wake)
        self._running: set[str] = set()

    def start(self) -> None:
        self.store.load()
        for entry in self.store.entries():
            self._due.add(entry.next_attempt, entry.id)
        self._due.arm()
        maillog.LOCAL_QUEUE_LOADED(log, count=len(self.store))

    def stop(self) -> None:
        self._due.stop()

    # -- the operator (``pullmail queue``) -------------------------------------------

    def entries(self) -> list[OutboxEntry]:
        return list(self.store.entries())

    def flush(self) -> None:
        """Every waiting entry is due now (``pullmail queue --flush``)."""
        now = self.clock.seconds()
        for entry in self.store.entries():
            if entry.id not in self._running:
                entry.next_attempt = now
                self._due.add(now, entry.id)
        self._due.arm()

    def delete(self, entry_id: str) -> bool:
        """Drop an entry without a bounce (``pullmail queue --delete``); not mid-attempt."""
        if self.store.get(entry_id) is None or entry_id in self._running:
            return False
        self.store.remove(entry_id)
        return True

    def take(self, queue_id: str, sender: str, outcome: DeliveryOutcome,
             chunks: Sequence[bytes], origin: str | None = None,
             dsn_params: dict | None = None) -> defer.Deferred:
        """
        Take responsibility for the recipients C{outcome} refused: fires once
        the 4xx ones are queued and the 5xx ones' DSN is stored, so that the
        caller may say ``250``; fails (OSError) when either could not be.
        C{dsn_params} (L{pullmail.smtp.dsn}) stay with the queued entry for
        its later reports.
        """
        now = self.clock.seconds()
        entry = OutboxEntry(
            id=new_gdel_id(), queue_id=queue_id, sender=sender, domain=LOCAL,
            recipients=outcome.transient(), created=now, size=sum(map(len, chunks)),
            attempts=1, origin=origin, dsn=dsn_params or {},
        )
        return defer.Deferred.fromCoroutine(self._take(entry, outcome, list(chunks)))

    async def _take(self, entry: OutboxEntry, outcome: DeliveryOutcome,
                    chunks: list[bytes]) -> None:
        if entry.recipients:
            entry.last_error = str(outcome.refused[entry.recipients[0]])[:500]
            entry.next_attempt = self._next_attempt(entry, entry.created)
            await self.run_blocking(self.store.add, [entry], chunks)
            self._due.add(entry.next_attempt, entry.id)
            self._due.arm()
            maillog.LOCAL_DEFERRED(
                log, queue_id=entry.queue_id, recipients=entry.recipients, id=entry.id,
                when=entry.next_attempt, reason=entry.last_error,
            )
        await self._report(entry, b"".join(chunks), [
            _failed(address, outcome.refused[address]) for address in outcome.permanent()
        ])

    def _next_attempt(self, entry: OutboxEntry, now: float) -> float | None:
        return push_retry_at(entry.attempts, now, entry.created, self.config.push_retry,
                             self.config.push_lifetime)

    # -- retries ------------------------------------------------------------------

    def _wake(self) -> None:
        now = self.clock.seconds()
        while self._due.due_now(now):
            due, entry_id = self._due.pop()
            entry = self.store.get(entry_id)
            if entry is None or entry_id in self._running or entry.next_attempt != due:
                continue
            self._running.add(entry_id)
            d = defer.Deferred.fromCoroutine(self._attempt(entry))
            d.addErrback(lambda f, i=entry_id: log.failure("local retry of {id}", f, id=i))
            d.addBoth(lambda _, i=entry_id: self._running.discard(i))
        self._due.arm()

    async def _attempt(self, entry: OutboxEntry) -> None:
        message = await self.run_blocking(self.store.read_message, entry.id)
        try:
            outcome = await self.agent.deliver(entry.queue_id, entry.sender, entry.recipients,
                                               [message])
        except OSError as e:
            failed = Reply(451, "4.3.0", f"local delivery failed: {e}")
            outcome = DeliveryOutcome(refused={r: failed for r in entry.recipients})
        now = self.clock.seconds()
        failed = [_failed(a, outcome.refused[a]) for a in outcome.permanent()]
        transient = outcome.transient()
        entry.attempts += 1
        when = self._next_attempt(entry, now) if transient else None
        if transient:
            entry.last_error = str(outcome.refused[transient[0]])[:500]
        if transient and when is None:
            failed += [bounce.FailedRecipient(
                r, "4.4.7", f"delivery time expired; last error: {entry.last_error}", None)
                for r in transient]
        maillog.LOCAL_ATTEMPT(
            log, id=entry.id, queue_id=entry.queue_id, delivered=list(outcome.delivered),
            refused=[f.address for f in failed], deferred=transient if when else [],
        )
        bounced = self._reports_after(entry, message, failed, list(outcome.delivered))
        if when is None:
            self.store.remove(entry.id, after=defer.Deferred.fromCoroutine(bounced))
            return
        entry.recipients, entry.next_attempt = transient, when
        self.store.update(entry)
        self._due.add(when, entry.id)
        self._due.arm()
        await bounced

    # -- reports ------------------------------------------------------------------

    async def _reports_after(self, entry: OutboxEntry, message: bytes,
                             failed: list[bounce.FailedRecipient], delivered: list[str]) -> None:
        """A retry's reports: failures, and final delivery (RFC 3461 4.1, NOTIFY=SUCCESS)."""
        await self._report(entry, message, failed)
        await self._report(entry, message, [
            bounce.FailedRecipient(r, "2.0.0", None, None, "delivered") for r in delivered
        ], "delivered")

    async def _report(self, entry: OutboxEntry, message: bytes,
                      failed: list[bounce.FailedRecipient], action: str = "failed") -> None:
        """
        One DSN on C{failed} (or, C{action} ``delivered``, a success report)
        as the entry's DSN parameters ask (L{Reports}): none to a null
        sender or one SPF does not back.
        """
        sent = await self.reports.send(
            queue_id=entry.queue_id, sender=entry.sender, dsn_params=entry.dsn,
            origin=entry.origin, arrival=entry.created, recipients=failed, action=action,
            original=message,
        )
        if sent:
            maillog.LOCAL_BOUNCED(log, queue_id=entry.queue_id, sender=entry.sender,
                                  recipients=sent, action=action)


def _failed(address: str, reply: Reply) -> bounce.FailedRecipient:
    return bounce.FailedRecipient(
        address, reply.enhanced or f"{reply.code // 100}.0.0",
        f"{reply.code} {reply.enhanced} {reply.text}".strip(), None,
    )
