"""
Tests for L{pullmail.outbound.lifecycle}: the outbox entry's life as a pure
function, (entry, outcome, now, config) -> (entry, next due time, effects),
checked against a table written out by hand.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest

from pullmail import maillog
from pullmail.config import DeliveryConfig
from pullmail.outbound.bounce import FailedRecipient
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
    step,
)
from pullmail.smtp.client import TransactionResult
from pullmail.smtp.replies import Reply
from pullmail.storage.outbox import NOTIFIED, QUEUED
from pullmail.testing import make_entry

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
BOB, CAROL, DAVE = "bob@receiver.example", "carol@receiver.example", "dave@receiver.example"
NOBODY = "nobody@receiver.example"
HOST = "mx1.receiver.example"
OK = Reply(250, "2.0.0", "Ok")
BUSY = Reply(451, "4.3.0", "busy")
FULL = Reply(452, "4.2.2", "mailbox full")
UNKNOWN = Reply(550, "5.1.1", "no such user")
# Lifetimes: a push is tried for 5 days, a notified entry waits 2 days.
CONFIG = DeliveryConfig(push_retry=(5 * MINUTE, 15 * MINUTE, HOUR), push_lifetime=5 * DAY,
                        outbox_lifetime=2 * DAY)
WARNING = DeliveryConfig(push_retry=(5 * MINUTE, 15 * MINUTE, HOUR), push_lifetime=5 * DAY,
                         outbox_lifetime=2 * DAY, delay_warning=4 * HOUR)


def result(**replies: Reply) -> TransactionResult:
    """A transaction's replies by recipient: bob=OK, carol=BUSY ..."""
    return TransactionResult(mail=OK, recipients={f"{name}@receiver.example": reply
                                                  for name, reply in replies.items()})


def queued(**fields):
    return make_entry(**{"recipients": [BOB], "attempts": 1, "next_attempt": 0.0, **fields})


def notified(**fields):
    return make_entry(**{"recipients": [BOB], "state": NOTIFIED, "notified_at": 10.0,
                         "expires": 2 * DAY, **fields})


def summary(effects) -> list:
    """Effects in a form short enough to write out by hand."""
    out = []
    for effect in effects:
        if isinstance(effect, Log):
            out.append(("log", effect.event.name))
        elif isinstance(effect, Bounce):
            out.append(("bounce", effect.action,
                        [(f.address, f.status, f.diagnostic, f.remote_mta) for f in effect.failed]))
        elif isinstance(effect, Update) and effect.may_wait:
            out.append("Update, may wait")
        elif isinstance(effect, SplitOff):
            s = effect.sibling
            out.append(("split", s.id, s.recipients, s.state, s.next_attempt, s.last_error,
                        effect.due, summary(effect.effects)))
        else:
            out.append(type(effect).__name__)
    return out


