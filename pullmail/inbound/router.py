"""
Where an accepted message goes: local recipients to their mailboxes (maildirs,
or an LMTP store), the rest to the outbound queue.  The reply to end-of-data
is decided here, and it is ``250`` only when every copy is durable: stored,
queued, or (for local recipients an LMTP store refused) queued for retry or
bounced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.accounts.users import Accounts
from pullmail.ids import new_queue_id
from pullmail.inbound.headers import complete_submission, rfc5322_date
from pullmail.inbound.verdicts import MessageChecker, Verdict
from pullmail.interfaces import DeliveryOutcome, IDeliveryAgent
from pullmail.outbound import bounce
from pullmail.outbound.bouncer import Reports
from pullmail.smtp import dsn, replies
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.loops import delivered_to, header_block
from pullmail.smtp.replies import Reply
from pullmail.storage.maildir import JUNK, mailbox_path
from pullmail.trust.dkim import Signer
from pullmail.trust.spf import SPFIdentity

__all__ = ["Router", "received_header", "one_refusal", "needs_smtputf8"]

log = Logger(namespace="pullmail.inbound.router")


def received_header(
    session: Session, hostname: str, queue_id: str, recipients: Sequence[str], now: float,
    utf8: bool = False,
) -> bytes:
    """
    The trace header of RFC 5321 4.4 (with RFC 3848's ``with`` values;
    ``UTF8`` before them for a transaction with SMTPUTF8, RFC 6531 3.7.3).
    """
    # RFC 5321 4.1.3: IPv6 address literals carry an "IPv6:" tag.
    literal = f"IPv6:{session.peer}" if ":" in session.peer else session.peer
    source = f"{session.helo or 'unknown'} ([{literal}])"
    lines = [
        f"Received: from {source}",
        f"\tby {hostname} (pullmail) with {'UTF8' if utf8 else ''}{session.protocol_name}"
        f" id {queue_id}",
    ]
    date = rfc5322_date(now)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def needs_smtputf8(envelope: Envelope, recipients: Sequence[str], chunks: Sequence[bytes]) -> bool:
    """
    RFC 6531 3.2: whether a message taken with ``SMTPUTF8`` may go on only
    to peers that offer it: a UTF-8 address on the way, or a UTF-8 header
    (RFC 6532).  Domains are A-labels already, so only local parts count.
    """
    if "SMTPUTF8" not in envelope.params:
        return False
    return not (envelope.sender + "".join(recipients)).isascii() or not (
        header_block(chunks).isascii())


def one_refusal(outcome: DeliveryOutcome, queued_remote: bool) -> Reply | None:
    """
    The reply to end-of-data when the local store refused every local
    recipient alike (all 4xx, or all 5xx) and nothing else was accepted:
    its first such reply, passed straight back, so the client retries or
    bounces itself.  None when anything was delivered, queued or kept in
    doubt (or the refusals differ): the client must then hear 250 (RFC
    5321 has one reply to DATA), and the refused recipients are the
    node's to retry or bounce (L{Router._take_refused}).  A recipient in
    doubt (L{pullmail.storage.indoubt}) must not be sent again by anyone.
    """
    if outcome.delivered or outcome.in_doubt or queued_remote or not outcome.refused:
        return None
    answers = list(outcome.refused.values())
    if all(r.transient for r in answers) or all(r.permanent for r in answers):
        # The store's text goes to a client: printable characters only.
        text = "\n".join("".join(c if c.isprintable() else " " for c in line)
                         for line in answers[0].text.split("\n"))
        return answers[0].with_text(text)
    return None


class Router:
    def __init__(
        self,
        hostname: str,
        accounts: Accounts,
        delivery: IDeliveryAgent,
        clock: IReactorTime,
        outbound=None,
        hooks: Sequence = (),
        checker: MessageChecker | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.hostname = hostname
        self.accounts = accounts
        self.delivery = delivery
        self.clock = clock
        self.outbound = outbound
        self.hooks = tuple(hooks)
        # Retries and bounces for local recipients an LMTP store refused
        # (L{pullmail.outbound.local.LocalQueue}); a maildir refuses nobody.
        self.local_queue = None
        self.checker = checker
        self.signer = signer
        # How reports go (L{Reports}: DSN parameters, SPF, RET=FULL's limit),
        # shared with the queues; made here when not given.
        self.reports: Reports | None = None

    def outgoing(self, chunks: Sequence[bytes]) -> defer.Deferred:
        """
        Fires with a message as it enters the outbox: DKIM-signed when its
        From domain is ours (SPEC 11.1), once; retries send these same
        bytes.  Every path into the outbox (submission, bounces, forwards,
        sendmail) goes through here.
        """
        if self.signer is None:
            return defer.succeed(list(chunks))
        return self.signer.signing(chunks)

    async def _forwarded(self, message: list[bytes], verdict: Verdict | None,
                         recipients: Sequence[str]) -> list[bytes]:
        """
        Received mail an alias sends on: our verdicts on top, signed when
        the From domain is ours, and sealed (ARC, RFC 8617) by the alias's
        domain so the next hop can trust them.
        """
        if verdict is None:
            return await self.outgoing(message)
        signed = b"".join(await self.outgoing([verdict.header] + message))
        forwarder = next((r.rpartition("@")[2] for r in recipients
                          if r.rpartition("@")[2] in self.accounts.domains), None)
        if self.signer is None or forwarder is None:
            return [signed]
        arc = await self.signer.sealing(signed, forwarder, verdict.header, verdict.chain)
        return arc + [signed]

    async def _verdict(self, session: Session, envelope: Envelope, chunks,
                       identity: SPFIdentity | None) -> Verdict | None:
        if self.checker is None:
            return None
        whole = b"".join(chunks)
        if session.user is not None or session.service != "smtp":
            return self.checker.submitted(whole, session.user)
        identity = identity or SPFIdentity(session.peer, session.helo, envelope.sender)
        return await self.checker.check(whole, identity)

    async def _deliver_locally(self, queue_id: str, sender: str, mailboxes: list[str], message,
                               folder: str | None = None) -> DeliveryOutcome:
        """The agent's L{DeliveryOutcome}, hooks told of what it delivered."""
        outcome = await self.delivery.deliver(queue_id, sender, mailboxes, message, folder=folder)
        delivered = list(outcome.delivered)
        for hook in self.hooks if delivered else ():
            try:
                await defer.maybeDeferred(hook.delivered, queue_id, sender, delivered,
                                          list(outcome.paths))
            except Exception:
                log.failure("delivery hook {name} failed", name=hook.name)
        return outcome

    def _take_refused(self, queue_id: str, sender: str, outcome: DeliveryOutcome, message,
                      origin: str | None, dsn_params: dict | None = None) -> defer.Deferred:
        """
        Local recipients the store refused once the message is ours: the
        local queue retries the 4xx ones and bounces the 5xx ones.  Fires
        once that is durable.
        """
        if not outcome.refused:
            return defer.succeed(None)
        if self.local_queue is None:
            return defer.fail(OSError(f"no local queue for {sorted(outcome.refused)}"))
        return self.local_queue.take(queue_id, sender, outcome, message, origin, dsn_params)

    def dsn_of(self, envelope: Envelope) -> dict:
        """
        The message's DSN parameters (L{dsn}), per final address: an alias's
        NOTIFY and ORCPT hold for what it expands to.
        """
        by_final = {final: params for recipient, params in envelope.rcpt_params.items()
                    for final in self.accounts.expand(recipient)}
        return dsn.for_recipients(envelope.params, by_final)

    @defer.inlineCallbacks
    def _report_delivered(self, queue_id: str, sender: str, dsn_params: dict,
                          delivered: list[str], message: list[bytes], origin: str | None):
        """
        RFC 3461 4.1: NOTIFY=SUCCESS and final delivery here: "Action:
        delivered", under the rules of every report (L{Reports}: not to a
        sender whose SPF does not back C{origin}).
        """
        reports = self.reports or Reports(self.hostname, self.clock, self._send_report)
        try:
            sent = yield defer.Deferred.fromCoroutine(reports.send(
                queue_id=queue_id, sender=sender, dsn_params=dsn_params, origin=origin,
                arrival=self.clock.seconds(), action="delivered", original=b"".join(message),
                recipients=[bounce.FailedRecipient(r, "2.0.0", None, None, "delivered")
                            for r in delivered],
            ))
        except OSError as e:    # the mail is delivered; only its report is lost
            maillog.STORE_FAILED(log, queue_id=queue_id, error=f"success report: {e}")
            return
        if sent:
            maillog.BOUNCED(log, action="delivered", queue_id=queue_id, sender=sender,
                            recipients=sent, status="2.0.0")

    def _send_report(self, sender: str, message: bytes) -> defer.Deferred:
        return self.inject("", [sender], [message])

    def split(self, recipients: Sequence[str]) -> tuple[list[str], list[str]]:
        """Expand aliases: (local mailboxes, remote addresses)."""
        local: dict[str, None] = {}
        remote: dict[str, None] = {}
        for recipient in recipients:
            for final in self.accounts.expand(recipient):
                if final.rpartition("@")[2] in self.accounts.domains:
                    local[final] = None
                else:
                    remote[final] = None
        return list(local), list(remote)

    def delivered_of(self, wanted: Mapping[str, Sequence[str]]) -> set[str]:
        """
        Blocking: which queue ids of C{wanted} (queue id -> recipients) have
        a message in the maildir, new/ or cur/, of one of their local
        recipients.  Maildir names carry ``_<queue id>.`` (L{MaildirNames});
        each mailbox is listed once, however many ids are looked for in it.
        """
        if self.delivery.root is None:
            return set()   # LMTP: the store cannot be searched; retrieve again
        looked_for: dict[Path, set[str]] = {}
        for queue_id, recipients in wanted.items():
            for address in self.split(recipients)[0]:
                looked_for.setdefault(mailbox_path(self.delivery.root, address), set()).add(queue_id)
        found: set[str] = set()
        for box, queue_ids in looked_for.items():
            for sub in ("new", "cur"):
                try:
                    names = os.listdir(box / sub)
                except FileNotFoundError:
                    continue
                for name in names:
                    _, marked, rest = name.partition("_")
                    if marked and (queue_id := rest.partition(".")[0]) in queue_ids:
                        found.add(queue_id)
        return found

    @defer.inlineCallbacks
    def inject(self, sender: str, recipients: Sequence[str], chunks: Sequence[bytes]):
        """
        Send a message this node made itself (a bounce): local recipients
        get it in their maildirs, others through the outbound queue.
        """
        queue_id = new_queue_id()
        local, remote = self.split(recipients)
        if local:
            message = list(chunks)
            if self.checker is not None:
                verdict = self.checker.local(b"".join(chunks))
                message = [verdict.header, verdict.message]
            outcome = yield defer.Deferred.fromCoroutine(
                self._deliver_locally(queue_id, sender, local, message))
            yield self._take_refused(queue_id, sender, outcome, message, None)
        if remote and self.outbound is not None:
            outgoing = yield self.outgoing(chunks)
            yield self.outbound.enqueue(queue_id, sender, remote, outgoing)
        maillog.INJECTED(log, queue_id=queue_id, sender=sender, recipients=list(recipients))
        return queue_id

    def accept(self, session: Session, envelope: Envelope, chunks: list, size: int,
               queue_id: str | None = None, identity: SPFIdentity | None = None
               ) -> defer.Deferred:
        """
        Store a message; fire with the reply to end-of-data.  A given
        C{queue_id} (retrieved mail) names the stored files, so that
        L{delivered_of} can find them again; a given C{identity} is whom SPF
        asks about (the notifying session's, for retrieved mail).
        """
        return defer.Deferred.fromCoroutine(
            self._accept(session, envelope, chunks, size, queue_id, identity))

    async def _accept(self, session: Session, envelope: Envelope, chunks: list, size: int,
                      queue_id: str | None, identity: SPFIdentity | None) -> Reply:
        # One coroutine, its steps awaited directly: every Deferred less
        # is CPU saved on each message (issue 17).
        service = "retrieval" if queue_id else session.service
        queue_id = queue_id or new_queue_id()
        header = received_header(
            session, self.hostname, queue_id, envelope.recipients, self.clock.seconds(),
            utf8="SMTPUTF8" in envelope.params,
        )
        if session.service != "smtp":
            chunks = complete_submission(
                chunks, self.hostname, self.clock.seconds(), f"{queue_id}.{new_queue_id()}"
            )
        local, remote = self.split(envelope.recipients)
        if local and delivered_to(header_block(chunks)).intersection(local):
            # RFC 5321 6.3: it has been in one of these mailboxes before.
            maillog.MAIL_LOOP(log, queue_id=queue_id, peer=session.peer,
                              reply=str(replies.S554_DELIVERED_BEFORE))
            return replies.S554_DELIVERED_BEFORE
        if remote and self.outbound is None:
            log.warn("no outbound queue for {recipients}", recipients=remote)
            return replies.S451_LOCAL_ERROR
        verdict = await self._verdict(session, envelope, chunks, identity)
        if verdict is not None:
            if verdict.disposition == "reject":
                # RFC 7489 6.6.4 / SPEC 11.1: refused after the data, not stored.
                maillog.DMARC_REJECTED(log, queue_id=queue_id, sender=envelope.sender,
                                       reason=verdict.reason, peer=session.peer)
                return replies.S550_POLICY.with_text(f"Rejected by the {verdict.reason}")
            chunks = [verdict.message]
        message = [header] + list(chunks)
        origin = None if session.user else session.peer
        try:
            outcome = DeliveryOutcome()
            if local:
                outcome = await self._deliver_locally(
                    queue_id, envelope.sender, local,
                    [verdict.header] + message if verdict is not None else message,
                    folder=JUNK if verdict and verdict.disposition == "quarantine" else None)
            refusal = one_refusal(outcome, bool(remote))
            if refusal is not None:
                maillog.LOCAL_REFUSED(
                    log, queue_id=queue_id, reply=str(refusal), refused=sorted(outcome.refused),
                )
                return refusal
            dsn_params = self.dsn_of(envelope)
            if remote:
                outgoing = await (
                    self.outgoing(message) if session.user or session.service != "smtp"
                    else self._forwarded(message, verdict, envelope.recipients))
                await self.outbound.enqueue(queue_id, envelope.sender, remote, outgoing,
                                            origin=origin,
                                            smtputf8=needs_smtputf8(envelope, remote, chunks),
                                            dsn=dsn_params)
            if outcome.refused:
                await self._take_refused(queue_id, envelope.sender, outcome, message, origin,
                                         dsn_params)
        except OSError as e:
            maillog.STORE_FAILED(log, queue_id=queue_id, error=str(e))
            return replies.storage_failure(e)
        if "notify" in dsn_params:     # only NOTIFY=SUCCESS makes a report here
            await self._report_delivered(queue_id, envelope.sender, dsn_params,
                                         list(outcome.delivered), message, origin)
        maillog.ACCEPTED(
            log, queue_id=queue_id, sender=envelope.sender, recipients=list(envelope.recipients),
            size=size + len(header), peer=session.peer, delivered=list(outcome.delivered),
            queued=remote, local_deferred=outcome.transient(), local_bounced=outcome.permanent(),
            in_doubt=list(outcome.in_doubt), service=service,
        )
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
