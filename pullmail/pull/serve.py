"""
The SMTA's pickup counter: answering ``RETR <id>`` (SPEC 4).

A message is handed over only to a host it is destined for: the connecting
address must be an address of an MX host (or, with no MX, of the domain
itself) of the entry's recipient domain.  Unknown, expired, retrieved and
not-yours ids all get the same ``550 5.7.1``, after a delay that doubles
with each failure from that address; too many failures in a window and the
address is refused at connect.  A guesser learns nothing and learns it
slowly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, mail_host_addresses
from pullmail.pull.verbs import Retrieve
from pullmail.smtp import replies
from pullmail.smtp.client import send_transaction
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import Reverse

if TYPE_CHECKING:
    from pullmail.trust.throttle import FailureTracker

__all__ = ["PickupCounter"]

log = Logger(namespace="pullmail.pull.serve")

# How long a RETR waits for the outcome of the same id's notification, still
# on the wire, before it is answered 451 (a peer slower than this retries).
IN_FLIGHT_WAIT = 30.0

class PickupCounter:
    """Carries out L{Retrieve} requests for the MX service."""

    def __init__(self, outbox, outbound, resolver, clock: IReactorTime,
                 failures: FailureTracker, run_blocking) -> None:
        self.outbox = outbox
        self.outbound = outbound
        self.resolver = resolver
        self.clock = clock
        self.failures = failures
        self.run_blocking = run_blocking

    def __call__(self, connection, request: Retrieve) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.retrieve(request))

    async def retrieve(self, request: Retrieve) -> object:
        peer, gdel_id = request.session.peer, request.gdel_id
        try:
            entry = await self.outbox.find(gdel_id)
        except OSError as e:   # a shared outbox out of reach (SPEC 11.3)
            return self._unavailable(gdel_id, e)
        now = self.clock.seconds()
        # A queued entry is served too: its notification may have been taken
        # with the reply lost, and only a notification could reveal the id.
        if entry is None or (entry.expires is not None and entry.expires <= now):
            return await self._refuse(peer, gdel_id, "unknown or expired")
        try:
            destined = await mail_host_addresses(self.resolver, entry.domain)
        except DNSTemporaryError as e:
            log.info("RETR {id} from {peer}: DNS failed: {error}", id=gdel_id, peer=peer,
                     error=str(e), event="retr-dns-error")
            return replies.S451_DNS_ERROR
        except DNSPermanentError:
            destined = {}
        host = destined.get(peer)
        if host is None:
            return await self._refuse(peer, gdel_id, f"not an MX of {entry.domain}")
        if self.outbound.in_flight(gdel_id):
            # The RMTA acted on our GDEL's 250 before we read it: wait for it.
            try:
                await self.outbound.transmitted(gdel_id).addTimeout(IN_FLIGHT_WAIT, self.clock)
            except defer.TimeoutError:
                return replies.S451_IN_PROGRESS
            if self.outbox.get(gdel_id) is not entry:
                return await self._refuse(peer, gdel_id, "gone while notified")
        await self.outbox.flushed(gdel_id)
        try:
            claimed = await self.outbox.acquire(gdel_id)
        except OSError as e:
            return self._unavailable(gdel_id, e)
        if claimed is None:
            return replies.S451_IN_PROGRESS
        log.info("RETR {id} ({queue_id}) by {peer}: handing over", id=gdel_id,
                 queue_id=entry.queue_id, peer=peer, event="retr")
        return Reverse(Reply(250, "2.0.0", f"{gdel_id} follows"), self._turn(claimed, peer, host))

    @staticmethod
    def _unavailable(gdel_id: str, error: OSError) -> Reply:
        log.warn("RETR {id}: the outbox is out of reach: {error}", id=gdel_id,
                 error=str(error))
        return replies.S451_LOCAL_ERROR

    async def _refuse(self, peer: str, gdel_id: str, why: str) -> Reply:
        delay = self.failures.failed(peer)
        log.info("RETR {id} from {peer} refused ({why}); answering in {delay}s", id=gdel_id,
                 peer=peer, why=why, delay=delay, event="retr-refused")
        await task.deferLater(self.clock, delay, lambda: None)
        return replies.S550_NO_SUCH_MESSAGE

    def _turn(self, entry, peer: str, host: str):
        async def turn(channel) -> None:
            result = None
            try:
                message = await self.run_blocking(self.outbox.read_message, entry.id)
                result = await send_transaction(
                    channel, entry.sender, entry.recipients, [message],
                    size=entry.size, body=entry.body, smtputf8=entry.smtputf8,
                )
            finally:
                self.outbound.retrieval_finished(entry, result, peer, host)

        return turn
