# -*- test-case-name: tests.test_delivery -*-
"""
Sending the DSNs the outbox lifecycle decides on (L{lifecycle.Bounce}):
read the original, build the report (L{bounce}), hand it to the router.
The sender's DSN parameters (RFC 3461) decide what goes: no failure report
for a recipient whose NOTIFY lacks FAILURE (NEVER included), no delay
warning without DELAY, success reports only with SUCCESS; RET=HDRS returns
the header only; ENVID and ORCPT are echoed.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger

from pullmail import maillog
from pullmail.outbound import bounce
from pullmail.smtp import dsn
from pullmail.storage.outbox import OutboxEntry

if TYPE_CHECKING:
    from pullmail.outbound.delivery import Outbound

__all__ = ["Bouncer", "returned_limit"]

log = Logger(namespace="pullmail.outbound.bouncer")

# Which NOTIFY word lets a report of each Action go (RFC 3461 4.1).
_NOTIFY_WORD = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS",
                "relayed": "SUCCESS"}


def returned_limit(dsn_params, action: str) -> int:
    """
    How much of the original a report returns (RFC 3461 4.3): RET=HDRS the
    header only; a success report the header unless RET=FULL; else whole
    up to L{bounce.FULL_MESSAGE_LIMIT}.
    """
    ret = dsn_params.get("ret")
    if ret == "HDRS" or (_NOTIFY_WORD.get(action) == "SUCCESS" and ret != "FULL"):
        return 0
    return bounce.FULL_MESSAGE_LIMIT


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
        failed = [f for f in failed
                  if dsn.wants(entry.dsn, f.address, _NOTIFY_WORD.get(f.action, "FAILURE"))]
        if not failed:
            return defer.succeed(None)
        if not bounce.should_bounce(entry.sender):
            maillog.BOUNCE_OF_BOUNCE_DROPPED(log, id=entry.id)
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._send(entry, failed, action))

    def report_success(self, entry: OutboxEntry, recipients: list[str], original: bytes,
                       action: str, host: str | None) -> defer.Deferred:
        """
        RFC 3461 4.1: a success report (C{action} ``delivered`` or
        ``relayed``, RFC 3464 2.3.3) for those of C{recipients} that asked.
        """
        done = [bounce.FailedRecipient(r, "2.0.0", None, host, action)
                for r in recipients if dsn.wants(entry.dsn, r, "SUCCESS")]
        if not done or not bounce.should_bounce(entry.sender):
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._send(entry, done, action, original))

    async def _send(self, entry: OutboxEntry, failed: list, action: str,
                    original: bytes | None = None) -> None:
        # SPEC 7: never bounce to an address that failed SPF (no backscatter).
        if entry.origin and self.owner.sender_authorised is not None:
            if not await self.owner.sender_authorised(entry.origin, entry.sender):
                maillog.BOUNCE_UNAUTHORISED_DROPPED(
                    log, queue_id=entry.queue_id, sender=entry.sender, origin=entry.origin,
                )
                return
        if original is None:
            try:
                original = await self.owner.run_blocking(self.owner.outbox.read_message,
                                                          entry.id)
            except OSError:
                original = b""
        orcpt = entry.dsn.get("orcpt", {})
        failed = [replace(f, original_recipient=orcpt.get(f.address)) for f in failed]
        message = bounce.build_dsn(
            reporting_mta=self.owner.hostname, original_sender=entry.sender, recipients=failed,
            original=original, queue_id=entry.queue_id, arrival_date=entry.created,
            now=self.owner.clock.seconds(), boundary="=_" + secrets.token_hex(12),
            message_id=f"{secrets.token_hex(12)}@{self.owner.hostname}",
            full_message_limit=returned_limit(entry.dsn, action), envid=entry.dsn.get("envid"),
        )
        recipients = [f.address for f in failed]
        status = ",".join(sorted({f.status for f in failed}))
        maillog.BOUNCED(
            log, action=action, queue_id=entry.queue_id, sender=entry.sender,
            recipients=recipients, status=status,
        )
        await defer.maybeDeferred(self.owner.send_bounce, entry.sender, message)
