"""
Tests for L{pullmail.storage.outbox}: the maildir-like outbox (SPEC 2, 4, 7), and
the L{pullmail.testing.MemoryOutbox} fake that mirrors it.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from pullmail.interfaces import IOutbox
from pullmail.storage.outbox import (
    NOTIFIED,
    QUEUED,
    RECORD_VERSION,
    EntryState,
    MaildirOutbox,
    OutboxEntry,
    WritesBehind,
)
from pullmail.testing import HeldRunner, MemoryOutbox, make_entry

ID1 = "First_entry_id_00001"
ID2 = "Second_entry_id_0002"
ID3 = "Third_entry_id_00003"
MESSAGE = [b"Subject: hi\r\n", b"\r\nbody\r\n"]


@pytest.fixture(params=["maildir", "memory", "postgresql"])
def kind(request):
    if request.param == "postgresql":
        return _WithDatabase("postgresql", request.getfixturevalue("pg_database"))
    return request.param


class _WithDatabase(str):
    """The "postgresql" kind, carrying the test's database."""

    def __new__(cls, name: str, database):
        kind = super().__new__(cls, name)
        kind.database = database
        return kind


def _postgres(request_database, node: str = "mx1.example"):
    from twisted.internet.task import Clock

    from pullmail.storage.postgresql.outbox import PostgresOutbox

    clock = Clock()
    clock.advance(1000)
    return PostgresOutbox(request_database, node, 300.0, clock, lambda entry: entry.next_attempt)


def _open(kind: str, tmp_path):
    if kind == "maildir":
        outbox = MaildirOutbox(tmp_path / "outbox")
    elif kind == "postgresql":
        outbox = _postgres(kind.database)
    else:
        outbox = MemoryOutbox()
    assert outbox.load() == []
    return outbox


def _reopen(kind: str, outbox, tmp_path):
    """A new instance over the same storage (a restart, or another node)."""
    if kind == "maildir":
        return MaildirOutbox(tmp_path / "outbox")
    if kind == "postgresql":
        return _postgres(outbox.database)
    return outbox.restarted()


def test_provides_interface(kind, tmp_path) -> None:
    assert verifyObject(IOutbox, _open(kind, tmp_path))


def test_add_and_get(kind, tmp_path) -> None:
    """Entries added are indexed and their message is readable."""
    outbox = _open(kind, tmp_path)
    first = make_entry(id=ID1, domain="one.example", recipients=["a@one.example"])
    second = make_entry(id=ID2, domain="two.example", recipients=["b@two.example"])
    outbox.add([first, second], MESSAGE)
    assert outbox.get(ID1) == first
    assert outbox.get(ID2).recipients == ["b@two.example"]
    assert outbox.get(ID3) is None
    assert len(outbox) == 2
    assert sorted(e.id for e in outbox.entries()) == [ID1, ID2]
    assert outbox.read_message(ID1) == b"".join(MESSAGE)
    assert outbox.read_message(ID2) == b"".join(MESSAGE)


def test_add_survives_restart(kind, tmp_path) -> None:
    outbox = _open(kind, tmp_path)
    entry = make_entry(id=ID1, state=NOTIFIED, expires=100.0, attempts=2)
    outbox.add([entry], MESSAGE)
    again = _reopen(kind, outbox, tmp_path)
    assert again.load() == []
    assert again.get(ID1) == entry
    assert again.read_message(ID1) == b"".join(MESSAGE)


def test_claim_once(kind, tmp_path) -> None:
    """SPEC 4: a claim succeeds once; a second claim gets None."""
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1)], MESSAGE)
    claimed = outbox.claim(ID1)
    assert claimed is not None and claimed.id == ID1 and claimed.claimed
    assert outbox.claim(ID1) is None
    assert outbox.claim(ID2) is None


def test_release(kind, tmp_path) -> None:
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1)], MESSAGE)
    outbox.claim(ID1)
    outbox.release(ID1)
    assert not outbox.get(ID1).claimed
    assert outbox.claim(ID1) is not None
    outbox.release(ID2)  # unknown: nothing happens