# (what happens, entry, outcome, now, config,
#  the entry's fields afterwards, next due time, effects)
TABLE = [
    ("a queued entry comes due: it joins its domain's line, off the timer",
     queued(), Due(), 0.0, CONFIG,
     {}, None, ["LineUp"]),
    ("a notified entry's re-announcement comes due: announce it again",
     notified(renotify_at=500.0), Due(), 500.0, CONFIG,
     {}, None, ["NotifyAgain"]),
    ("a notified entry not retrieved by its expiry bounces and goes",
     notified(), Due(), 2 * DAY, CONFIG,
     {}, None, [("log", "outbox-expired"),
                ("bounce", "failed", [(BOB, "5.4.7", "message not retrieved by the "
                                       "recipient's server in time", None)]),
                "Remove"]),
    ("a re-announcement due at or after expiry is an expiry",
     notified(renotify_at=2 * DAY), Due(), 2 * DAY, CONFIG,
     {}, None, [("log", "outbox-expired"),
                ("bounce", "failed", [(BOB, "5.4.7", "message not retrieved by the "
                                       "recipient's server in time", None)]),
                "Remove"]),
    ("the delay warning comes due: a 'delayed' DSN, once",
     notified(), Due(), 4 * HOUR, WARNING,
     {"warned": True}, 2 * DAY,
     ["Update", ("bounce", "delayed", [(BOB, "4.4.7", "message not yet retrieved; "
                                        "still waiting", None)])]),
    ("no delay warning when none is configured: back on the timer for expiry",
     notified(), Due(), 4 * HOUR, CONFIG,
     {}, 2 * DAY, []),
    ("start-up releases a notified entry's claim: announce it again now",
     notified(), ClaimReleased(), 700.0, CONFIG,
     {"renotify_at": 700.0}, 700.0, ["Update"]),
    ("start-up releases a queued entry's claim: it keeps its due time",
     queued(next_attempt=900.0), ClaimReleased(), 700.0, CONFIG,
     {}, 900.0, []),
    ("GDEL accepted: notified, waiting for RETR until created + outbox_lifetime; "
     "the queued record on disk may stay a while (a crash notifies again)",
     queued(created=100.0), Attempted("pull", HOST, result(bob=OK)), 1000.0, CONFIG,
     {"state": NOTIFIED, "notified_at": 1000.0, "expires": 100.0 + 2 * DAY}, 100.0 + 2 * DAY,
     [("log", "delivery-attempt"), "Update, may wait"]),
    ("GDEL accepted with a delay warning configured: due for the warning first",
     queued(), Attempted("pull", HOST, result(bob=OK)), 1000.0, WARNING,
     {"state": NOTIFIED, "notified_at": 1000.0, "expires": 2 * DAY}, 4 * HOUR,
     [("log", "delivery-attempt"), "Update, may wait"]),
    ("GDEL accepted for bob, 451 for carol: carol gets an entry of her own, queued",
     queued(recipients=[BOB, CAROL]), Attempted("pull", HOST, result(bob=OK, carol=BUSY)),
     1000.0, CONFIG,
     {"state": NOTIFIED, "recipients": [BOB], "notified_at": 1000.0, "expires": 2 * DAY},
     2 * DAY,
     [("log", "delivery-attempt"),
      ("split", "SIBLING", [CAROL], QUEUED, 1300.0, "451 4.3.0 busy", 1300.0,
       ["Update", ("log", "deferred")]),
      "Update"]),
    ("GDEL accepted for bob, 550 for nobody: nobody bounces with the peer's reply",
     queued(recipients=[BOB, NOBODY]), Attempted("pull", HOST, result(bob=OK, nobody=UNKNOWN)),
     1000.0, CONFIG,
     {"state": NOTIFIED, "recipients": [BOB], "notified_at": 1000.0, "expires": 2 * DAY},
     2 * DAY,
     [("bounce", "failed", [(NOBODY, "5.1.1", "550 5.1.1 no such user", HOST)]),
      ("log", "delivery-attempt"), "Update"]),
    ("pushed and accepted: delivered, gone",
     queued(), Attempted("push", HOST, result(bob=OK)), 1000.0, CONFIG,
     {"recipients": []}, None, [("log", "delivery-attempt"), ("log", "delivered"), "Remove"]),
    ("pushed, every recipient refused: one DSN, gone",
     queued(recipients=[NOBODY]), Attempted("push", HOST, result(nobody=UNKNOWN)), 1000.0, CONFIG,
     {"recipients": []}, None,
     [("bounce", "failed", [(NOBODY, "5.1.1", "550 5.1.1 no such user", HOST)]),
      ("log", "delivery-attempt"), "Remove"]),
    ("pushed, 451 after the 1st attempt: again in 5 minutes",
     queued(), Attempted("push", HOST, result(bob=BUSY)), 1000.0, CONFIG,
     {"next_attempt": 1300.0, "last_error": "451 4.3.0 busy"}, 1300.0,
     [("log", "delivery-attempt"), "Update", ("log", "deferred")]),
    ("pushed, delivered to bob, 452 for carol: carol alone is tried again",
     queued(recipients=[BOB, CAROL], attempts=2),
     Attempted("push", HOST, result(bob=OK, carol=FULL)), 1000.0, CONFIG,
     {"recipients": [CAROL], "next_attempt": 1900.0, "last_error": "452 4.2.2 mailbox full"},
     1900.0, [("log", "delivery-attempt"), ("log", "delivered"), "Update", ("log", "deferred")]),
    ("the last delay repeats: the 7th attempt waits an hour too",
     queued(attempts=7), Failed("connection refused"), 1000.0, CONFIG,
     {"next_attempt": 4600.0, "last_error": "connection refused"}, 4600.0,
     ["Update", ("log", "deferred")]),
    ("a retry never goes past the push lifetime",
     queued(attempts=4), Failed("connection refused"), 5 * DAY - 100.0, CONFIG,
     {"next_attempt": 5 * DAY, "last_error": "connection refused"}, 5 * DAY,
     ["Update", ("log", "deferred")]),
    ("a failure at the end of the push lifetime: give up, 4.4.7 with the last error",
     queued(attempts=5), Attempted("push", HOST, result(bob=BUSY)), 5 * DAY, CONFIG,
     {"last_error": "451 4.3.0 busy"}, None,
     [("log", "delivery-attempt"), ("log", "push-expired"),
      ("bounce", "failed", [(BOB, "4.4.7", "delivery time expired; last error: "
                             "451 4.3.0 busy", None)]),
      "Remove"]),
    ("a split-off entry past the push lifetime bounces at once",
     queued(recipients=[BOB, CAROL]), Attempted("pull", HOST, result(bob=OK, carol=BUSY)),
     5 * DAY, CONFIG,
     {"state": NOTIFIED, "recipients": [BOB], "notified_at": 5 * DAY, "expires": 2 * DAY},
     2 * DAY,
     [("log", "delivery-attempt"),
      ("split", "SIBLING", [CAROL], QUEUED, 0.0, "451 4.3.0 busy", None,
       [("log", "push-expired"),
        ("bounce", "failed", [(CAROL, "4.4.7", "delivery time expired; last error: "
                               "451 4.3.0 busy", None)]),
        "Remove"]),
      "Update"]),
    ("no such domain: every recipient bounces 5.1.2, gone",
     queued(recipients=[BOB, CAROL]), Unreachable("domain receiver.example does not exist"),
     1000.0, CONFIG,
     {}, None,
     [("bounce", "failed", [(BOB, "5.1.2", "domain receiver.example does not exist", None),
                            (CAROL, "5.1.2", "domain receiver.example does not exist", None)]),
      "Remove"]),
    ("announced again and taken: no more announcing",
     notified(renotify_at=500.0), Renotified(True, "250 2.0.0 Ok"), 600.0, CONFIG,
     {"renotify_at": None}, 2 * DAY, [("log", "renotified"), "Update"]),
    ("announced again, not taken: again after the 1st push_retry delay",
     notified(renotify_at=500.0, attempts=0), Renotified(False, "421 busy"), 600.0, CONFIG,
     {"attempts": 1, "renotify_at": 900.0}, 900.0, [("log", "renotified"), "Update"]),
    ("announced again, not taken, the 3rd time: an hour later",
     notified(renotify_at=500.0, attempts=2), Renotified(False, "421 busy"), 600.0, CONFIG,
     {"attempts": 3, "renotify_at": 4200.0}, 4200.0, [("log", "renotified"), "Update"]),
    ("not taken, and the next try would be past expiry: left to expire",
     notified(renotify_at=500.0), Renotified(False, "421 busy"), 2 * DAY - 100.0, CONFIG,
     {"attempts": 1, "renotify_at": None}, 2 * DAY, [("log", "renotified"), "Update"]),
    ("retrieved, every recipient accepted: gone",
     notified(claimed=True), Retrieved(result(bob=OK), "192.0.2.25", HOST), 1000.0, CONFIG,
     {}, None, [("log", "retr-served"), "Remove"]),
    ("retrieved, one refused: it bounces naming the retrieving host",
     notified(recipients=[BOB, NOBODY], claimed=True),
     Retrieved(result(bob=OK, nobody=UNKNOWN), "192.0.2.25", HOST), 1000.0, CONFIG,
     {}, None,
     [("bounce", "failed", [(NOBODY, "5.1.1", "550 5.1.1 no such user", HOST)]),
      ("log", "retr-served"), "Remove"]),
    ("retrieved, 452 for carol and dave never reached: both wait for another RETR",
     notified(recipients=[BOB, CAROL, DAVE], claimed=True),
     Retrieved(result(bob=OK, carol=FULL), "192.0.2.25", HOST), 1000.0, CONFIG,
     {"recipients": [CAROL, DAVE], "claimed": False}, 2 * DAY,
     [("log", "retr-served"), "Update", "Release"]),
    ("a retrieval broke off: released, and announced again at once (no false bounce)",
     notified(claimed=True), RetrievalBroken("192.0.2.25"), 1000.0, CONFIG,
     {"renotify_at": 1000.0, "claimed": False}, 1000.0,
     [("log", "retr-broken"), "Release", "Update"]),
]


