# -*- test-case-name: tests.test_retrieval -*-
"""
One retrieval connection (SPEC 4), for the L{Retriever}: connect back to
the notifying address (or to an MX of the same origin that passes the same
SPF check), say ``RETR <id>`` for each notification of the batch, and on
``250`` serve the SMTA's turn with a L{TurnMachine}.  Outcomes go back to
the Retriever, which keeps the records and the schedule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.internet import defer
from twisted.logger import Logger

from pullmail import maillog
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError
from pullmail.outbound import mx
from pullmail.pull.verbs import TurnMachine
from pullmail.scheduling.dispatch import Dispatcher, Work
from pullmail.smtp.client import open_session
from pullmail.smtp.envelope import Session
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import Deliver
from pullmail.storage.pending import Notification
from pullmail.trust.spf import SPFIdentity

if TYPE_CHECKING:
    from pullmail.pull.retrieve import Retriever

__all__ = ["Fetcher"]

log = Logger(namespace="pullmail.pull.fetch")

# Notifications an open connection takes from its peer's line at a time.
RETRS_PER_TAKE = 10


class Fetcher:
    """Runs the Retriever's connections, with the Retriever's settings."""

    def __init__(self, owner: Retriever, dispatcher: Dispatcher[Notification]) -> None:
        self.owner = owner
        self.dispatcher = dispatcher

    async def retrieve_from(self, work: Work[Notification]) -> None:
        """
        SPEC 4: connect to the address that notified; if it does not
        answer, to the origin domain's MX hosts whose addresses pass the
        same SPF check (a cluster sharing its outbox) -- never to any other.
        """
        peer, notifications = work.key, list(work.items)
        connection, error = await self._connect(peer)
        if connection is not None:
            await self._run(connection, peer, notifications, work)
            return
        by_origin: dict[str, list[Notification]] = {}
        for notification in notifications:
            by_origin.setdefault(notification.origin, []).append(notification)
        for origin, group in by_origin.items():
            for address in await self._cluster_addresses(origin, peer):
                connection, _ = await self._connect(address)
                if connection is not None:
                    maillog.RETRIEVAL_FALLBACK(log, peer=peer, address=address, origin=origin)
                    await self._run(connection, address, group)
                    break
            else:
                for notification in group:
                    self.owner.attempt_failed(notification, f"connect: {error}")

    async def _connect(self, address: str):
        try:
            return await self.owner.connect(address, self.owner.remote_port), None
        except Exception as e:
            return None, e

    async def _cluster_addresses(self, origin: str, peer: str) -> list[str]:
        owner = self.owner
        if owner.resolver is None or owner.sender_authorised is None:
            return []
        try:
            hosts = mx.mail_hosts(origin, await owner.resolver.mx(origin), owner.mx_limit)
        except (DNSTemporaryError, DNSPermanentError, mx.NullMX):
            return []
        # Issue 18: one GDEL buys at most mx_limit addresses, the peer's
        # included, and never one in a blocked network.
        picker = mx.TargetPicker(owner.mx_limit, owner.blocked_networks)
        picker.offer("", [peer])
        trusted = []
        for host in hosts:
            if picker.full:
                break
            try:
                addresses = await owner.resolver.addresses(host)
            except (DNSTemporaryError, DNSPermanentError):
                continue
            for target in picker.offer(host, addresses):
                if await owner.sender_authorised(target.address, f"postmaster@{origin}"):
                    trusted.append(target.address)
        return trusted

    async def _run(self, connection, address: str, notifications: list[Notification],
                   work: Work[Notification] | None = None) -> None:
        """C{work}: the peer's line to keep the connection busy with."""
        remaining = list(notifications)
        try:
            session = await open_session(connection, self.owner.hostname, self.owner.client_tls)
            if "RETR" not in session.keywords:
                raise ConnectionError("peer does not offer RETR")
            if work is not None:
                self.dispatcher.ready(work)
            while remaining:
                await self._retrieve_one(connection, address, remaining[0], session.tls)
                remaining.pop(0)
                if not remaining and work is not None:
                    # Keep the connection busy while the peer's line is not
                    # empty, and idle a while for the next notification
                    # (SPEC 4: after a turn, "RETR <next-id> or QUIT").
                    remaining.extend(await self.dispatcher.wait_for_more(
                        work, RETRS_PER_TAKE, self.owner.connection_cache_time))
                    if remaining and not connection.usable():
                        self.dispatcher.give_back(work, remaining)
                        remaining = []
            connection.quit()
        except Exception as e:
            maillog.RETRIEVAL_FAILED(log, peer=address, error=str(e))
            for notification in remaining:
                self.owner.attempt_failed(notification, str(e))
            connection.transport.loseConnection()

    async def _retrieve_one(self, connection, address: str, notification: Notification,
                            tls: bool) -> None:
        connection.send(f"RETR {notification.gdel_id}\r\n".encode("ascii"))
        reply = await connection.reply()
        maillog.RETRIEVAL_ATTEMPT(
            log, id=notification.gdel_id, peer=address, reply=str(reply), code=reply.code,
        )
        if reply.code != 250:
            if reply.permanent:
                self.owner.drop(notification, f"RETR refused: {reply}")
            else:
                self.owner.attempt_failed(notification, str(reply))
            return
        session = Session(address, "smtp", helo=notification.helo, esmtp=True, tls=tls)
        machine = TurnMachine(
            self.owner.policy, session, sender=notification.sender,
            recipients=tuple(notification.recipients) if notification.recipients else None,
            offered=notification.esmtp,
        )
        connection.performers = {Deliver: self._performer(notification)}
        await connection.serve_turn(machine)
        outcome = machine.outcome
        if outcome is not None and outcome.positive:
            return
        self.owner.attempt_failed(notification, f"turn ended without delivery: {outcome}")

    def _performer(self, notification: Notification) -> Callable:
        async def deliver(connection, request: Deliver) -> Reply:
            # Exactly once: a notification whose delivery may have begun
            # (earlier in this process, or in one that died: every record
            # read at start-up) looks in the mailboxes first; one marked
            # retrieved is a known duplicate.  With maildirs nothing is
            # written before a delivery: the record of a crashed one is
            # still pending.  With a store that cannot be searched (LMTP)
            # the handover marks it (L{pullmail.pull.handover}).
            handover = self.owner.handover
            envelope = request.envelope
            if notification.keep_until or (
                notification.delivering and self.owner.delivered_of is not None
                and notification.queue_id in await self.owner.run_blocking(
                    self.owner.delivered_of, {notification.queue_id: envelope.recipients})
            ):
                reply = Reply(250, "2.0.0", "Ok: already delivered, duplicate dropped")
                maillog.DUPLICATE_DROPPED(log, id=notification.gdel_id, peer=notification.peer)
            elif handover.in_doubt(notification):
                reply = await handover.keep_aside(notification, envelope.sender,
                                                  envelope.recipients, request.chunks)
            else:
                notification.delivering = True
                reply = await handover.begin(notification)
                if reply is not None:
                    return reply
                # SPEC 11.1: SPF asks about the notifying session.
                reply = await self.owner.deliver(
                    request.session, envelope, request.chunks, request.size,
                    queue_id=notification.queue_id, identity=SPFIdentity(
                        notification.peer, notification.helo, notification.sender or ""))
                handover.ended(notification)
            if reply.positive:
                await self.owner.retrieved(notification)
            return reply

        return lambda connection, request: defer.Deferred.fromCoroutine(
            deliver(connection, request)
        )
