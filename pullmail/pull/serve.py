"""
The SMTA's pickup counter: answering ``RETR <id>`` (SPEC 4).

A message is handed over only to a host it is destined for: the connecting
address must be an address of an MX host (or, with no MX, of the domain
itself) of the entry's recipient domain.  Unknown, expired, retrieved and
not-yours ids all get the same ``550 5.7.1``, after a delay that doubles
with each failure from that address; too many failures in a window and the
address is refused at connect, and the connection that reached the limit
is closed with ``421`` (as AUTH does).  A guesser learns nothing and
learns it slowly.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.logsafe import printable
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, mail_host_addresses
from pullmail.pull.verbs import Retrieve
from pullmail.smtp import replies
from pullmail.smtp.client import send_transaction
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import Close, Reverse
from pullmail.trust.throttle import FailureTracker

__all__ = ["PickupCounter"]

log = Logger(namespace="pullmail.pull.serve")

# How long a RETR waits for the outcome of the same id's notification, still
# on the wire, before it is answered 451 (a peer slower than this retries).
IN_FLIGHT_WAIT = 30.0


class PickupCounter:
    """Carries out L{Retrieve} requests for the MX service."""

    def __init__(self, outbox, outbound, resolver, clock: IReactorTime,
                 failures: FailureTracker, run_blocking, mta_sts=None) -> None:
        self.outbox = outbox
        self.outbound = outbound
        self.resolver = resolver
        self.clock = clock
        self.failures = failures
        self.run_blocking = run_blocking
        self.mta_sts = mta_sts   # with MTA-STS on, an enforce policy narrows the destined hosts

    def __call__(self, connection, request: Retrieve) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.retrieve(request))

    async def retrieve(self, request: Retrieve) -> object:
        peer, gdel_id = request.session.peer, request.gdel_id
        if self.failures.blocked(peer):
            # Blocked while this connection was open: it guesses no more.
            return Close(replies.S421_BLOCKED)
        try:
            entry = await self.outbox.find(gdel_id)
        except OSError as e:   # a shared outbox out of reach (SPEC 11.3)
            return self._unavailable(gdel_id, e)
        now = self.clock.seconds()
        # A queued entry is served too: its notification may have been taken
        # with the reply lost, and only a notification could reveal the id.
        if entry is None or (entry.expires is not None and entry.expires <= now):
            return await self._refuse(peer, gdel_id, "unknown or expired")
        if entry.held:          # `pullmail queue hold`: asked again after the release
            return replies.S451_IN_PROGRESS
        try:
            destined = await mail_host_addresses(self.resolver, entry.domain)
        except DNSTemporaryError as e:
            maillog.RETR_DNS_ERROR(log, id=gdel_id, peer=peer, error=str(e))
            return replies.S451_DNS_ERROR
        except DNSPermanentError:
            destined = {}
        if self.mta_sts is not None:
            # SPEC 11.2: under an enforce policy only listed MX hosts count.
            destined = await self.mta_sts.destined(entry.domain, destined)
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
        try:
            # Read before the reply: the turn's first commands then go out
            # with it, in one write (SPEC 4: the RMTA reads on after it).
            message = await self.run_blocking(self.outbox.read_message, gdel_id)
        except OSError as e:
            self.outbound.retrieval_finished(claimed, None, peer, host)
            return self._unavailable(gdel_id, e)
        maillog.RETR_HANDED_OVER(log, id=gdel_id, queue_id=entry.queue_id, peer=peer)
        return Reverse(Reply(250, "2.0.0", f"{gdel_id} follows"),
                       self._turn(claimed, peer, host, message))

    @staticmethod
    def _unavailable(gdel_id: str, error: OSError) -> Reply:
        maillog.RETR_STORE_UNAVAILABLE(log, id=gdel_id, error=str(error))
        return replies.S451_LOCAL_ERROR

    async def _refuse(self, peer: str, gdel_id: str, why: str) -> Reply | Close:
        delay = self.failures.failed(peer)
        maillog.RETR_REFUSED(log, id=printable(gdel_id), peer=peer, why=why, delay=delay)
        await task.deferLater(self.clock, delay, lambda: None)
        if self.failures.blocked(peer):
            return Close(replies.S421_BLOCKED)
        return replies.S550_NO_SUCH_MESSAGE

    def _turn(self, entry, peer: str, host: str, message: bytes):
        async def turn(channel) -> None:
            result = None
            try:
                result = await send_transaction(
                    channel, entry.sender, entry.recipients, [message],
                    size=entry.size, body=entry.body, smtputf8=entry.smtputf8,
                    chunking="CHUNKING" in entry.offers,
                    dsn=entry.dsn if "DSN" in entry.offers else None,
                )
            finally:
                self.outbound.retrieval_finished(entry, result, peer, host)

        return turn
