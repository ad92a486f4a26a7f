# -*- test-case-name: tests.test_delivery -*-
"""
Outbound sessions (SPEC 7), for L{delivery.Outbound}: find the domain's
mail hosts, connect to the first that answers, EHLO, STARTTLS when
offered, then notify (GDEL) or push each entry of the batch, taking more
of the domain's line while it lasts.  Each entry's outcome goes back to
the Outbound as soon as its reply comes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger

from pullmail import maillog
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError
from pullmail.outbound import mx
from pullmail.outbound.notify import Notice, NotificationRow
from pullmail.scheduling.dispatch import Dispatcher, Work
from pullmail.smtp.client import (
    TransactionResult,
    envelope_commands,
    open_session,
    send_notification,
    send_transaction,
)
from pullmail.smtp.replies import Reply
from pullmail.storage.outbox import OutboxEntry

if TYPE_CHECKING:
    from pullmail.outbound.delivery import Outbound

__all__ = ["Courier", "Permanent", "Transient", "TransientPeer"]

log = Logger(namespace="pullmail.outbound.session")

# The entries a session takes from its domain's line at a time.
ENTRIES_PER_TAKE = 10


class Transient(Exception):
    """This attempt failed for a reason that may pass (4xx, no answer)."""


class Permanent(Exception):
    """The destination cannot be reached at all (no such domain, null MX)."""

    def __init__(self, reason: str, status: str = "5.1.2") -> None:
        super().__init__(reason)
        self.status = status   # RFC 3463: 5.1.2 bad destination system


class TransientPeer(Transient):
    """The peer can take neither a notification nor a push."""


class Courier:
    """Runs the Outbound's sessions, with the Outbound's settings."""

    def __init__(self, owner: Outbound, dispatcher: Dispatcher[OutboxEntry]) -> None:
        self.owner = owner
        self.dispatcher = dispatcher
        # A transaction on the wire now, and who waits for its outcome.
        self._transmitting: dict[str, list[defer.Deferred]] = {}

    # -- entries on the wire ---------------------------------------------------------

    def on_the_wire(self, entry_id: str) -> bool:
        return entry_id in self._transmitting

    def transmitted(self, entry_id: str) -> defer.Deferred:
        """Fires once the entry is no longer on the wire and its outcome is recorded."""
        waiters = self._transmitting.get(entry_id)
        if waiters is None:
            return defer.succeed(None)
        waiter = defer.Deferred()
        waiters.append(waiter)
        return waiter

    def _transmission_over(self, entry_id: str) -> None:
        for waiter in self._transmitting.pop(entry_id, ()):
            waiter.callback(None)

    # -- the domain's line -------------------------------------------------------------

    def take_more(self, work: Work[OutboxEntry]) -> list[OutboxEntry]:
        """Up to ENTRIES_PER_TAKE more entries of the line, each counted as an attempt."""
        return count_attempts(self.dispatcher.take(work, ENTRIES_PER_TAKE))

    def _give_back(self, work: Work[OutboxEntry], entries: list[OutboxEntry]) -> None:
        """Untried and uncounted, to the front of the line."""
        for entry in entries:
            entry.attempts -= 1
        self.dispatcher.give_back(work, entries)

    # -- one session --------------------------------------------------------------------

    async def try_hosts(self, work: Work[OutboxEntry], pull_only: bool = False):
        """
        Open a session with the first mail host that answers, in preference
        order, and run every entry's transaction over it.  Returns the host
        and, per entry, (entry, mode, result or the exception that broke it).
        """
        entries = list(work.items)
        domain = entries[0].domain
        config = self.owner.config
        if config.smarthost:
            host, port = config.smarthost
            hosts, networks = [host], ()   # named by the operator: never blocked
        else:
            try:
                hosts = mx.mail_hosts(domain, await self.owner.resolver.mx(domain),
                                      config.mx_limit)
            except mx.NullMX as e:
                # RFC 7505 4.1: no attempt; X.1.10 "recipient address has null MX".
                raise Permanent(str(e), "5.1.10") from e
            except DNSPermanentError as e:
                raise Permanent(f"domain {domain} does not exist") from e
            except DNSTemporaryError as e:
                raise Transient(f"DNS: {e}") from e
            port, networks = config.remote_port, config.blocked_networks
        # RFC 8461 5.1: with MTA-STS, an enforce policy skips unlisted MX hosts.
        sts, policy = self.owner.mta_sts, None
        if sts is not None and not config.smarthost:
            policy = await sts.policy_for(domain)
        # Issue 18: at most mx_limit addresses per attempt, none in a blocked network.
        picker = mx.TargetPicker(config.mx_limit, tuple(networks))
        errors = []
        for host in hosts:
            if picker.full:
                break
            refused = policy and sts.refusal(policy, domain, host)
            if refused:
                errors.append(refused)
                continue
            try:
                addresses = await self.owner.resolver.addresses(host)
            except DNSTemporaryError as e:
                errors.append(f"{host}: {e}")
                continue
            for address in [target.address for target in picker.offer(host, addresses)]:
                try:
                    outcomes = await self._session(work, entries, host, address, port, pull_only,
                                                   policy)
                except Exception as e:  # any failure of this host: try the next
                    errors.append(f"{host}[{address}]: {e.__class__.__name__}: {e}")
                    maillog.SESSION_FAILED(
                        log, domain=domain, ids=" ".join(e.id for e in entries), host=host,
                        address=address, error=str(e),
                    )
                    continue
                return host, outcomes
        errors.append(picker.explain())
        raise Transient("; ".join(filter(None, errors)) or "no address for any mail host")

    async def _session(self, work: Work[OutboxEntry], entries: list[OutboxEntry], host: str,
                       address: str, port: int, pull_only: bool = False, policy=None) -> list:
        connection = await self.owner.connect(address, port)
        outcomes: list = []
        try:
            tls = self.owner.client_tls
            if policy is not None:
                session = await self.owner.mta_sts.open_session(
                    policy, entries[0].domain, connection, self.owner.hostname, host, tls)
            else:
                session = await open_session(
                    connection, self.owner.hostname, tls.options_for(host) if tls else None,
                    require_tls=bool(tls and tls.required),
                )
            keywords = session.keywords
            self.dispatcher.ready(work)
            maillog.SESSION_TLS(
                log, host=host, address=address,
                tls=("TLS, certificate verified" if tls and tls.required else "TLS")
                     if session.tls else "no TLS (not offered)",
            )
            pull = "GDEL" in keywords
            if not pull and (pull_only or not self.owner.config.push_fallback):
                raise TransientPeer("peer does not offer GDEL and push_fallback is off")
            if pull and not pull_only and "PIPELINING" in keywords:
                await self._in_a_row(work, connection, keywords, list(entries), host, outcomes)
            else:
                await self._one_by_one(work, connection, keywords, list(entries), host,
                                       outcomes, pull, pull_only)
        finally:
            connection.quit()
        return outcomes

    async def _one_by_one(self, work: Work[OutboxEntry], connection, keywords, pending: list,
                          host: str, outcomes: list, pull: bool, pull_only: bool) -> None:
        """Each entry's transaction, one after the other (pushes; a peer without PIPELINING)."""
        while pending:
            entry = pending.pop(0)
            if not pull_only and not self._sendable(entry):
                continue
            if not pull_only:
                self._transmitting[entry.id] = []
            try:
                result = await self._transaction(connection, keywords, entry, pull)
            except Exception as e:
                # The connection broke: this entry and the rest try again later.
                self._transmission_over(entry.id)
                outcomes.extend((rest, None, e) for rest in [entry] + pending)
                return
            if pull_only:
                outcomes.append((entry, "pull", result))
                continue
            if not self._recorded(entry, "pull" if pull else "push", host, result, outcomes):
                # The peer is struggling: leave the rest to new sessions.
                self._give_back(work, pending)
                return
            if not pending:
                pending = await self._more(work, connection, pull_only)

    async def _in_a_row(self, work: Work[OutboxEntry], connection, keywords, pending: list,
                        host: str, outcomes: list) -> None:
        """
        Notifications pipelined, each GDEL in one write with the next
        envelope (L{NotificationRow}), while the domain's line lasts.
        """
        size_offered, dsn_offered = "SIZE" in keywords, "DSN" in keywords

        def next_notice() -> Notice | None:
            while True:
                if not pending:
                    pending.extend(self.take_more(work))
                    if not pending:
                        return None
                entry = pending.pop(0)
                if not self._sendable(entry):
                    continue
                self._transmitting[entry.id] = []
                refusal = _unsendable(entry, keywords)
                if refusal is not None:
                    self._recorded(entry, "pull", host, refusal, outcomes)
                    continue
                entry.offers = sorted(TURN_EXTENSIONS.intersection(keywords))
                return Notice(entry, envelope_commands(
                    entry.sender, entry.recipients, entry.size if size_offered else None,
                    smtputf8=entry.smtputf8, dsn=entry.dsn if dsn_offered else None))

        row = NotificationRow(
            connection, next_notice,
            lambda entry, result: self._recorded(entry, "pull", host, result, outcomes))
        while True:
            notice = next_notice()
            if notice is None:
                pending.extend(await self._more(work, connection, False))
                if not pending:
                    return
                continue
            try:
                if not await row.run(notice):
                    self._give_back(work, row.untried + pending)
                    return
            except Exception as e:
                # The connection broke: what was on the wire and the rest try again later.
                for entry in row.on_the_wire:
                    self._transmission_over(entry.id)
                outcomes.extend((rest, None, e) for rest in row.on_the_wire + pending)
                return

    def _sendable(self, entry: OutboxEntry) -> bool:
        """Still to send: not retrieved while it waited (the RETR won)."""
        if entry.claimed or self.owner.outbox.get(entry.id) is not entry:
            self.dispatcher.done_with(entry.id)
            return False
        return True

    def _recorded(self, entry: OutboxEntry, mode: str, host: str, result: TransactionResult,
                  outcomes: list) -> bool:
        """
        Record the outcome at once, not after the session: the receiver may
        send RETR for this id while we notify the next one.  False when the
        peer is struggling (a 4xx), and the rest is better left to new sessions.
        """
        outcomes.append((entry, mode, result))
        try:
            self.owner.finish(entry, mode, host, result)
        finally:
            self._transmission_over(entry.id)
        return not (result.refused(permanent=False) or (
            result.final is not None and result.final.transient))

    async def _more(self, work: Work[OutboxEntry], connection, pull_only: bool) -> list:
        """
        The next entries of the domain's line; when it is empty, wait up to
        C{[delivery] connection_cache_time} for new ones, so that messages
        that come one at a time share this session and its TLS handshake
        (as Postfix's connection cache does).  None if the peer left meanwhile.
        """
        entries = self.take_more(work)
        linger = self.owner.config.connection_cache_time
        if entries or pull_only or work.key is None or linger <= 0:
            return entries
        entries = count_attempts(
            await self.dispatcher.wait_for_more(work, ENTRIES_PER_TAKE, linger))
        if entries and not connection.usable():
            self._give_back(work, entries)
            return []
        return entries

    async def _transaction(self, connection, keywords: dict, entry: OutboxEntry,
                           pull: bool) -> TransactionResult:
        pipelining = "PIPELINING" in keywords
        size = entry.size if "SIZE" in keywords else None
        refusal = _unsendable(entry, keywords)
        if refusal is not None:
            return refusal
        if pull:
            # SPEC 4: what the RMTA offers now is what the turn may use.
            entry.offers = sorted(TURN_EXTENSIONS.intersection(keywords))
            return await send_notification(
                connection, entry.sender, entry.recipients, entry.id, size=size,
                pipelining=pipelining, smtputf8=entry.smtputf8,
                dsn=entry.dsn if "DSN" in keywords else None,
            )
        message = await self.owner.run_blocking(self.owner.outbox.read_message, entry.id)
        result = await send_transaction(
            connection, entry.sender, entry.recipients, [message], size=size,
            body=entry.body if "8BITMIME" in keywords else None, pipelining=pipelining,
            chunking="CHUNKING" in keywords, smtputf8=entry.smtputf8,
            dsn=entry.dsn if "DSN" in keywords else None,
        )
        if "DSN" not in keywords:
            # RFC 3461 5.2.2: a SUCCESS wanted and no DSN onward: "relayed".
            await self.owner.bouncer.report_success(
                entry, result.accepted(), message, "relayed", host=None)
        return result


# RFC 3463 5.6.7: the message needs SMTPUTF8 and the peer does not offer it.
S553_PEER_LACKS_SMTPUTF8 = Reply(553, "5.6.7", "Peer does not offer SMTPUTF8 (RFC 6531 3.2)")

# The extensions an SMTA uses in a reversed turn when the RMTA offered them.
TURN_EXTENSIONS = frozenset({"CHUNKING", "SMTPUTF8", "DSN", "8BITMIME", "SIZE"})


def _unsendable(entry: OutboxEntry, keywords) -> TransactionResult | None:
    """
    RFC 6531 3.2: never to a peer without SMTPUTF8; a bounce (the turn of a
    notification would need it just the same, SPEC 4).
    """
    if entry.smtputf8 and "SMTPUTF8" not in keywords:
        return TransactionResult(S553_PEER_LACKS_SMTPUTF8, dict.fromkeys(
            entry.recipients, S553_PEER_LACKS_SMTPUTF8))
    return None


def count_attempts(entries: list[OutboxEntry]) -> list[OutboxEntry]:
    """Entries taken for a session: each is one more attempt (SPEC 5's retry count)."""
    for entry in entries:
        entry.attempts += 1
    return entries
