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
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail.interfaces import ITrustPolicy
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, mail_host_addresses
from pullmail.pull.verbs import Notify, TurnMachine
from pullmail.scheduling.schedule import retrieval_at
from pullmail.scheduling.timers import DueQueue
from pullmail.smtp import replies
from pullmail.smtp.client import open_session
from pullmail.smtp.envelope import Session
from pullmail.smtp.replies import Reply, storage_failure
from pullmail.smtp.server import Deliver, ServerPolicy
from pullmail.storage.pending import PENDING, RETRIEVED, Notification, PendingStore
from pullmail.trust.spf import SPFIdentity

__all__ = ["Retriever"]

log = Logger(namespace="pullmail.pull.retrieve")

# Retrieval connections open at once, in all and to one notifying address.
MAX_CONNECTIONS = 20
CONNECTIONS_PER_PEER = 4
# Notifications an open connection takes from its peer's line at a time.
RETRS_PER_TAKE = 10


class Retriever:
    def __init__(
        self,
        *,
        store: PendingStore,
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
    ) -> None:
        self.store_file = store_file
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
        self._recent: dict[str, deque[float]] = {}   # RETRs sent per peer, last minute
        self.policy = policy
        self.deliver = deliver
        self.client_tls = client_tls
        self._due_queue = DueQueue(clock, self._wake)
        self._held: dict[str, deque[Notification]] = {}   # due, waiting for a connection
        self._held_keys: set[str] = set()
        self._connections: dict[str, int] = {}            # open, per peer
        self._open = 0
        self._dispatching = self._dispatch_again = False

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
        self._due_queue.stop()

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

    def __call__(self, connection, request: Notify) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.notify(request))

    async def notify(self, request: Notify) -> Reply:
        session = request.session
        envelope = request.envelope
        sender = envelope.sender if envelope is not None else None
        identity = sender.rpartition("@")[2] if sender else session.helo
        verdict = await self.trust.check(session.peer, identity, session.helo, sender)
        if verdict is not None:
            log.info("notification {id} from {peer} ({identity}) refused: {reply}",
                     id=request.gdel_id, peer=session.peer, identity=identity,
                     reply=str(verdict), event="notification-refused", code=verdict.code)
            return verdict
        now = self.clock.seconds()
        existing = self.store.get(identity, request.gdel_id)
        if existing is not None and existing.state == PENDING:
            return self._accepted(request.gdel_id)
        if existing is None and self.store.pending_from(session.peer) >= self.pending_per_origin:
            return replies.S452_TOO_MANY_PENDING
        notification = existing or Notification(
            gdel_id=request.gdel_id, origin=identity.lower(), peer=session.peer,
            helo=session.helo, sender=sender,
            recipients=list(envelope.recipients) if envelope is not None else None,
            notified_at=now, size=envelope.size if envelope is not None else None,
        )
        # A re-notified id that was retrieved before is fetched again, so the
        # SMTA sees its 250, but its copy is dropped at delivery.
        notification.state, notification.attempts = PENDING, 0
        notification.notified_at, notification.peer = now, session.peer
        notification.next_attempt = retrieval_at(0, now, self.schedule)
        try:
            await self._save(notification)
        except OSError as e:
            log.error("storing notification {id} failed: {error}", id=request.gdel_id,
                      error=str(e), event="store-failed")
            return storage_failure(e)
        log.info("notification {id} from {peer} ({identity}) for {recipients} accepted",
                 id=request.gdel_id, peer=session.peer, identity=identity,
                 recipients=notification.recipients, event="notified")
        self._push(notification)
        self._arm()
        return self._accepted(request.gdel_id)

    async def _save(self, notification: Notification) -> None:
        """
        Store a record durably.  With C{store_file} (the fsync helper's
        store) the whole write happens outside this process's GIL.
        """
        if self.store_file is None:
            await self.run_blocking(self.store.save, notification)
            return
        temporary, final = self.store.paths_for(notification)
        await self.store_file(temporary, final, notification.to_json())
        self.store.remember(notification)

    @staticmethod
    def _accepted(gdel_id: str) -> Reply:
        return Reply(250, "2.0.0", f"{gdel_id} notification accepted")

    # -- the timer --------------------------------------------------------------------

    def _due(self, notification: Notification) -> float:
        if notification.state == PENDING:
            return notification.next_attempt
        return notification.keep_until

    def _push(self, notification: Notification) -> None:
        self._due_queue.add(self._due(notification), notification.key)

    def _arm(self) -> None:
        self._due_queue.arm()

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
            self.store.remove(notification)
        return bool(found)

    def _wake(self) -> None:
        """Move due notifications to their peer's line; open connections."""
        now = self.clock.seconds()
        while self._due_queue.due_now(now):
            due, key = self._due_queue.pop()
            notification = self.store.by_key(key)
            if notification is None or self._due(notification) != due or key in self._held_keys:
                continue
            if notification.state == RETRIEVED:
                self.store.remove(notification)
                continue
            next_slot = self._rate_limited(notification.peer, now)
            if next_slot is not None:
                notification.next_attempt = next_slot
                self._push(notification)
                continue
            self._held.setdefault(notification.peer, deque()).append(notification)
            self._held_keys.add(key)
        self._forget_quiet_peers(now)
        self._dispatch()
        self._arm()

    def _dispatch(self) -> None:
        """
        Give held notifications connections: up to CONNECTIONS_PER_PEER per
        peer, MAX_CONNECTIONS in all, the line of a peer shared evenly
        between its free connections.  Costs O(peers), not O(notifications).
        A connection that ends at once asks again; that is done here, after
        this pass, not inside it.
        """
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                self._dispatch_once()
        finally:
            self._dispatching = False

    def _dispatch_once(self) -> None:
        for peer in list(self._held):
            held = self._held[peer]
            while held and self._open < MAX_CONNECTIONS and (
                self._connections.get(peer, 0) < CONNECTIONS_PER_PEER
            ):
                batch = self._take(peer, -(-len(held) // CONNECTIONS_PER_PEER))
                if batch:
                    self._connect_to(peer, batch)
            if not held:
                self._held.pop(peer, None)

    def _take(self, peer: str, count: int) -> list[Notification]:
        """Up to C{count} still-pending notifications from C{peer}'s line."""
        held = self._held.get(peer)
        batch: list[Notification] = []
        while held and len(batch) < count:
            notification = held.popleft()
            self._held_keys.discard(notification.key)
            if self.store.by_key(notification.key) is notification and (
                notification.state == PENDING
            ):
                batch.append(notification)
        return batch

    def _connect_to(self, peer: str, batch: list[Notification]) -> None:
        self._open += 1
        self._connections[peer] = self._connections.get(peer, 0) + 1
        d = defer.Deferred.fromCoroutine(self._retrieve_from(peer, batch))
        d.addErrback(lambda f: log.failure("retrieval from {peer}", f, peer=peer))
        d.addBoth(lambda _: self._peer_done(peer))

    def _rate_limited(self, peer: str, now: float) -> float | None:
        """
        Count one RETR to C{peer}; when its last minute is full, return the
        time a slot opens instead (a flood of notifications from one origin
        cannot make us hammer it, or anyone else).
        """
        sent = self._recent.setdefault(peer, deque())
        while sent and sent[0] <= now - 60:
            sent.popleft()
        if len(sent) >= self.per_minute:
            return sent[0] + 60
        sent.append(now)
        return None

    def _forget_quiet_peers(self, now: float) -> None:
        for peer in [p for p, sent in self._recent.items() if not sent or sent[-1] <= now - 60]:
            del self._recent[peer]

    def _peer_done(self, peer: str) -> None:
        self._open -= 1
        left = self._connections.pop(peer) - 1
        if left:
            self._connections[peer] = left
        self._dispatch()
        self._arm()

    # -- one connection ------------------------------------------------------------------

    async def _retrieve_from(self, peer: str, notifications: list[Notification]) -> None:
        """
        SPEC 4: connect to the address that notified; if it does not
        answer, to the origin domain's MX hosts whose addresses pass the
        same SPF check (a cluster sharing its outbox) -- never to any other.
        """
        connection, error = await self._connect(peer)
        if connection is not None:
            await self._run(connection, peer, notifications)
            return
        by_origin: dict[str, list[Notification]] = {}
        for notification in notifications:
            by_origin.setdefault(notification.origin, []).append(notification)
        for origin, group in by_origin.items():
            for address in await self._cluster_addresses(origin, peer):
                connection, _ = await self._connect(address)
                if connection is not None:
                    log.info("{peer} did not answer; retrieving from {address}, an MX of "
                             "{origin} that passes SPF", peer=peer, address=address,
                             origin=origin, event="retrieval-fallback")
                    await self._run(connection, address, group)
                    break
            else:
                for notification in group:
                    self._attempt_failed(notification, f"connect: {error}")

    async def _connect(self, address: str):
        try:
            return await self.connect(address, self.remote_port), None
        except Exception as e:
            return None, e

    async def _cluster_addresses(self, origin: str, peer: str) -> list[str]:
        if self.resolver is None or self.sender_authorised is None:
            return []
        try:
            addresses = await mail_host_addresses(self.resolver, origin)
        except (DNSTemporaryError, DNSPermanentError):
            return []
        trusted = []
        for address in addresses:
            if address != peer and address not in trusted and await self.sender_authorised(
                address, f"postmaster@{origin}"
            ):
                trusted.append(address)
        return trusted

    async def _run(self, connection, address: str, notifications: list[Notification]) -> None:
        remaining = list(notifications)
        try:
            keywords = await open_session(connection, self.hostname, self.client_tls)
            if "RETR" not in keywords:
                raise ConnectionError("peer does not offer RETR")
            while remaining:
                await self._retrieve_one(connection, address, remaining[0], "_TLS" in keywords)
                remaining.pop(0)
                if not remaining and address == notifications[0].peer:
                    # Keep the connection busy while the peer's line is not empty.
                    remaining.extend(self._take(address, RETRS_PER_TAKE))
            connection.quit()
        except Exception as e:
            log.info("retrieval from {peer} broke off: {error}", peer=address, error=str(e),
                     event="retrieval-failed")
            for notification in remaining:
                self._attempt_failed(notification, str(e))
            connection.transport.loseConnection()

    async def _retrieve_one(self, connection, address: str, notification: Notification,
                            tls: bool) -> None:
        connection.send(f"RETR {notification.gdel_id}\r\n".encode("ascii"))
        reply = await connection.reply()
        log.info("RETR {id} at {peer}: {reply}", id=notification.gdel_id,
                 peer=address, reply=str(reply), event="retrieval-attempt",
                 code=reply.code)
        if reply.code != 250:
            if reply.permanent:
                self._drop(notification, f"RETR refused: {reply}")
            else:
                self._attempt_failed(notification, str(reply))
            return
        session = Session(address, "smtp", helo=notification.helo, esmtp=True, tls=tls)
        machine = TurnMachine(
            self.policy, session, sender=notification.sender,
            recipients=tuple(notification.recipients) if notification.recipients else None,
        )
        connection.performers = {Deliver: self._performer(notification)}
        await connection.serve_turn(machine)
        outcome = machine.outcome
        if outcome is not None and outcome.positive:
            return
        self._attempt_failed(notification, f"turn ended without delivery: {outcome}")

    def _performer(self, notification: Notification) -> Callable:
        async def deliver(connection, request: Deliver) -> Reply:
            # Exactly once: a notification whose delivery may have begun
            # (earlier in this process, or in one that died: every record
            # read at start-up) looks in the mailboxes first; one marked
            # retrieved is a known duplicate.  Nothing is written before a
            # delivery: the record of a crashed one is still pending.
            if notification.keep_until or (
                notification.delivering and self.delivered_of is not None
                and notification.queue_id in await self.run_blocking(
                    self.delivered_of, {notification.queue_id: request.envelope.recipients})
            ):
                reply = Reply(250, "2.0.0", "Ok: already delivered, duplicate dropped")
                log.info("duplicate {id} from {peer} dropped", id=notification.gdel_id,
                         peer=notification.peer, event="duplicate")
            else:
                notification.delivering = True
                # SPEC 11.1: SPF asks about the notifying session.
                reply = await self.deliver(
                    request.session, request.envelope, request.chunks, request.size,
                    queue_id=notification.queue_id, identity=SPFIdentity(
                        notification.peer, notification.helo, notification.sender or ""))
            if reply.positive:
                notification.state = RETRIEVED
                notification.keep_until = self.clock.seconds() + self.keep_for
                await self._save(notification)
                log.info("retrieved {id} from {peer}", id=notification.gdel_id,
                         peer=notification.peer, event="retrieved")
                self._push(notification)
            return reply

        return lambda connection, request: defer.Deferred.fromCoroutine(
            deliver(connection, request)
        )

    def _attempt_failed(self, notification: Notification, reason: str) -> None:
        notification.attempts += 1
        notification.last_error = reason[:500]
        when = retrieval_at(notification.attempts, notification.notified_at, self.schedule)
        if when is None:
            self._drop(notification, f"schedule used up; last error: {reason}")
            return
        notification.next_attempt = max(when, self.clock.seconds())
        log.info("retrieval of {id} from {peer} failed ({reason}); next attempt at {when}",
                 id=notification.gdel_id, peer=notification.peer, reason=reason,
                 when=notification.next_attempt, attempts=notification.attempts,
                 event="retrieval-deferred")
        d = defer.Deferred.fromCoroutine(self._save(notification))
        d.addCallback(lambda _: (self._push(notification), self._arm()))
        d.addErrback(lambda f: log.failure("saving notification {id}", f,
                                           id=notification.gdel_id))

    def _drop(self, notification: Notification, reason: str) -> None:
        log.warn("dropping notification {id} from {peer}: {reason}", id=notification.gdel_id,
                 peer=notification.peer, reason=reason, event="notification-dropped")
        self.store.remove(notification)
