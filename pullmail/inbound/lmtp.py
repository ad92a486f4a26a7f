# -*- test-case-name: tests.test_lmtp -*-
"""
Local delivery over LMTP (RFC 2033): ``[delivery] local = "lmtp:<endpoint>"``
hands each message for local mailboxes to a mail store such as Dovecot,
which answers once per recipient after the data.

One connection per message (LMTP servers fork a process per connection,
and a held-open connection would only hold one), at most
L{MAX_CONNECTIONS} at once.  Each recipient is delivered when the store
said ``250`` for it; a refusal keeps the store's own reply, 4xx or 5xx.  A
store that cannot be reached, refuses the session or drops the connection
before the end of the data gives every recipient a 4xx: never a delivery
that did not happen.

Once the data has gone, a connection that breaks or times out before a
recipient's reply leaves that recipient's delivery unknown: the store may
have committed it.  A 4xx would have it delivered again (perhaps twice), a
5xx would bounce what may have arrived; so the message is kept for the
operator instead, durably, in ``<state_dir>/in-doubt/``
(L{pullmail.storage.indoubt}) with that recipient, and the outcome says
C{in_doubt}: done, neither retried nor bounced, as when a crash cuts off a
retrieved message (L{pullmail.pull.handover}).  Every path to the store
(mail received, retrieved or retried from the local queue) comes through
here.  Only when the copy cannot be kept does it fall back to a 4xx: twice
is better than never.
"""

from __future__ import annotations

from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pullmail import maillog
from pullmail.interfaces import DeliveryOutcome, IDeliveryAgent
from pullmail.logsafe import printable
from pullmail.smtp.client import (
    Refused,
    TransactionResult,
    open_lmtp_session,
    send_lmtp_transaction,
)
from pullmail.smtp.loops import delivery_fields
from pullmail.smtp.protocol import ClientConnection
from pullmail.smtp.replies import Reply
from pullmail.storage.indoubt import InDoubt

__all__ = ["LMTPDelivery", "lmtp_connector", "MAX_CONNECTIONS"]

# What the SMTP client hears when the store could not answer at all (RFC
# 3463: 4.4.1 no answer, 4.4.2 connection dropped, 4.4.0 other routing).
S451_STORE_UNREACHABLE = Reply(451, "4.4.1", "Mail store unreachable, try again later")
S451_STORE_REFUSED = Reply(451, "4.4.0", "Mail store not ready, try again later")
S451_STORE_BROKEN = Reply(451, "4.4.2", "Connection to the mail store lost, try again later")

log = Logger(namespace="pullmail.inbound.lmtp")

# Connections open to the store at once; Dovecot's lmtp service starts one
# process per connection (its default process_limit is 100).
MAX_CONNECTIONS = 10


def lmtp_connector(reactor, clock: IReactorTime, description: str, connect_timeout: float,
                   idle_timeout: float) -> Callable[[], defer.Deferred]:
    """
    A C{connect()} for L{LMTPDelivery}: a Twisted client endpoint string
    (``unix:/run/dovecot/lmtp``, ``tcp:127.0.0.1:24``) connected to with a
    L{ClientConnection}, which gives up after C{idle_timeout} of silence.
    """
    endpoint = clientFromString(reactor, description)

    def connect() -> defer.Deferred:
        connection = ClientConnection(clock, idle_timeout)
        return connectProtocol(endpoint, connection).addTimeout(connect_timeout, clock)

    return connect