@pytest.mark.parametrize("what, entry, outcome, now, config, changes, due, effects", TABLE,
                         ids=[row[0] for row in TABLE])
def test_table(what, entry, outcome, now, config, changes, due, effects) -> None:
    before = copy.deepcopy(entry)
    new, next_due, done = step(entry, outcome, now, config, new_id=lambda: "SIBLING")
    expected = copy.copy(before)
    for name, value in changes.items():
        setattr(expected, name, value)
    assert asdict(new) == asdict(expected)
    assert next_due == due
    assert summary(done) == effects
    assert asdict(entry) == asdict(before), "the entry passed in is left alone"


def test_log_texts_and_fields_are_the_nodes_own() -> None:
    """The log lines the node writes (integration tests read them) are unchanged."""
    _, _, effects = step(queued(id="E1", queue_id="Q9"), Failed("connection refused"), 1000.0,
                         CONFIG)
    assert effects[1] == Log(maillog.DEFERRED,
                             {"id": "E1", "queue_id": "Q9", "when": 1300.0,
                              "reason": "connection refused"})
    _, _, effects = step(queued(id="E1", queue_id="Q9"), Attempted("push", HOST, result(bob=OK)),
                         1000.0, CONFIG)
    assert effects[0] == Log(
        maillog.DELIVERY_ATTEMPT,
        {"mode": "push", "id": "E1", "queue_id": "Q9", "host": HOST, "accepted": [BOB],
         "permanent": [], "transient": []})
    assert effects[1] == Log(maillog.DELIVERED,
                             {"queue_id": "Q9", "recipients": [BOB], "host": HOST,
                              "seconds": 1000.0})    # since the entry was made: the metrics' time


