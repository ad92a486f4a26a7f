# -*- test-case-name: tests.test_delivery, tests.test_local_queue, tests.test_dsn -*-
"""
Sending the DSNs (RFC 3464) that a message's queues decide on: the outbox
lifecycle (L{lifecycle.Bounce}, via L{Bouncer}), the local queue of
recipients an LMTP store deferred, and the router's success reports on
final delivery.  One L{Reports} holds the rules they share:

- the sender's DSN parameters (RFC 3461) decide what goes: no failure
  report for a recipient whose NOTIFY lacks FAILURE (NEVER included), no
  delay warning without DELAY, success reports only with SUCCESS;
  RET=HDRS returns the header only; ENVID and ORCPT are echoed;
- nothing to the null sender (RFC 5321 4.5.5);
- nothing, failure or success, to a sender whose domain does not
  authorise (SPF) the address the message came from (SPEC 7: no
  backscatter).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Awaitable, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.outbound import bounce
from pullmail.smtp import dsn
from pullmail.storage.outbox import OutboxEntry

if TYPE_CHECKING:
    from pullmail.outbound.delivery import Outbound

__all__ = ["Bouncer", "Reports", "returned_limit"]

log = Logger(namespace="pullmail.outbound.bouncer")

# Which NOTIFY word lets a report of each Action go (RFC 3461 4.1).
_NOTIFY_WORD = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS",
                "relayed": "SUCCESS"}


def returned_limit(dsn_params, action: str, full: int = bounce.FULL_MESSAGE_LIMIT) -> int:
    """
    How much of the original a report returns (RFC 3461 4.3): RET=HDRS the
    header only; a success report the header unless RET=FULL; RET=FULL the
    whole message up to C{full} (L{Reports}: every size the node accepts);
    neither, the MTA's choice: whole up to L{bounce.FULL_MESSAGE_LIMIT}.
    """
    ret = dsn_params.get("ret")
    if ret == "HDRS" or (_NOTIFY_WORD.get(action) == "SUCCESS" and ret != "FULL"):
        return 0
    if ret == "FULL":
        return max(full, bounce.FULL_MESSAGE_LIMIT)
    return bounce.FULL_MESSAGE_LIMIT


class Reports:
    """
    Writes and sends DSNs.  C{max_size} is ``[limits] message_size``: a
    RET=FULL report returns an original of up to that many octets, plus
    L{bounce.FULL_MESSAGE_LIMIT} for the header fields added on the way
    (Received, Authentication-Results, DKIM-Signature), whole.
    """

    def __init__(self, hostname: str, clock: IReactorTime,
                 send_bounce: Callable[[str, bytes], object],
                 sender_authorised: Callable[[str, str], defer.Deferred] | None = None,
                 max_size: int = 0) -> None:
        self.hostname = hostname
        self.clock = clock
        self.send_bounce = send_bounce
        self.sender_authorised = sender_authorised
        self.full_limit = max_size + bounce.FULL_MESSAGE_LIMIT

    async def send(self, *, queue_id: str, sender: str, dsn_params: dict, origin: str | None,
                   arrival: float, recipients: list[bounce.FailedRecipient], action: str,
                   original: bytes | Callable[[], Awaitable[bytes]]) -> list[str]:
        """
        One report on those of C{recipients} that asked for it; the
        addresses reported on (none when nothing was sent).  C{original} is
        read only when a report goes.  Fails when handing it on failed.
        """
        recipients = [r for r in recipients
                      if dsn.wants(dsn_params, r.address, _NOTIFY_WORD.get(r.action, "FAILURE"))]
        if not recipients:
            return []
        if not bounce.should_bounce(sender):
            maillog.BOUNCE_OF_BOUNCE_DROPPED(log, id=queue_id)
            return []
        # SPEC 7: never a report to an address that failed SPF (no backscatter).
        if origin and self.sender_authorised is not None:
            if not await self.sender_authorised(origin, sender):
                maillog.BOUNCE_UNAUTHORISED_DROPPED(
                    log, queue_id=queue_id, sender=sender, origin=origin,
                )
                return []
        if callable(original):
            original = await original()
        orcpt = dsn_params.get("orcpt", {})
        recipients = [replace(r, original_recipient=orcpt.get(r.address)) for r in recipients]
        message = bounce.build_dsn(
            reporting_mta=self.hostname, original_sender=sender, recipients=recipients,
            original=original, queue_id=queue_id, arrival_date=arrival,
            now=self.clock.seconds(), boundary="=_" + secrets.token_hex(12),
            message_id=f"{secrets.token_hex(12)}@{self.hostname}",
            full_message_limit=returned_limit(dsn_params, action, self.full_limit),
            envid=dsn_params.get("envid"),
        )
        await defer.maybeDeferred(self.send_bounce, sender, message)
        return [r.address for r in recipients]


class Bouncer:
    """Sends the Outbound's DSNs through its L{Reports}."""

    def __init__(self, owner: Outbound, reports: Reports) -> None:
        self.owner = owner
        self.reports = reports

    def send(self, entry: OutboxEntry, failed: list[bounce.FailedRecipient],
             action: str) -> defer.Deferred:
        """
        Fires once the DSN is stored, or rightly not sent; fails if storing
        it failed.  Callers remove the entry only after it (L{IOutbox.remove}).
        """
        async def read() -> bytes:
            try:
                return await self.owner.run_blocking(self.owner.outbox.read_message, entry.id)
            except OSError:
                return b""

        return defer.Deferred.fromCoroutine(self._send(entry, failed, action, read))

    def report_success(self, entry: OutboxEntry, recipients: list[str], original: bytes,
                       action: str, host: str | None) -> defer.Deferred:
        """
        RFC 3461 4.1: a success report (C{action} ``delivered`` or
        ``relayed``, RFC 3464 2.3.3) for those of C{recipients} that asked.
        """
        done = [bounce.FailedRecipient(r, "2.0.0", None, host, action) for r in recipients]
        return defer.Deferred.fromCoroutine(self._send(entry, done, action, original))

    async def _send(self, entry: OutboxEntry, failed: list, action: str, original) -> None:
        sent = await self.reports.send(
            queue_id=entry.queue_id, sender=entry.sender, dsn_params=entry.dsn,
            origin=entry.origin, arrival=entry.created, recipients=failed, action=action,
            original=original,
        )
        if sent:
            status = ",".join(sorted({f.status for f in failed if f.address in sent}))
            maillog.BOUNCED(log, action=action, queue_id=entry.queue_id, sender=entry.sender,
                            recipients=sent, status=status)
