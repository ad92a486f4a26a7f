"""
Outbound delivery, the SMTA's side of SPEC 7.

For each outbox entry that is due: find the recipient domain's mail hosts,
connect from the node's own address, EHLO, STARTTLS when offered; then, if
the peer offers GDEL, notify and keep the entry until it is retrieved or
expires, else push it by MAIL/RCPT/DATA.  4xx or no answer: retry on
``push_retry``.  5xx, or the end of a lifetime: bounce (RFC 3464).

One timer covers the whole outbox: a heap of (due, id), and a single
``callLater`` for the earliest, so nothing polls and a million waiting
entries cost nothing until they are due.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import replace
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail.config import DeliveryConfig
from pullmail.ids import new_gdel_id
from pullmail.interfaces import IOutbox
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, Resolver, mail_hosts
from pullmail.outbound import bounce
from pullmail.scheduling.schedule import push_retry_at
from pullmail.scheduling.timers import DueQueue
from pullmail.smtp.client import (
    TransactionResult,
    open_session,
    send_notification,
    send_transaction,
)
from pullmail.smtp.replies import Reply
from pullmail.storage.outbox import NOTIFIED, QUEUED, OutboxEntry

__all__ = ["Outbound"]

log = Logger(namespace="pullmail.outbound.delivery")

# Concurrent outbound sessions; more would only contend for the uplink.
MAX_SESSIONS = 20
# Connections open to one domain at once, and the entries a session takes
# from the domain's line at a time.
SESSIONS_PER_DOMAIN = 4
ENTRIES_PER_TAKE = 10


class _Transient(Exception):
    """This attempt failed for a reason that may pass (4xx, no answer)."""


class _Permanent(Exception):
    """The destination cannot be reached at all (no such domain, null MX)."""


class Outbound:
    def __init__(
        self,
        *,
        outbox: IOutbox,
        resolver: Resolver,
        connect: Callable,
        clock: IReactorTime,
        run_blocking: Callable,
        hostname: str,
        config: DeliveryConfig,
        send_bounce: Callable[[str, bytes], object],
        client_tls=None,
        sender_authorised: Callable[[str, str], defer.Deferred] | None = None,
        mta_sts=None,
    ) -> None:
        self.outbox = outbox
        self.resolver = resolver
        self.connect = connect
        self.clock = clock
        self.run_blocking = run_blocking
        self.hostname = hostname
        self.config = config
        self.send_bounce = send_bounce
        self.client_tls = client_tls
        self.sender_authorised = sender_authorised
        self.mta_sts = mta_sts   # an outbound.sts.MTASTS when [delivery] mta_sts is on
        self._due_queue = DueQueue(clock, self._wake)
        self._in_flight: set[str] = set()
        # A transaction on the wire now, and who waits for its outcome.
        self._transmitting: dict[str, list[defer.Deferred]] = {}
        self._lines: dict[str, deque[OutboxEntry]] = {}   # due, waiting for a session
        self._sessions = 0
        self._domain_sessions: dict[str, int] = {}

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Load the outbox; released claims are notified again (SPEC 4)."""
        released = set(self.outbox.load())
        now = self.clock.seconds()
        for entry in self.outbox.entries():
            if entry.id in released and entry.state == NOTIFIED:
                entry.renotify_at = now
                self.outbox.update(entry)
            self._push(entry)
        self._arm()
        log.info("outbox loaded: {count} entries, {released} claims released",
                 count=len(self.outbox), released=len(released))

    def stop(self) -> None:
        self._due_queue.stop()

    # -- entry points -----------------------------------------------------------

    def enqueue(self, queue_id: str, sender: str, recipients: Sequence[str],
                chunks: Sequence[bytes], origin: str | None = None) -> defer.Deferred:
        """
        Queue a message for remote recipients: one entry per domain.
        C{origin} is the outside address it came from (forwarded mail), so
        that a bounce never goes to a sender that address may not speak for.
        """
        by_domain: dict[str, list[str]] = {}
        for recipient in recipients:
            by_domain.setdefault(recipient.rpartition("@")[2].lower(), []).append(recipient)
        now = self.clock.seconds()
        size = sum(len(c) for c in chunks)
        eight_bit = any(max(c, default=0) > 127 for c in chunks)
        entries = [
            OutboxEntry(
                id=new_gdel_id(), queue_id=queue_id, sender=sender, domain=domain,
                recipients=rcpts, created=now, size=size, next_attempt=now,
                body="8BITMIME" if eight_bit else None, origin=origin,
            )
            for domain, rcpts in sorted(by_domain.items())
        ]
        d = self.run_blocking(self.outbox.add, entries, list(chunks))

        def stored(_: object) -> None:
            for entry in entries:
                log.info("queued {queue_id} as {id} for {recipients}", queue_id=queue_id,
                         id=entry.id, recipients=entry.recipients, event="queued")
                self._push(entry)
            self._arm()

        return d.addCallback(stored)

    def flush(self) -> None:
        """Make every queued entry due now (``pullmail queue --flush``)."""
        now = self.clock.seconds()
        for entry in self.outbox.entries():
            if entry.state == QUEUED and not entry.claimed:
                entry.next_attempt = now
                self._push(entry)
        self._arm()

    def in_flight(self, entry_id: str) -> bool:
        """
        Whether the entry's notification or push is on the wire right now.
        An entry merely waiting in its domain's line can be retrieved (the
        session skips it then), and a re-notification changes nothing.
        """
        return entry_id in self._transmitting

    def transmitted(self, entry_id: str) -> defer.Deferred:
        """
        Fires once the entry is no longer in flight and its outcome (say,
        "notified") is recorded: an RMTA may act on our GDEL's 250, and
        send RETR on another connection, before we have read that reply.
        """
        waiters = self._transmitting.get(entry_id)
        if waiters is None:
            return defer.succeed(None)
        waiter = defer.Deferred()
        waiters.append(waiter)
        return waiter

    def _transmission_over(self, entry_id: str) -> None:
        for waiter in self._transmitting.pop(entry_id, ()):
            waiter.callback(None)

    def delete(self, entry_id: str) -> bool:
        """Drop an entry without bouncing it (``pullmail queue --delete``)."""
        entry = self.outbox.get(entry_id)
        if entry is None or entry.claimed:
            return False
        self.outbox.remove(entry_id)
        return True

    # -- the timer --------------------------------------------------------------

    def _due(self, entry: OutboxEntry) -> float | None:
        if entry.claimed:
            return None
        if entry.state == QUEUED:
            return entry.next_attempt
        due = entry.expires
        if self.config.delay_warning > 0 and not entry.warned:
            due = min(due, entry.created + self.config.delay_warning)
        if entry.renotify_at is not None:
            due = min(due, entry.renotify_at)
        return due

    def _push(self, entry: OutboxEntry) -> None:
        due = self._due(entry)
        if due is not None:
            self._due_queue.add(due, entry.id)

    def _arm(self) -> None:
        self._due_queue.arm()

    def _wake(self) -> None:
        """Due entries join their domain's line; sessions take from it."""
        now = self.clock.seconds()
        while self._due_queue.due_now(now):
            due, entry_id = self._due_queue.pop()
            entry = self.outbox.get(entry_id)
            if entry is None or entry_id in self._in_flight or self._due(entry) != due:
                continue  # stale heap item: the entry moved on
            if entry.state == QUEUED:
                self._in_flight.add(entry_id)
                self._lines.setdefault(entry.domain, deque()).append(entry)
            elif entry.renotify_at is not None and entry.renotify_at <= now < entry.expires:
                self._in_flight.add(entry.id)
                self._start(None, self._renotify(entry), [entry.id])
            else:
                self._check_notified(entry, now)
        self._dispatch()
        self._arm()

    def _dispatch(self) -> None:
        """
        Open sessions for the domains with a line: up to SESSIONS_PER_DOMAIN
        each, MAX_SESSIONS in all.  A session keeps taking entries from its
        domain's line until it is empty, so a stream of messages for one
        domain shares a few connections (and their TLS handshakes).
        """
        for domain in list(self._lines):
            while self._lines.get(domain) and self._sessions < MAX_SESSIONS and (
                self._domain_sessions.get(domain, 0) < SESSIONS_PER_DOMAIN
            ):
                batch = self._take(domain)
                if batch:
                    self._start(domain, self._attempt(batch), [e.id for e in batch])
            if not self._lines.get(domain):
                self._lines.pop(domain, None)

    def _take(self, domain: str) -> list[OutboxEntry]:
        """Up to ENTRIES_PER_TAKE entries from C{domain}'s line, counted as attempts."""
        line = self._lines.get(domain)
        batch: list[OutboxEntry] = []
        while line and len(batch) < ENTRIES_PER_TAKE:
            entry = line.popleft()
            if self.outbox.get(entry.id) is entry and entry.state == QUEUED and not entry.claimed:
                entry.attempts += 1
                batch.append(entry)
            else:
                self._in_flight.discard(entry.id)
        return batch

    def _untake(self, domain: str, entries: list[OutboxEntry]) -> None:
        """Give entries back, untried and uncounted, to the front of the line."""
        for entry in reversed(entries):
            entry.attempts -= 1
            self._lines.setdefault(domain, deque()).appendleft(entry)

    def _start(self, domain: str | None, attempt, ids: list[str]) -> None:
        self._sessions += 1
        if domain is not None:
            self._domain_sessions[domain] = self._domain_sessions.get(domain, 0) + 1
        d = defer.Deferred.fromCoroutine(attempt)
        d.addErrback(lambda f: log.failure("attempt {ids}", f, ids=ids))
        d.addBoth(lambda _: self._attempt_done(domain, ids))

    def _attempt_done(self, domain: str | None, ids: list[str]) -> None:
        self._sessions -= 1
        if domain is not None:
            left = self._domain_sessions.pop(domain) - 1
            if left:
                self._domain_sessions[domain] = left
        # Entries handed back to the line are still on their way.
        waiting = {entry.id for entry in self._lines.get(domain, ())}
        self._in_flight.difference_update(set(ids) - waiting)
        self._dispatch()
        self._arm()

    # -- notified entries: expiry and delay warnings ------------------------------

    def _check_notified(self, entry: OutboxEntry, now: float) -> None:
        if now >= entry.expires:
            log.info("{id} not retrieved in time, bouncing", id=entry.id, event="expired",
                     queue_id=entry.queue_id)
            self.outbox.remove(entry.id, after=self._bounce(
                entry, entry.recipients, "5.4.7", None,
                "message not retrieved by the recipient's server in time",
            ))
            return
        if self.config.delay_warning > 0 and not entry.warned:
            entry.warned = True
            self.outbox.update(entry)
            self._unwatched(self._bounce(
                entry, entry.recipients, "4.4.7", None,
                "message not yet retrieved; still waiting", action="delayed",
            ), entry)
        self._push(entry)

    # -- one attempt --------------------------------------------------------------

    async def _attempt(self, entries: list[OutboxEntry]) -> None:
        """One session to the domain of C{entries}: notify or push each."""
        try:
            host, outcomes = await self._try_hosts(entries)
        except _Permanent as e:
            for entry in entries:
                self.outbox.remove(entry.id, after=self._bounce(
                    entry, entry.recipients, "5.1.2", None, str(e)
                ))
            return
        except _Transient as e:
            for entry in entries:
                self._retry_later(entry, str(e))
            return
        for entry, mode, result in outcomes:
            if entry.id not in self._in_flight:
                continue  # applied as soon as its own reply came
            self._finish(entry, mode, host, result)

    def _finish(self, entry: OutboxEntry, mode: str | None, host: str, result) -> None:
        """Record one entry's outcome; it is no longer in flight."""
        self._in_flight.discard(entry.id)
        if isinstance(result, Exception):
            self._retry_later(entry, f"{result.__class__.__name__}: {result}")
        else:
            self._apply(entry, mode, host, result)

    async def _renotify(self, entry: OutboxEntry) -> None:
        """
        Announce a notified entry again (after a restart or a broken
        transfer); it stays retrievable meanwhile.  Failures retry on
        push_retry until the entry expires.
        """
        try:
            _, outcomes = await self._try_hosts([entry], pull_only=True)
            result = outcomes[0][2] if outcomes else _Transient("no notification was sent")
            if isinstance(result, Exception):
                raise _Transient(str(result))
            accepted, reason = bool(result.final and result.final.positive), str(result.final)
        except (_Transient, _Permanent) as e:
            accepted, reason = False, str(e)
        if self.outbox.get(entry.id) is not entry:
            return  # retrieved, deleted or expired meanwhile
        now = self.clock.seconds()
        if accepted:
            entry.renotify_at = None
        else:
            entry.attempts += 1
            delay = self.config.push_retry[min(entry.attempts - 1, len(self.config.push_retry) - 1)]
            entry.renotify_at = now + delay if now + delay < entry.expires else None
        log.info("renotified {id} ({queue_id}): {outcome}", id=entry.id,
                 queue_id=entry.queue_id, outcome="accepted" if accepted else reason,
                 event="renotified")
        self.outbox.update(entry)
        self._push(entry)

    async def _try_hosts(self, entries: list[OutboxEntry], pull_only: bool = False):
        """
        Open a session with the first mail host that answers, in preference
        order, and run every entry's transaction over it.  Returns the host
        and, per entry, (entry, mode, result or the exception that broke it).
        """
        domain = entries[0].domain
        if self.config.smarthost:
            host, port = self.config.smarthost
            targets = [(host, port)]
        else:
            try:
                hosts = await mail_hosts(self.resolver, domain)
            except DNSPermanentError as e:
                raise _Permanent(f"domain {domain} does not exist") from e
            except DNSTemporaryError as e:
                raise _Transient(f"DNS: {e}") from e
            if not hosts:
                raise _Permanent(f"domain {domain} accepts no mail (null MX)")
            targets = [(host, self.config.remote_port) for host in hosts]
        # RFC 8461 5.1: with MTA-STS, an enforce policy skips unlisted MX hosts.
        policy = None
        if self.mta_sts is not None and not self.config.smarthost:
            policy = await self.mta_sts.policy_for(domain)
        errors = []
        for host, port in targets:
            refused = policy and self.mta_sts.refusal(policy, domain, host)
            if refused:
                errors.append(refused)
                continue
            try:
                addresses = await self.resolver.addresses(host)
            except DNSTemporaryError as e:
                errors.append(f"{host}: {e}")
                continue
            for address in addresses:
                try:
                    outcomes = await self._session(entries, host, address, port, pull_only,
                                                   policy)
                except Exception as e:  # any failure of this host: try the next
                    errors.append(f"{host}[{address}]: {e.__class__.__name__}: {e}")
                    log.info("session for {domain} ({ids}) with {host} [{address}] failed: "
                             "{error}", domain=domain, ids=" ".join(e.id for e in entries),
                             host=host, address=address, error=str(e), event="attempt")
                    continue
                return host, outcomes
        raise _Transient("; ".join(errors) or "no address for any mail host")

    async def _session(self, entries: list[OutboxEntry], host: str, address: str, port: int,
                       pull_only: bool = False, policy=None) -> list:
        connection = await self.connect(address, port)
        outcomes: list = []
        try:
            tls = self.client_tls
            if policy is not None:
                keywords = await self.mta_sts.open_session(
                    policy, entries[0].domain, connection, self.hostname, host, tls)
            else:
                keywords = await open_session(
                    connection, self.hostname, tls.options_for(host) if tls else None,
                    require_tls=bool(tls and tls.required),
                )
            log.info("session with {host} [{address}]: {tls}", host=host, address=address,
                     tls=("TLS, certificate verified" if tls and tls.required else "TLS")
                     if "_TLS" in keywords else "no TLS (not offered)", event="tls-outcome")
            pull = "GDEL" in keywords
            if not pull and (pull_only or not self.config.push_fallback):
                raise _TransientPeer("peer does not offer GDEL and push_fallback is off")
            pending = list(entries)
            while pending:
                entry = pending.pop(0)
                if not pull_only and (entry.claimed or self.outbox.get(entry.id) is not entry):
                    # Retrieved while it waited: the RETR won; nothing to send.
                    self._in_flight.discard(entry.id)
                    continue
                if not pull_only:
                    self._transmitting[entry.id] = []
                try:
                    result = await self._transaction(connection, keywords, entry, pull)
                except Exception as e:
                    # The connection broke: this entry and the rest try again later.
                    self._transmission_over(entry.id)
                    outcomes.extend((rest, None, e) for rest in [entry] + pending)
                    break
                mode = "pull" if pull else "push"
                outcomes.append((entry, mode, result))
                if pull_only:
                    continue
                # At once, not after the session: the receiver may send RETR
                # for this id while we notify the next one.
                try:
                    self._finish(entry, mode, host, result)
                finally:
                    self._transmission_over(entry.id)
                if result.refused(permanent=False) or (
                    result.final is not None and result.final.transient
                ):
                    # The peer is struggling: leave the rest to new sessions.
                    self._untake(entry.domain, pending)
                    break
                if not pending:
                    pending = self._take(entry.domain)
        finally:
            connection.quit()
        return outcomes

    async def _transaction(self, connection, keywords: dict, entry: OutboxEntry,
                           pull: bool) -> TransactionResult:
        pipelining = "PIPELINING" in keywords
        size = entry.size if "SIZE" in keywords else None
        if pull:
            return await send_notification(
                connection, entry.sender, entry.recipients, entry.id, size=size,
                pipelining=pipelining,
            )
        message = await self.run_blocking(self.outbox.read_message, entry.id)
        return await send_transaction(
            connection, entry.sender, entry.recipients, [message], size=size,
            body=entry.body if "8BITMIME" in keywords else None, pipelining=pipelining,
        )

    def _apply(self, entry: OutboxEntry, mode: str, host: str, result: TransactionResult) -> None:
        now = self.clock.seconds()
        accepted = result.accepted()
        permanent = result.refused(permanent=True)
        transient = result.refused(permanent=False)
        bounced = self._bounce_refused(entry, permanent, result, host)
        log.info(
            "{mode} attempt {id} ({queue_id}) to {host}: accepted {accepted}, "
            "refused {permanent}, deferred {transient}",
            mode=mode, id=entry.id, queue_id=entry.queue_id, host=host, accepted=accepted,
            permanent=permanent, transient=transient, event="attempt",
        )
        if mode == "pull" and accepted:
            if transient:
                self._split_off(entry, transient, result)
            entry.recipients = accepted
            entry.state = NOTIFIED
            entry.notified_at = now
            entry.expires = entry.created + self.config.outbox_lifetime
            self.outbox.update(entry)
            self._push(entry)
            return
        if mode == "push" and accepted:
            log.info("delivered {queue_id} to {recipients} at {host}", queue_id=entry.queue_id,
                     recipients=accepted, host=host, event="delivered")
        entry.recipients = transient
        if not transient:
            self.outbox.remove(entry.id, after=bounced)
            return
        self._unwatched(bounced, entry)
        self._retry_later(entry, str(result.recipients[transient[0]]))

    def _split_off(self, entry: OutboxEntry, recipients: list[str], result) -> None:
        """Recipients deferred while others were notified get their own entry."""
        sibling = replace(entry, id=new_gdel_id(), recipients=recipients, claimed=False)
        self.outbox.add_sibling(entry.id, sibling)
        self._retry_later(sibling, str(result.recipients[recipients[0]]))

    def _retry_later(self, entry: OutboxEntry, reason: str) -> None:
        now = self.clock.seconds()
        entry.last_error = reason[:500]
        when = push_retry_at(entry.attempts, now, entry.created, self.config.push_retry,
                             self.config.push_lifetime)
        if when is None:
            log.info("giving up on {id} ({queue_id}): {reason}", id=entry.id,
                     queue_id=entry.queue_id, reason=reason, event="expired")
            self.outbox.remove(entry.id, after=self._bounce(
                entry, entry.recipients, "4.4.7", None,
                f"delivery time expired; last error: {reason}",
            ))
            return
        entry.state, entry.next_attempt = QUEUED, when
        self.outbox.update(entry)
        self._push(entry)
        log.info("deferred {id} ({queue_id}) until {when}: {reason}", id=entry.id,
                 queue_id=entry.queue_id, when=when, reason=reason, event="deferred")

    # -- results of retrievals (from the RETR counter) ---------------------------

    def retrieval_finished(self, entry: OutboxEntry, result: TransactionResult | None,
                           peer: str, host: str | None = None) -> None:
        """
        SPEC 4: accepted recipients are done, 5xx ones bounce, 4xx ones wait
        for another RETR; a broken transfer (C{result} None) releases the claim.
        C{host} is the MX host name that C{peer} proved to be (Remote-MTA).
        """
        if result is None:
            # SPEC 4 "no false bounce": the receiver may have stored the
            # message before the link broke, so it must be told again, and
            # will fetch it again (dropping the duplicate) to let us see 250.
            log.info("retrieval of {id} by {peer} broke off; notifying again", id=entry.id,
                     peer=peer, event="retrieval-broken")
            self.outbox.release(entry.id)
            entry.renotify_at = self.clock.seconds()
            self.outbox.update(entry)
            self._push(entry)
            self._arm()
            return
        accepted = result.accepted()
        permanent = result.refused(permanent=True)
        bounced = self._bounce_refused(entry, permanent, result, host)
        log.info("retrieved {id} ({queue_id}) by {peer}: accepted {accepted}, refused {refused}",
                 id=entry.id, queue_id=entry.queue_id, peer=peer, accepted=accepted,
                 refused=permanent, event="retrieved")
        remaining = result.refused(permanent=False) + [
            r for r in entry.recipients if r not in result.recipients
        ]
        if not remaining:
            self.outbox.remove(entry.id, after=bounced)
            return
        self._unwatched(bounced, entry)
        entry.recipients = remaining
        self.outbox.update(entry)
        self.outbox.release(entry.id)
        self._push(entry)
        self._arm()

    # -- bounces --------------------------------------------------------------------

    def _bounce_refused(self, entry, recipients, result: TransactionResult, host) -> defer.Deferred:
        """One DSN for every recipient the peer refused, each with its reply."""
        failed = []
        for recipient in recipients:
            reply: Reply = result.recipients[recipient]
            failed.append(bounce.FailedRecipient(
                recipient, reply.enhanced or "5.0.0",
                f"{reply.code} {reply.enhanced} {reply.text}".strip(), host,
            ))
        return self._send_dsn(entry, failed, "failed")

    def _bounce(self, entry: OutboxEntry, recipients: Sequence[str], status: str,
                diagnostic: str | None, reason: str | None, *, action: str = "failed") -> defer.Deferred:
        failed = [
            bounce.FailedRecipient(r, status, diagnostic or reason, None, action)
            for r in recipients
        ]
        return self._send_dsn(entry, failed, action)

    def _send_dsn(self, entry: OutboxEntry, failed: list, action: str) -> defer.Deferred:
        """
        Fires once the DSN is stored, or rightly not sent; fails if storing
        it failed.  Callers remove the entry only after it (L{IOutbox.remove}).
        """
        if not failed:
            return defer.succeed(None)
        if not bounce.should_bounce(entry.sender):
            log.info("not bouncing a bounce: {id}", id=entry.id, event="bounce-dropped")
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._send_bounce(entry, failed, action))

    @staticmethod
    def _unwatched(bounced: defer.Deferred, entry: OutboxEntry) -> None:
        """A DSN whose entry stays: a failure to store it is only logged."""
        bounced.addErrback(lambda f: log.failure("sending a DSN for {id}", f, id=entry.id))

    async def _send_bounce(self, entry: OutboxEntry, failed: list, action: str) -> None:
        # SPEC 7: never bounce to an address that failed SPF (no backscatter).
        if entry.origin and self.sender_authorised is not None:
            if not await self.sender_authorised(entry.origin, entry.sender):
                log.info("not bouncing {queue_id} to <{sender}>: SPF does not authorise "
                         "{origin}", queue_id=entry.queue_id, sender=entry.sender,
                         origin=entry.origin, event="bounce-dropped")
                return
        try:
            original = await self.run_blocking(self.outbox.read_message, entry.id)
        except OSError:
            original = b""
        message = bounce.build_dsn(
            reporting_mta=self.hostname, original_sender=entry.sender, recipients=failed,
            original=original, queue_id=entry.queue_id, arrival_date=entry.created,
            now=self.clock.seconds(), boundary="=_" + secrets.token_hex(12),
            message_id=f"{secrets.token_hex(12)}@{self.hostname}",
        )
        recipients = [f.address for f in failed]
        status = ",".join(sorted({f.status for f in failed}))
        log.info("{action} DSN for {queue_id} to <{sender}>: {recipients} {status}",
                 action=action, queue_id=entry.queue_id, sender=entry.sender,
                 recipients=recipients, status=status, event="bounced")
        await defer.maybeDeferred(self.send_bounce, entry.sender, message)


class _TransientPeer(Exception):
    """The peer can take neither a notification nor a push."""