def test_bounce_values() -> None:
    _, _, effects = step(notified(), Due(), 4 * HOUR, WARNING)
    assert effects[1] == Bounce((FailedRecipient(BOB, "4.4.7", "message not yet retrieved; "
                                                 "still waiting", None, "delayed"),), "delayed")


def test_last_error_is_kept_short() -> None:
    new, _, _ = step(queued(), Failed("x" * 2000), 1000.0, CONFIG)
    assert new.last_error == "x" * 500


def test_a_split_needs_new_ids() -> None:
    with pytest.raises(ValueError):
        step(queued(recipients=[BOB, CAROL]), Attempted("pull", HOST, result(bob=OK, carol=BUSY)),
             1000.0, CONFIG)


def test_not_an_outcome() -> None:
    with pytest.raises(TypeError):
        step(queued(), object(), 0.0, CONFIG)


@pytest.mark.parametrize("entry, config, due", [
    (queued(next_attempt=123.0), CONFIG, 123.0),
    (queued(next_attempt=123.0, claimed=True), CONFIG, None),
    (notified(), CONFIG, 2 * DAY),
    (notified(), WARNING, 4 * HOUR),
    (notified(warned=True), WARNING, 2 * DAY),
    (notified(renotify_at=50.0), WARNING, 50.0),
    (notified(claimed=True), CONFIG, None),
])
def test_due_at(entry, config, due) -> None:
    assert due_at(entry, config) == due


def test_effect_kinds_exported() -> None:
    """The glue dispatches on these; each is a value."""
    for kind in (LineUp, NotifyAgain, Update, Release, Remove):
        assert kind() == kind()
