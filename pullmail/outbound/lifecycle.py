# -*- test-case-name: tests.test_lifecycle -*-
"""
The life of an outbox entry as one pure function (SPEC 4, 5, 7):
L{step}C{(entry, outcome, now, config)} returns the entry as it is to be,
when it is next due, and the effects that the glue (L{delivery}) carries
out, in order: log this, send that DSN, store the entry, remove it.

An entry is C{QUEUED} (an attempt is due at C{next_attempt}: a push, or a
GDEL notification) or C{NOTIFIED} (the peer took the notification; it
waits for RETR until C{expires}, announced again at C{renotify_at} after a
restart or a broken transfer, with a delay warning at C{created +
delay_warning}).  The outcomes that move it:

    Due             its due time came
    ClaimReleased   a retrieval died with the process (start-up)
    Attempted       a peer answered the notification or the push
    Failed          no answer decided it (4xx, no host answered, DNS)
    Unreachable     the domain cannot take mail at all
    Renotified      an announcement again was taken, or not
    Retrieved       a RETR turn ended with replies
    RetrievalBroken a RETR turn broke off

Log texts and event names are those the node has always written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Union

from pullmail import maillog
from pullmail.config import DeliveryConfig
from pullmail.outbound.bounce import FailedRecipient
from pullmail.scheduling.schedule import push_retry_at
from pullmail.smtp.client import TransactionResult
from pullmail.storage.outbox import NOTIFIED, QUEUED, OutboxEntry

__all__ = [
    "Attempted", "Bounce", "ClaimReleased", "Due", "Failed", "LineUp", "Log", "NotifyAgain",
    "Release", "Remove", "RetrievalBroken", "Retrieved", "Renotified", "SplitOff",
    "Unreachable", "Update", "due_at", "step",
]


# -- outcomes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Due:
    """The entry's due time (L{due_at}) came."""


@dataclass(frozen=True)
class ClaimReleased:
    """Start-up released the entry's claim: its retrieval died with the process."""


@dataclass(frozen=True)
class Attempted:
    """A peer answered: C{mode} is ``"pull"`` (GDEL) or ``"push"``."""

    mode: str
    host: str
    result: TransactionResult


@dataclass(frozen=True)
class Failed:
    """The attempt failed for a reason that may pass (4xx, no answer, DNS)."""

    reason: str


@dataclass(frozen=True)
class Unreachable:
    """The domain cannot be reached at all (no such domain, null MX)."""

    reason: str
    status: str = "5.1.2"     # RFC 3463; a null MX is 5.1.10 (RFC 7505 4.1)


@dataclass(frozen=True)
class Renotified:
    accepted: bool
    reason: str


@dataclass(frozen=True)
class Retrieved:
    """A RETR turn ended; C{host} is the MX host the peer proved to be."""

    result: TransactionResult
    peer: str
    host: str | None = None


@dataclass(frozen=True)
class RetrievalBroken:
    peer: str


Outcome = Union[Due, ClaimReleased, Attempted, Failed, Unreachable, Renotified, Retrieved,
                RetrievalBroken]


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LineUp:
    """Join the domain's line for a session (it is due)."""


@dataclass(frozen=True)
class NotifyAgain:
    """Announce the notified entry again (a session of its own)."""


@dataclass(frozen=True)
class Update:
    """
    Store the entry as it now is.  C{may_wait}: the record on disk already
    holds a state a crash may bring the entry back to, at no cost but a
    notification given again (and deduplicated, SPEC 4), so the write may
    wait a little and be left out if the entry is claimed or gone by then
    (L{pullmail.storage.outbox.WritesBehind}).
    """

    may_wait: bool = False


@dataclass(frozen=True)
class Release:
    """Give up the entry's claim: another RETR may take it."""


@dataclass(frozen=True)
class Remove:
    """Forget the entry, once the last L{Bounce} of this step (if any) is stored."""


@dataclass(frozen=True)
class Bounce:
    """Send one DSN to the entry's sender (RFC 3464), if it may get one."""

    failed: tuple[FailedRecipient, ...]
    action: str = "failed"


@dataclass(frozen=True)
class Log:
    """One event of the log vocabulary, with its fields."""

    event: maillog.Event
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SplitOff:
    """
    A new entry for some recipients of this one's message: store it, then
    carry out its own C{effects}; it is next due at C{due}.
    """

    sibling: OutboxEntry
    due: float | None
    effects: tuple