def test_claim_shared_between_nodes(kind, tmp_path) -> None:
    """Two outboxes over one folder: exactly one claim of an entry succeeds."""
    one = _open(kind, tmp_path)
    one.add([make_entry(id=ID1)], MESSAGE)
    two = _reopen(kind, one, tmp_path)
    two.load()
    results = [one.claim(ID1), two.claim(ID1)]
    assert sum(r is not None for r in results) == 1


def test_claim_shared_other_order(kind, tmp_path) -> None:
    one = _open(kind, tmp_path)
    one.add([make_entry(id=ID1)], MESSAGE)
    two = _reopen(kind, one, tmp_path)
    two.load()
    assert two.claim(ID1) is not None
    assert one.claim(ID1) is None


def test_update_while_claimed(kind, tmp_path) -> None:
    """A claimed entry updated stays claimed on disk: a restart releases it."""
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1)], MESSAGE)
    entry = outbox.claim(ID1)
    entry.recipients = ["x@receiver.example"]
    outbox.update(entry)
    again = _reopen(kind, outbox, tmp_path)
    assert again.load() == [ID1]
    assert again.get(ID1).recipients == ["x@receiver.example"]
    assert not again.get(ID1).claimed


def test_remove(kind, tmp_path) -> None:
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1), make_entry(id=ID2)], MESSAGE)
    outbox.remove(ID1)
    assert outbox.get(ID1) is None
    assert outbox.get(ID2) is not None
    with pytest.raises(OSError):
        outbox.read_message(ID1)
    # The message shared with the other entry is still there.
    assert outbox.read_message(ID2) == b"".join(MESSAGE)
    outbox.remove(ID1)  # twice: nothing happens
    again = _reopen(kind, outbox, tmp_path)
    again.load()
    assert again.get(ID1) is None and again.get(ID2) is not None


def test_remove_after_keeps_the_files_until_it_fires(kind, tmp_path) -> None:
    """remove(after=d): gone from the index at once, from disk once d fires."""
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1)], MESSAGE)
    stored = Deferred()
    outbox.remove(ID1, after=stored)
    assert outbox.get(ID1) is None
    assert outbox.read_message(ID1) == b"".join(MESSAGE)
    stored.callback(None)
    with pytest.raises(OSError):
        outbox.read_message(ID1)
    again = _reopen(kind, outbox, tmp_path)
    again.load()
    assert again.get(ID1) is None


def test_remove_after_a_failure_keeps_the_entry(kind, tmp_path) -> None:
    """If d fails, the entry stays on disk and comes back at the next start."""
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1)], MESSAGE)
    stored = Deferred()
    outbox.remove(ID1, after=stored)
    stored.errback(OSError(28, "No space left on device"))
    assert outbox.get(ID1) is None
    again = _reopen(kind, outbox, tmp_path)
    again.load()
    assert again.get(ID1) is not None
    assert again.read_message(ID1) == b"".join(MESSAGE)


def test_remove_claimed(kind, tmp_path) -> None:
    """A claimed entry can be removed (retrieved), and stays gone after a restart."""
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1)], MESSAGE)
    outbox.claim(ID1)
    outbox.remove(ID1)
    assert outbox.get(ID1) is None
    again = _reopen(kind, outbox, tmp_path)
    assert again.load() == []
    assert again.get(ID1) is None


def test_load_releases_stale_claims(kind, tmp_path) -> None:
    """SPEC 4: at start-up, entries left claimed are released and indexed."""
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1), make_entry(id=ID2)], MESSAGE)
    outbox.claim(ID1)
    again = _reopen(kind, outbox, tmp_path)
    assert again.load() == [ID1]
    assert sorted(e.id for e in again.entries()) == [ID1, ID2]
    assert not again.get(ID1).claimed
    assert again.claim(ID1) is not None
    assert _reopen(kind, outbox, tmp_path).load() == [ID1]