@implementer(IDeliveryAgent)
class LMTPDelivery:
    """
    Delivers local mail to an LMTP server.  C{connect()} fires with a
    L{pullmail.smtp.client.Channel} that has a C{quit()}; C{where} names
    the server in logs and replies; C{in_doubt} keeps the messages whose
    replies never came.
    """

    root = None

    def __init__(self, connect: Callable[[], defer.Deferred], hostname: str,
                 where: str = "LMTP server", *, in_doubt: InDoubt) -> None:
        self._connect = connect
        self.hostname = hostname
        self.where = where
        self.in_doubt = in_doubt
        self._slots = defer.DeferredSemaphore(MAX_CONNECTIONS)

    def deliver(self, queue_id: str, sender: str, addresses: Sequence[str],
                chunks: Sequence[bytes], folder: str | None = None) -> defer.Deferred:
        """
        C{folder} (DMARC quarantine's ``.Junk``) has no LMTP form: the store
        files the message by its Authentication-Results (a Sieve rule).
        """
        return self._slots.run(lambda: defer.Deferred.fromCoroutine(
            self._deliver(queue_id, sender, list(addresses), list(chunks))
        ))

    async def _deliver(self, queue_id: str, sender: str, addresses: list[str],
                       chunks: list[bytes]) -> DeliveryOutcome:
        try:
            connection = await self._connect()
        except Exception as e:
            return self._failed(queue_id, addresses, S451_STORE_UNREACHABLE, _describe(e))
        # One transaction, one copy: Return-Path: always, Delivered-To:
        # when it names the one mailbox (virtual(8) puts both in each copy;
        # an LMTP store such as Dovecot adds its own per recipient).
        stamped = [delivery_fields(sender, addresses[0] if len(addresses) == 1 else None),
                   *chunks]
        try:
            keywords = await open_lmtp_session(connection, self.hostname)
            result = await send_lmtp_transaction(
                connection, sender, addresses, stamped,
                size=sum(map(len, stamped)) if "SIZE" in keywords else None,
                body="8BITMIME" if "8BITMIME" in keywords and _eight_bit(stamped) else None,
                smtputf8="SMTPUTF8" in keywords and not (sender + "".join(addresses)).isascii(),
                pipelining="PIPELINING" in keywords,
            )
        except Refused as e:
            # The session itself: the store is not ready, whatever it said.
            return self._failed(queue_id, addresses, S451_STORE_REFUSED, str(e.reply))
        except Exception as e:  # lost, timed out, out of step, before the data went
            return self._failed(queue_id, addresses, S451_STORE_BROKEN, _describe(e))
        finally:
            connection.quit()
        in_doubt = await self._keep_unanswered(queue_id, sender, result, chunks)
        return self._outcome(queue_id, addresses, result.recipients, in_doubt=in_doubt)

    async def _keep_unanswered(self, queue_id: str, sender: str, result: TransactionResult,
                               chunks: list[bytes]) -> tuple[str, ...]:
        """
        The recipients whose reply never came, once the message is kept for
        them (as it came, without the delivery fields: re-sent, it must not
        look like a loop); none when nothing was unanswered or the copy could
        not be kept (then they get a 4xx: delivered again, never lost).
        """
        if not result.unanswered:
            return ()
        error = printable(result.final.text)
        try:
            path = await self.in_doubt.keep(
                queue_id, f"{queue_id} to {self.where}: {error}", sender, result.unanswered,
                chunks)
        except OSError as e:
            maillog.LMTP_FAILED(log, queue_id=queue_id, where=self.where,
                                error=f"{error}; could not keep it aside: {e}")
            return ()
        maillog.LMTP_IN_DOUBT(log, queue_id=queue_id, where=self.where, error=error,
                              recipients=list(result.unanswered), path=str(path))
        return tuple(result.unanswered)

    def _failed(self, queue_id: str, addresses: list[str], reply: Reply,
                error: str) -> DeliveryOutcome:
        """Nothing delivered: every address 4xx.  The details go to the log only."""
        maillog.LMTP_FAILED(log, queue_id=queue_id, where=self.where, error=error)
        return self._outcome(queue_id, addresses, {}, reply)

    def _outcome(self, queue_id: str, addresses: list[str], replies: dict,
                 missing: Reply | None = None, in_doubt: tuple[str, ...] = ()
                 ) -> DeliveryOutcome:
        """Each address by its reply; one with none gets C{missing} (unless in doubt)."""
        refused = {}
        delivered = []
        for address in addresses:
            if address in in_doubt:
                continue
            reply = replies.get(address, missing)
            if reply is not None and reply.positive:
                delivered.append(address)
            else:
                refused[address] = reply or S451_STORE_BROKEN
        maillog.LMTP_DELIVERY(
            log, queue_id=queue_id, where=self.where, delivered=delivered,
            refused={a: str(r) for a, r in refused.items()}, in_doubt=list(in_doubt),
        )
        return DeliveryOutcome(delivered=tuple(delivered), refused=refused, in_doubt=in_doubt)


def _eight_bit(chunks: Sequence[bytes]) -> bool:
    return any(not chunk.isascii() for chunk in chunks)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