Effect = Union[LineUp, NotifyAgain, Update, Release, Remove, Bounce, Log, SplitOff]
Step = tuple[OutboxEntry, "float | None", tuple]


# -- the function -------------------------------------------------------------------------


def due_at(entry: OutboxEntry, config: DeliveryConfig) -> float | None:
    """When the entry next needs the timer; None while it is claimed."""
    if entry.claimed:
        return None
    if entry.state == QUEUED:
        return entry.next_attempt
    due = entry.expires
    if config.delay_warning > 0 and not entry.warned:
        due = min(due, entry.created + config.delay_warning)
    if entry.renotify_at is not None:
        due = min(due, entry.renotify_at)
    return due


def step(entry: OutboxEntry, outcome: Outcome, now: float, config: DeliveryConfig, *,
         new_id: Callable[[], str] | None = None) -> Step:
    """
    The entry after C{outcome}, when it is next due (None: not on the
    timer, or gone), and the effects to carry out, in order.  C{entry} is
    not changed.  C{new_id} names an entry split off (recipients deferred
    while others took the notification).
    """
    new = copy.copy(entry)
    new.recipients = list(entry.recipients)
    effects: list = []
    if isinstance(outcome, Due):
        kept = _due(new, now, config, effects)
    elif isinstance(outcome, ClaimReleased):
        if new.state == NOTIFIED:
            new.renotify_at = now
            effects.append(Update())
        kept = True
    elif isinstance(outcome, Attempted):
        kept = _attempted(new, outcome, now, config, effects, new_id)
    elif isinstance(outcome, Failed):
        kept = _retry_later(new, outcome.reason, now, config, effects)
    elif isinstance(outcome, Unreachable):
        effects += [_bounce(new.recipients, outcome.status, outcome.reason), Remove()]
        kept = False
    elif isinstance(outcome, Renotified):
        _renotified(new, outcome, now, config, effects)
        kept = True
    elif isinstance(outcome, Retrieved):
        kept = _retrieved(new, outcome, now, effects)
    elif isinstance(outcome, RetrievalBroken):
        effects.append(Log(maillog.RETR_BROKEN, {"id": new.id, "peer": outcome.peer}))
        effects.append(Release())
        new.claimed = False
        new.renotify_at = now
        effects.append(Update())
        kept = True
    else:
        raise TypeError(f"not an outcome: {outcome!r}")
    return new, due_at(new, config) if kept else None, tuple(effects)


def _due(new: OutboxEntry, now: float, config: DeliveryConfig, effects: list) -> bool:
    if new.state == QUEUED:
        effects.append(LineUp())
        return False   # off the timer until the session's outcome
    if new.renotify_at is not None and new.renotify_at <= now < new.expires:
        effects.append(NotifyAgain())
        return False
    if now >= new.expires:
        effects.append(Log(maillog.OUTBOX_EXPIRED, {"id": new.id, "queue_id": new.queue_id}))
        effects += [_bounce(new.recipients, "5.4.7",
                            "message not retrieved by the recipient's server in time"),
                    Remove()]
        return False
    if config.delay_warning > 0 and not new.warned:
        new.warned = True
        effects.append(Update())
        effects.append(_bounce(new.recipients, "4.4.7", "message not yet retrieved; still waiting",
                               action="delayed"))
    return True