def test_add_sibling(kind, tmp_path) -> None:
    """A sibling shares the message and lives on after its first entry is removed."""
    outbox = _open(kind, tmp_path)
    outbox.add([make_entry(id=ID1, recipients=["a@r.example", "b@r.example"])], MESSAGE)
    outbox.add_sibling(ID1, make_entry(id=ID2, recipients=["b@r.example"]))
    assert outbox.get(ID2).recipients == ["b@r.example"]
    outbox.remove(ID1)
    assert outbox.read_message(ID2) == b"".join(MESSAGE)
    again = _reopen(kind, outbox, tmp_path)
    again.load()
    assert [e.id for e in again.entries()] == [ID2]
    assert again.read_message(ID2) == b"".join(MESSAGE)


# -- MaildirOutbox only -------------------------------------------------------------------


def test_layout(tmp_path) -> None:
    """Messages in data/, entries in entries/, claims in claimed/, each named by id."""
    root = tmp_path / "outbox"
    outbox = MaildirOutbox(root)
    outbox.load()
    outbox.add([make_entry(id=ID1)], MESSAGE)
    assert (root / "data" / f"{ID1}.eml").read_bytes() == b"".join(MESSAGE)
    assert (root / "entries" / f"{ID1}.json").exists()
    outbox.claim(ID1)
    assert not (root / "entries" / f"{ID1}.json").exists()
    assert (root / "claimed" / f"{ID1}.json").exists()
    outbox.release(ID1)
    assert (root / "entries" / f"{ID1}.json").exists()
    outbox.remove(ID1)
    assert sorted(p.name for p in (root / "entries").iterdir()) == []
    assert sorted(p.name for p in (root / "data").iterdir()) == []


def test_versioned_json(tmp_path) -> None:
    """Entries are readable, versioned JSON (no pickle)."""
    root = tmp_path / "outbox"
    outbox = MaildirOutbox(root)
    outbox.load()
    outbox.add([make_entry(id=ID1, sender="alice@sender.example", state=QUEUED)], MESSAGE)
    record = json.loads((root / "entries" / f"{ID1}.json").read_text())
    assert record["version"] == RECORD_VERSION
    assert record["id"] == ID1
    assert record["sender"] == "alice@sender.example"
    assert "claimed" not in record


def test_entry_json_round_trip() -> None:
    entry = make_entry(id=ID1, state=NOTIFIED, notified_at=5.0, expires=9.0, body="8BITMIME",
                       last_error="451 try later", warned=True, smtputf8=True)
    assert OutboxEntry.from_json(entry.to_json()) == entry


# A record as the version before the state Enum wrote it, by hand.
OLD_RECORD = {
    "attempts": 1, "body": None, "created": 1000.0, "domain": "receiver.example",
    "expires": 173800.0, "id": ID1, "last_error": "", "next_attempt": 1000.0,
    "notified_at": 1010.0, "origin": None, "queue_id": "QID1",
    "recipients": ["bob@receiver.example"],
    "renotify_at": None, "sender": "alice@sender.example", "size": 42, "smtputf8": False,
    "state": "notified", "version": 1, "warned": False,
}


def test_records_of_the_previous_version_load() -> None:
    """The state on disk is the same string as before; it loads as the Enum."""
    entry = OutboxEntry.from_json(json.dumps(OLD_RECORD).encode())
    assert entry.state is EntryState.NOTIFIED
    assert entry.recipients == ["bob@receiver.example"]


def test_states_are_written_as_before() -> None:
    for state, text in [(QUEUED, "queued"), (NOTIFIED, "notified")]:
        assert json.loads(make_entry(id=ID1, state=state).to_json())["state"] == text
    loaded = OutboxEntry.from_json(json.dumps(OLD_RECORD).encode())
    # held, offers: new fields, with their defaults.
    assert json.loads(loaded.to_json()) == {**OLD_RECORD, "held": False, "offers": [],
                                           "dsn": {}}


