"""
Outbound delivery, the SMTA's side of SPEC 7.

For each outbox entry that is due: find the recipient domain's mail hosts,
connect from the node's own address, EHLO, STARTTLS when offered; then, if
the peer offers GDEL, notify and keep the entry until it is retrieved or
expires, else push it by MAIL/RCPT/DATA.  4xx or no answer: retry on
``push_retry``.  5xx, or the end of a lifetime: bounce (RFC 3464).

This is the glue: what an outcome does to an entry is decided by
L{lifecycle.step}, what runs next by the L{Dispatcher} (one timer over the
whole outbox, so nothing polls and a million waiting entries cost nothing
until they are due), the sessions are L{session.Courier}'s, the DSNs
L{bouncer.Bouncer}'s.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.config import DeliveryConfig
from pullmail.ids import new_gdel_id
from pullmail.interfaces import IOutbox
from pullmail.net.dns import Resolver
from pullmail.outbound import lifecycle
from pullmail.outbound.bouncer import Bouncer, Reports
from pullmail.outbound.cluster import ClusterWork
from pullmail.outbound.lifecycle import (
    Attempted,
    Bounce,
    ClaimReleased,
    Due,
    Failed,
    LineUp,
    Log,
    NotifyAgain,
    Release,
    Remove,
    Renotified,
    RetrievalBroken,
    Retrieved,
    SplitOff,
    Unreachable,
    Update,
    due_at,
)
from pullmail.outbound.session import (
    ENTRIES_PER_TAKE,
    Courier,
    Permanent,
    Transient,
    count_attempts,
)
from pullmail.scheduling.dispatch import Dispatcher, Work
from pullmail.smtp.client import TransactionResult
from pullmail.storage.outbox import QUEUED, OutboxEntry, WritesBehind

__all__ = ["Outbound"]

log = Logger(namespace="pullmail.outbound.delivery")

# Concurrent outbound sessions; more would only contend for the uplink.
MAX_SESSIONS = 20
# Connections open to one domain at once.
SESSIONS_PER_DOMAIN = 4
# Entries put on the timer per turn of the reactor at start-up: a few
# milliseconds (10,000 took ~30 ms, more on a busy machine).
TIMER_SLICE = 2_000

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
        reports: Reports | None = None,
    ) -> None:
        self.outbox = outbox
        self.resolver = resolver
        self.connect = connect
        self.clock = clock
        self.run_blocking = run_blocking
        self.hostname = hostname
        self.config = config
        self.client_tls = client_tls
        self.send_bounce = send_bounce
        self.sender_authorised = sender_authorised
        self.mta_sts = mta_sts   # an outbound.sts.MTASTS when [delivery] mta_sts is on
        self.bouncer = Bouncer(self, reports or Reports(
            hostname, clock, lambda sender, message: self.send_bounce(sender, message),
            sender_authorised))
        self._stopped = False
        self.loaded: defer.Deferred = defer.succeed(None)   # fires once start() has the outbox
        # Sessions: SESSIONS_PER_DOMAIN per domain, MAX_SESSIONS in all, each
        # keeping on with its domain's line until it is empty, so a stream of
        # messages for one domain shares a few connections (and their TLS
        # handshakes).
        self._dispatcher: Dispatcher[OutboxEntry] = Dispatcher(
            clock, wake=self._wake, start=self._start, ident=lambda entry: entry.id,
            total=MAX_SESSIONS, per_key=SESSIONS_PER_DOMAIN, batch=ENTRIES_PER_TAKE,
            current=self._current, spare=1,
        )
        self.courier = Courier(self, self._dispatcher)
        # A shared outbox (SPEC 11.3): due work is taken in the database first,
        # and other nodes read every state: none waits to be written.
        self.cluster = ClusterWork(self) if outbox.shared else None
        self._behind = None if outbox.shared else WritesBehind(outbox, clock)

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """
        Load the outbox; released claims are notified again (SPEC 4).  An
        outbox read in the background (L{MaildirOutbox.load}) is put on
        the timer once read; L{loaded} fires then.
        """
        self._stopped = False
        released = self.outbox.load()
        if isinstance(released, defer.Deferred):
            self.loaded = released.addCallback(self._loaded)
            self.loaded.addErrback(lambda f: log.failure("loading the outbox", f))
        else:
            self._loaded(released)
            self.loaded = defer.succeed(None)

    def _loaded(self, released_ids) -> None:
        if not self._stopped:
            self._put_on_timer(self.outbox.entries(), set(released_ids))

    def _put_on_timer(self, entries, released: set[str]) -> None:
        """
        Every entry joins the timer, L{TIMER_SLICE} per turn of the reactor
        so that a million do not stop it for seconds.  One that changes
        meanwhile is put on the timer by its change as well (the stale
        time is skipped when due).
        """
        if self._stopped:
            return
        taken = list(islice(entries, TIMER_SLICE))
        for entry in taken:
            if entry.id in released:
                self._step(entry, ClaimReleased())
            else:
                self._push(entry)
        self._arm()
        if len(taken) == TIMER_SLICE:
            self.clock.callLater(0, self._put_on_timer, entries, released)
            return
        log.info("outbox loaded: {count} entries, {released} claims released",
                 count=len(self.outbox), released=len(released))

    def stop(self) -> None:
        self._stopped = True
        self._dispatcher.stop()
        if self._behind is not None:
            self._behind.flush()

    # -- entry points -----------------------------------------------------------

    def enqueue(self, queue_id: str, sender: str, recipients: Sequence[str],
                chunks: Sequence[bytes], origin: str | None = None,
                smtputf8: bool = False, dsn: dict | None = None) -> defer.Deferred:
        """
        Queue a message for remote recipients: one entry per domain.
        C{origin} is the outside address it came from (forwarded mail), so
        that a bounce never goes to a sender that address may not speak for.
        C{smtputf8}: it goes only to peers that offer SMTPUTF8 (RFC 6531 3.2).
        C{dsn}: its DSN parameters (L{pullmail.smtp.dsn}), kept per entry.
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
                body="8BITMIME" if eight_bit else None, origin=origin, smtputf8=smtputf8,
                dsn=_dsn_for(dsn or {}, rcpts),
            )
            for domain, rcpts in sorted(by_domain.items())
        ]
        d = self.run_blocking(self.outbox.add, entries, list(chunks))

        def stored(_: object) -> None:
            for entry in entries:
                maillog.QUEUED(log, queue_id=queue_id, id=entry.id, recipients=entry.recipients)
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
        return self.courier.on_the_wire(entry_id)

    def transmitted(self, entry_id: str) -> defer.Deferred:
        """
        Fires once the entry is no longer in flight and its outcome (say,
        "notified") is recorded: an RMTA may act on our GDEL's 250, and
        send RETR on another connection, before we have read that reply.
        """
        return self.courier.transmitted(entry_id)

    def delete(self, entry_id: str) -> bool:
        """Drop an entry without bouncing it (``pullmail queue --delete``)."""
        entry = self.outbox.get(entry_id)
        if entry is None or entry.claimed:
            return False
        self.outbox.remove(entry_id)
        return True

    # -- the timer and the dispatcher ------------------------------------------------

    def _push(self, entry: OutboxEntry) -> None:
        due = due_at(entry, self.config)
        if due is not None:
            self._dispatcher.schedule(due, entry.id)

    def _arm(self) -> None:
        self._dispatcher.arm()

    def _wake(self) -> None:
        """Due entries join their domain's line, or are seen to; sessions take from it."""
        now = self.clock.seconds()
        for due, entry_id in self._dispatcher.due(now):
            entry = self.outbox.get(entry_id)
            if entry is None or due_at(entry, self.config) != due:
                continue  # stale heap item: the entry moved on
            if self.cluster is not None:
                self.cluster.take_due(entry_id)
                continue
            self._step(entry, Due())
        self._dispatcher.dispatch()
        self._arm()

    def _current(self, entry: OutboxEntry) -> bool:
        """Still queued, unclaimed, not held and stored when its turn in the line comes."""
        return self.outbox.get(entry.id) is entry and entry.state == QUEUED and not (
            entry.claimed or entry.held
        )

    def _start(self, work: Work[OutboxEntry]) -> None:
        count_attempts(work.items)
        self._run(work, self._attempt(work))

    def _run(self, work: Work[OutboxEntry], attempt) -> None:
        d = defer.Deferred.fromCoroutine(attempt)
        d.addErrback(lambda f: log.failure("attempt {ids}", f, ids=[e.id for e in work.items]))
        d.addBoth(lambda _: self._dispatcher.finished(work))

    # -- attempts ----------------------------------------------------------------------

    async def _attempt(self, work: Work[OutboxEntry]) -> None:
        """One session to the domain of the work's entries: notify or push each."""
        entries = list(work.items)
        try:
            host, outcomes = await self.courier.try_hosts(work)
        except Permanent as e:
            for entry in entries:
                self._step(entry, Unreachable(str(e), e.status))
            return
        except Transient as e:
            for entry in entries:
                self._step(entry, Failed(str(e)))
            return
        for entry, mode, result in outcomes:
            if not self._dispatcher.busy(entry.id):
                continue  # applied as soon as its own reply came
            self.finish(entry, mode, host, result)

    def finish(self, entry: OutboxEntry, mode: str | None, host: str, result) -> None:
        """Record one entry's outcome; it is no longer in flight."""
        self._dispatcher.done_with(entry.id)
        if isinstance(result, Exception):
            self._step(entry, Failed(f"{result.__class__.__name__}: {result}"))
        else:
            self._step(entry, Attempted(mode, host, result))

    async def _renotify(self, work: Work[OutboxEntry]) -> None:
        """
        Announce a notified entry again (after a restart or a broken
        transfer); it stays retrievable meanwhile.  Failures retry on
        push_retry until the entry expires.
        """
        entry = work.items[0]
        try:
            _, outcomes = await self.courier.try_hosts(work, pull_only=True)
            result = outcomes[0][2] if outcomes else Transient("no notification was sent")
            if isinstance(result, Exception):
                raise Transient(str(result))
            accepted, reason = bool(result.final and result.final.positive), str(result.final)
        except (Transient, Permanent) as e:
            accepted, reason = False, str(e)
        if self.outbox.get(entry.id) is not entry:
            return  # retrieved, deleted or expired meanwhile
        self._step(entry, Renotified(accepted, reason))

    # -- results of retrievals (from the RETR counter) ---------------------------

    def retrieval_finished(self, entry: OutboxEntry, result: TransactionResult | None,
                           peer: str, host: str | None = None) -> None:
        """
        SPEC 4: accepted recipients are done, 5xx ones bounce, 4xx ones wait
        for another RETR; a broken transfer (C{result} None) releases the claim.
        C{host} is the MX host name that C{peer} proved to be (Remote-MTA).
        """
        # SPEC 4 "no false bounce": after a broken transfer the receiver may
        # have stored the message, so it must be told again, and will fetch
        # it again (dropping the duplicate) to let us see 250.
        outcome = RetrievalBroken(peer) if result is None else Retrieved(result, peer, host)
        self._step(entry, outcome)
        self._arm()

    # -- carrying out the lifecycle's decisions ----------------------------------------

    def _step(self, entry: OutboxEntry, outcome) -> None:
        new, due, effects = lifecycle.step(entry, outcome, self.clock.seconds(), self.config,
                                           new_id=new_gdel_id)
        # The same object stays in the outbox's index: lines and RETRs hold it.
        claimed = entry.claimed
        entry.take_over(new)
        entry.claimed = claimed   # only the outbox changes a claim (Release)
        self._carry_out(entry, due, effects)

    def _carry_out(self, entry: OutboxEntry, due: float | None, effects) -> None:
        bounced = None
        for effect in effects:
            if isinstance(effect, Log):
                effect.event(log, **effect.fields)
            elif isinstance(effect, Bounce):
                self._unwatched(bounced, entry)
                bounced = self.bouncer.send(entry, list(effect.failed), effect.action)
            elif isinstance(effect, Remove):
                self.outbox.remove(entry.id, after=bounced)
                bounced = None
            elif isinstance(effect, Update):
                if self._behind is None:
                    self.outbox.update(entry)
                elif effect.may_wait:
                    self._behind.add(entry)
                else:
                    self._behind.discard(entry.id)
                    self.outbox.update(entry)
            elif isinstance(effect, Release):
                self.outbox.release(entry.id)
            elif isinstance(effect, SplitOff):
                self.outbox.add_sibling(entry.id, effect.sibling)
                self._carry_out(effect.sibling, effect.due, effect.effects)
            elif isinstance(effect, LineUp):
                self._dispatcher.line_up(entry.domain, entry)
            elif isinstance(effect, NotifyAgain):
                work = self._dispatcher.run_now([entry])
                self._run(work, self._renotify(work))
            else:
                raise TypeError(f"not an effect: {effect!r}")
        self._unwatched(bounced, entry)
        if due is not None:
            self._dispatcher.schedule(due, entry.id)

    @staticmethod
    def _unwatched(bounced: defer.Deferred | None, entry: OutboxEntry) -> None:
        """A DSN whose entry stays: a failure to store it is only logged."""
        if bounced is not None:
            bounced.addErrback(lambda f: log.failure("sending a DSN for {id}", f, id=entry.id))


def _dsn_for(dsn: dict, recipients: Sequence[str]) -> dict:
    """The part of a message's DSN parameters that concerns C{recipients}."""
    kept = {k: v for k, v in dsn.items() if k in ("ret", "envid")}
    for name in ("notify", "orcpt"):
        values = {r: dsn[name][r] for r in recipients if r in dsn.get(name, {})}
        if values:
            kept[name] = values
    return kept