def _attempted(new: OutboxEntry, outcome: Attempted, now: float, config: DeliveryConfig,
               effects: list, new_id: Callable[[], str] | None) -> bool:
    result, mode, host = outcome.result, outcome.mode, outcome.host
    accepted = result.accepted()
    permanent = result.refused(permanent=True)
    transient = result.refused(permanent=False)
    effects += _refused(permanent, result, host)
    effects.append(Log(maillog.DELIVERY_ATTEMPT, {"mode": mode, "id": new.id, "queue_id": new.queue_id, "host": host,
         "accepted": accepted, "permanent": permanent, "transient": transient}))
    if mode == "pull" and accepted:
        if transient:
            if new_id is None:
                raise ValueError("splitting off an entry needs new_id")
            sibling = copy.copy(new)
            sibling.id, sibling.recipients, sibling.claimed = new_id(), transient, False
            reason = str(result.recipients[transient[0]])
            sibling_effects: list = []
            kept = _retry_later(sibling, reason, now, config, sibling_effects)
            effects.append(SplitOff(sibling, due_at(sibling, config) if kept else None,
                                    tuple(sibling_effects)))
        new.recipients = accepted
        new.state = NOTIFIED
        new.notified_at = now
        new.expires = new.created + config.outbox_lifetime
        # Everyone took it: the queued record on disk, notified again after
        # a crash, comes to the same.  (A refusal's DSN, or recipients split
        # off, must not be sent or notified twice: those are written now.)
        effects.append(Update(may_wait=not (transient or permanent)))
        return True
    if mode == "push" and accepted:
        effects.append(Log(maillog.DELIVERED, {"queue_id": new.queue_id, "recipients": accepted, "host": host,
                            "seconds": now - new.created}))
    new.recipients = transient
    if not transient:
        effects.append(Remove())
        return False
    return _retry_later(new, str(result.recipients[transient[0]]), now, config, effects)


def _retry_later(new: OutboxEntry, reason: str, now: float, config: DeliveryConfig,
                 effects: list) -> bool:
    """Queued again on C{push_retry}; at the end of C{push_lifetime}, bounced."""
    new.last_error = reason[:500]
    when = push_retry_at(new.attempts, now, new.created, config.push_retry, config.push_lifetime)
    if when is None:
        effects.append(Log(maillog.PUSH_EXPIRED, {"id": new.id, "queue_id": new.queue_id, "reason": reason}))
        effects += [_bounce(new.recipients, "4.4.7",
                            f"delivery time expired; last error: {reason}"), Remove()]
        return False
    new.state, new.next_attempt = QUEUED, when
    effects.append(Update())
    effects.append(Log(maillog.DEFERRED, {"id": new.id, "queue_id": new.queue_id, "when": when, "reason": reason}))
    return True


def _renotified(new: OutboxEntry, outcome: Renotified, now: float, config: DeliveryConfig,
                effects: list) -> None:
    """Taken: no more announcing.  Not: again on C{push_retry}, until the entry expires."""
    if outcome.accepted:
        new.renotify_at = None
    else:
        new.attempts += 1
        # The deadline is the expiry itself: counted from 0, it is exactly C{expires}.
        when = push_retry_at(new.attempts, now, 0.0, config.push_retry, new.expires)
        new.renotify_at = when if when is not None and when < new.expires else None
    effects.append(Log(maillog.RENOTIFIED, {"id": new.id, "queue_id": new.queue_id,
                        "outcome": "accepted" if outcome.accepted else outcome.reason}))
    effects.append(Update())


def _retrieved(new: OutboxEntry, outcome: Retrieved, now: float, effects: list) -> bool:
    """
    SPEC 4: accepted recipients are done, 5xx ones bounce, 4xx ones (and
    any the turn did not reach) wait for another RETR.
    """
    result = outcome.result
    accepted = result.accepted()
    permanent = result.refused(permanent=True)
    effects += _refused(permanent, result, outcome.host)
    effects.append(Log(maillog.RETR_SERVED, {"id": new.id, "queue_id": new.queue_id, "peer": outcome.peer, "accepted": accepted,
         "refused": permanent, "seconds": now - new.created}))
    remaining = result.refused(permanent=False) + [
        r for r in new.recipients if r not in result.recipients
    ]
    if not remaining:
        effects.append(Remove())
        return False
    new.recipients = remaining
    effects += [Update(), Release()]
    new.claimed = False
    return True


def _refused(recipients: list[str], result: TransactionResult, host: str | None) -> list:
    """One DSN for every recipient the peer refused, each with its reply."""
    if not recipients:
        return []
    failed = []
    for recipient in recipients:
        reply = result.recipients[recipient]
        failed.append(FailedRecipient(
            recipient, reply.enhanced or "5.0.0",
            f"{reply.code} {reply.enhanced} {reply.text}".strip(), host,
        ))
    return [Bounce(tuple(failed))]


def _bounce(recipients: list[str], status: str, reason: str, *, action: str = "failed") -> Bounce:
    return Bounce(tuple(FailedRecipient(r, status, reason, None, action) for r in recipients),
                  action)