def test_unknown_state_refused() -> None:
    """A state this version does not know is not guessed at (the record stays on disk)."""
    with pytest.raises(ValueError):
        OutboxEntry.from_json(json.dumps({**OLD_RECORD, "state": "frozen"}).encode())


def test_unknown_version_refused() -> None:
    record = json.loads(make_entry(id=ID1).to_json())
    record["version"] = RECORD_VERSION + 1
    with pytest.raises(ValueError):
        OutboxEntry.from_json(json.dumps(record).encode())
    del record["version"]
    with pytest.raises(ValueError):
        OutboxEntry.from_json(json.dumps(record).encode())


def test_unknown_fields_ignored() -> None:
    """A record from a newer minor release with extra fields still loads."""
    record = json.loads(make_entry(id=ID1).to_json())
    record["future"] = 1
    assert OutboxEntry.from_json(json.dumps(record).encode()).id == ID1


def test_load_skips_strays(tmp_path) -> None:
    """Files that are not entries, and entries without a message, are not indexed."""
    root = tmp_path / "outbox"
    outbox = MaildirOutbox(root)
    outbox.load()
    outbox.add([make_entry(id=ID1)], MESSAGE)
    (root / "entries" / "notes.txt").write_text("hello")
    (root / "entries" / "bad..name.json").write_text("{}")
    (root / "entries" / f"{ID2}.json").write_bytes(make_entry(id=ID2).to_json())  # no message
    (root / "claimed" / "../escape.json".replace("/", "_")).write_text("{}")
    again = MaildirOutbox(root)
    again.load()
    assert [e.id for e in again.entries()] == [ID1]


def test_load_leaves_unreadable_entries_on_disk(tmp_path) -> None:
    """A record of another version, or garbled, is logged and skipped, not fatal."""
    root = tmp_path / "outbox"
    outbox = MaildirOutbox(root)
    outbox.load()
    outbox.add([make_entry(id=ID1)], MESSAGE)
    outbox.add([make_entry(id=ID2)], MESSAGE)
    newer = json.loads(make_entry(id=ID2).to_json())
    newer["version"] += 1
    (root / "entries" / f"{ID2}.json").write_text(json.dumps(newer))
    third = ID3
    outbox.add([make_entry(id=third)], MESSAGE)
    (root / "entries" / f"{third}.json").write_bytes(b'{"version": 1, "id": ')
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        again = MaildirOutbox(root)
        again.load()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e.id for e in again.entries()] == [ID1]
    assert sorted(e["id"] for e in events if e.get("event") == "outbox-unreadable") == sorted([ID2, third])
    assert (root / "entries" / f"{ID2}.json").exists() and (root / "data" / f"{ID2}.eml").exists()


def test_message_path_checks_id(tmp_path) -> None:
    """SPEC 2: an id is never used as a file name unchecked."""
    outbox = MaildirOutbox(tmp_path / "outbox")
    outbox.load()
    for bad in ["../../etc/passwd", "short", "a" * 200, "x/" * 10]:
        with pytest.raises(ValueError):
            outbox.message_path(bad)


def test_claim_lost_race_on_disk(tmp_path) -> None:
    """If another node renamed the file first, the claim returns None."""
    root = tmp_path / "outbox"
    one = MaildirOutbox(root)
    one.load()
    one.add([make_entry(id=ID1)], MESSAGE)
    two = MaildirOutbox(root)
    two.load()
    assert one.claim(ID1) is not None
    assert two.claim(ID1) is None
    assert not two.get(ID1).claimed


