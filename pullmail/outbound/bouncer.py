# -*- test-case-name: tests.test_delivery -*-
"""
Sending the DSNs the outbox lifecycle decides on (L{lifecycle.Bounce}):
read the original, build the report (L{bounce}), hand it to the router.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger

from pullmail import maillog
from pullmail.outbound import bounce
from pullmail.storage.outbox import OutboxEntry

if TYPE_CHECKING:
    from pullmail.outbound.delivery import Outbound

__all__ = ["Bouncer"]

log = Logger(namespace="pullmail.outbound.bouncer")


class Bouncer:
    """Sends the Outbound's DSNs, with the Outbound's settings."""

    def __init__(self, owner: Outbound) -> None:
        self.owner = owner

    def send(self, entry: OutboxEntry, failed: list[bounce.FailedRecipient],
             action: str) -> defer.Deferred:
        """
        Fires once the DSN is stored, or rightly not sent; fails if storing
        it failed.  Callers remove the entry only after it (L{IOutbox.remove}).
        """
        if not failed:
            return defer.succeed(None)
        if not bounce.should_bounce(entry.sender):
            maillog.BOUNCE_OF_BOUNCE_DROPPED(log, id=entry.id)
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._send(entry, failed, action))

    async def _send(self, entry: OutboxEntry, failed: list, action: str) -> None:
        # SPEC 7: never bounce to an address that failed SPF (no backscatter).
        if entry.origin and self.owner.sender_authorised is not None:
            if not await self.owner.sender_authorised(entry.origin, entry.sender):
                maillog.BOUNCE_UNAUTHORISED_DROPPED(
                    log, queue_id=entry.queue_id, sender=entry.sender, origin=entry.origin,
                )
                return
        try:
            original = await self.owner.run_blocking(self.owner.outbox.read_message, entry.id)
        except OSError:
            original = b""
        message = bounce.build_dsn(
            reporting_mta=self.owner.hostname, original_sender=entry.sender, recipients=failed,
            original=original, queue_id=entry.queue_id, arrival_date=entry.created,
            now=self.owner.clock.seconds(), boundary="=_" + secrets.token_hex(12),
            message_id=f"{secrets.token_hex(12)}@{self.owner.hostname}",
        )
        recipients = [f.address for f in failed]
        status = ",".join(sorted({f.status for f in failed}))
        maillog.BOUNCED(
            log, action=action, queue_id=entry.queue_id, sender=entry.sender,
            recipients=recipients, status=status,
        )
        await defer.maybeDeferred(self.owner.send_bounce, entry.sender, message)