def test_async_updates_keep_their_order_and_gate_claims(tmp_path) -> None:
    """
    With a pool runner, the index changes at once and the files follow in
    order per entry; a claim waits for them (a rename must find the latest
    file), and a removal queued behind an update leaves nothing behind.
    """
    runner = HeldRunner()
    outbox = MaildirOutbox(tmp_path / "outbox", runner)
    outbox.load()
    outbox.add([make_entry(id=ID1)], MESSAGE)
    entry = outbox.get(ID1)
    entry.state = NOTIFIED
    entry.expires = 100.0
    outbox.update(entry)
    assert outbox.get(ID1).state == NOTIFIED            # the index: at once
    on_disk = json.loads((tmp_path / "outbox" / "entries" / f"{ID1}.json").read_bytes())
    assert on_disk["state"] == QUEUED                   # the file: not yet
    flushed = outbox.flushed(ID1)
    assert not flushed.called
    assert outbox.claim(ID1) is None                    # not while a write is pending
    runner.run_all()
    assert flushed.called
    on_disk = json.loads((tmp_path / "outbox" / "entries" / f"{ID1}.json").read_bytes())
    assert on_disk["state"] == NOTIFIED
    assert outbox.claim(ID1) is entry
    outbox.release(ID1)
    entry.attempts = 5
    outbox.update(entry)
    outbox.remove(ID1)
    runner.run_all()
    assert list((tmp_path / "outbox" / "entries").iterdir()) == []
    assert list((tmp_path / "outbox" / "claimed").iterdir()) == []
    assert list((tmp_path / "outbox" / "data").iterdir()) == []


# -- writes that may wait (issue 17) -----------------------------------------------------


def _behind(tmp_path):
    outbox = MaildirOutbox(tmp_path)
    outbox.load()
    outbox.add([make_entry(id=ID1), make_entry(id=ID2), make_entry(id=ID3)], MESSAGE)
    clock = Clock()
    return outbox, clock, WritesBehind(outbox, clock, delay=5.0)


def _stored_state(tmp_path, entry_id: str):
    again = MaildirOutbox(tmp_path)
    again.load()
    return again.get(entry_id).state


def test_a_write_behind_lands_after_its_delay(tmp_path) -> None:
    outbox, clock, behind = _behind(tmp_path)
    entry = outbox.get(ID1)
    entry.state = NOTIFIED
    behind.add(entry)
    clock.advance(4.9)
    assert _stored_state(tmp_path, ID1) == QUEUED and ID1 in behind
    clock.advance(0.1)
    assert _stored_state(tmp_path, ID1) == NOTIFIED and ID1 not in behind


def test_a_write_behind_is_left_out_for_an_entry_claimed_or_gone(tmp_path) -> None:
    """The claim moves the queued record; the removal takes it: nothing to write over."""
    outbox, clock, behind = _behind(tmp_path)
    for entry in outbox.entries():
        entry.state = NOTIFIED
        behind.add(entry)
    outbox.claim(ID1)
    outbox.remove(ID2)
    clock.advance(5.0)
    assert not (tmp_path / "claimed" / f"{ID1}.json").read_text().count('"notified"')
    assert not (tmp_path / "entries" / f"{ID2}.json").exists()
    assert _stored_state(tmp_path, ID3) == NOTIFIED


def test_writes_behind_one_timer_in_order(tmp_path) -> None:
    """Each waits its own delay; a later one re-arms the timer for its time."""
    outbox, clock, behind = _behind(tmp_path)
    first, second = outbox.get(ID1), outbox.get(ID2)
    first.state = second.state = NOTIFIED
    behind.add(first)
    clock.advance(3.0)
    behind.add(second)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2.0)
    assert (_stored_state(tmp_path, ID1), _stored_state(tmp_path, ID2)) == (NOTIFIED, QUEUED)
    clock.advance(3.0)
    assert _stored_state(tmp_path, ID2) == NOTIFIED
    assert clock.getDelayedCalls() == []


def test_writes_behind_discarded_or_flushed(tmp_path) -> None:
    """A write that follows at once supersedes the waiting one; a flush writes all now."""
    outbox, clock, behind = _behind(tmp_path)
    first, second = outbox.get(ID1), outbox.get(ID2)
    first.state = second.state = NOTIFIED
    behind.add(first)
    behind.add(second)
    behind.discard(ID1)
    behind.flush()
    assert (_stored_state(tmp_path, ID1), _stored_state(tmp_path, ID2)) == (QUEUED, NOTIFIED)
    assert clock.getDelayedCalls() == []
