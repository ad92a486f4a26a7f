"""
Tests for L{pullmail.storage.pending}: pending notifications at the RMTA (SPEC 3,
5), stored as versioned JSON, one file per (origin, id).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pullmail.storage.pending import (
    PENDING,
    RECORD_VERSION,
    RETRIEVED,
    Notification,
    NotificationState,
    PendingStore,
    RecordWrites,
    TooManyPending,
    notification_key,
)

ID1 = "Notified_id_00000001"
ID2 = "Notified_id_00000002"


def _notification(gdel_id: str = ID1, origin: str = "sender.example",
                  peer: str = "192.0.2.1", **kw) -> Notification:
    defaults = dict(gdel_id=gdel_id, origin=origin, peer=peer, helo="mx.sender.example",
                    sender="alice@sender.example", recipients=["bob@example.org"],
                    notified_at=100.0, next_attempt=100.0)
    defaults.update(kw)
    return Notification(**defaults)


@pytest.fixture(params=["files", "postgresql"])
def store(request, tmp_path) -> PendingStore:
    """The files backend and the PostgreSQL one pass the same tests (SPEC 11.3)."""
    if request.param == "postgresql":
        from twisted.internet.task import Clock

        from pullmail.storage.postgresql.pending import PostgresPending

        s = PostgresPending(request.getfixturevalue("pg_database"), "mx1.example", 300.0, Clock())
    else:
        s = PendingStore(tmp_path / "pending")
    s.load()
    return s


FILES_ONLY = pytest.mark.parametrize("store", ["files"], indirect=True)


def _reloaded(store: PendingStore) -> PendingStore:
    if store.shared:
        again = type(store)(store.database, store.node, store.lease, store.clock)
    else:
        again = PendingStore(store.root)
    again.load()
    return again


def test_save_and_get(store) -> None:
    n = _notification()
    store.save(n)
    assert store.get("sender.example", ID1) is n
    assert store.by_key(n.key) is n
    assert store.get("other.example", ID1) is None
    assert store.get("sender.example", ID2) is None
    assert len(store) == 1


def test_origin_case_insensitive(store) -> None:
    store.save(_notification())
    assert store.get("Sender.EXAMPLE", ID1) is not None


def test_id_case_sensitive(store) -> None:
    """SPEC 2: ids compare case-sensitively."""
    store.save(_notification())
    assert store.get("sender.example", ID1.lower()) is None


def test_load(store) -> None:
    """
    Everything saved is there after a restart, field for field, except
    that a pending record read back may have been delivered by the process
    that wrote it: it is marked for a look in the mailboxes first.
    """
    n = _notification(attempts=2, next_attempt=700.0, last_error="451 later", size=1234)
    store.save(n)
    store.save(_notification(ID2, sender=None, recipients=None, state=RETRIEVED,
                             keep_until=900.0))
    again = _reloaded(store)
    assert len(again) == 2
    assert not n.delivering
    assert again.get("sender.example", ID1) == dataclasses.replace(n, delivering=True)
    assert again.get("sender.example", ID2).recipients is None
    assert not again.get("sender.example", ID2).delivering


@FILES_ONLY
def test_file_names_hide_ids(store) -> None:
    """An id never becomes a file name; two origins with one id do not collide."""
    store.save(_notification(gdel_id="A" * 16, origin="one.example"))
    store.save(_notification(gdel_id="A" * 16, origin="two.example"))
    names = sorted(p.name for p in store.root.iterdir())
    assert len(names) == 2
    assert not any("AAAA" in name for name in names)
    assert notification_key("one.example", "A" * 16) != notification_key("two.example", "A" * 16)


@FILES_ONLY
def test_versioned_json(store) -> None:
    n = _notification()
    store.save(n)
    record = json.loads((store.root / f"{n.key}.json").read_text())
    assert record["version"] == RECORD_VERSION
    assert record["gdel_id"] == ID1
    record["version"] = RECORD_VERSION + 1
    with pytest.raises(ValueError):
        Notification.from_json(json.dumps(record).encode())


# A record as the version before the state Enum wrote it, by hand.
OLD_RECORD = {
    "attempts": 2, "gdel_id": ID1, "helo": "mx.sender.example", "keep_until": 9000.0,
    "last_error": "", "next_attempt": 100.0, "notified_at": 100.0, "origin": "sender.example",
    "peer": "192.0.2.1", "recipients": ["bob@example.org"], "sender": "alice@sender.example",
    "size": None, "state": "retrieved", "version": 1,
}


@FILES_ONLY
def test_records_of_the_previous_version_load(store) -> None:
    """The state on disk is the same string as before; it loads as the Enum."""
    (store.root / "old.json").write_text(json.dumps(OLD_RECORD))
    loaded = _reloaded(store).get("sender.example", ID1)
    assert loaded.state is NotificationState.RETRIEVED
    # held, dsn, esmtp, handed_over: new fields, with their defaults (an old
    # record's notifier is taken to have seen our EHLO keywords, as before).
    assert json.loads(loaded.to_json()) == {**OLD_RECORD, "held": False, "dsn": {},
                                            "esmtp": True, "handed_over": 0.0}


def test_states_are_written_as_before() -> None:
    for state, text in [(PENDING, "pending"), (RETRIEVED, "retrieved")]:
        assert json.loads(_notification(state=state).to_json())["state"] == text


@FILES_ONLY
def test_unknown_state_skipped(store) -> None:
    (store.root / "odd.json").write_text(json.dumps({**OLD_RECORD, "state": "frozen"}))
    assert len(_reloaded(store)) == 0


@FILES_ONLY
def test_load_removes_writes_cut_short(store) -> None:
    store.save(_notification())
    leftover = store.root / f".{notification_key('sender.example', ID2)}.4242.7.tmp"
    leftover.write_bytes(b'{"version": 1, "gdel_')
    reloaded = _reloaded(store)
    assert not leftover.exists()
    assert len(reloaded) == 1 and reloaded.get("sender.example", ID1) is not None


@FILES_ONLY
def test_load_skips_bad_records(store) -> None:
    store.save(_notification())
    (store.root / "junk.json").write_text("{not json")
    (store.root / "old.json").write_text(json.dumps({"version": 0}))
    (store.root / "notes.txt").write_text("x")
    assert len(_reloaded(store)) == 1


def test_counts_by_peer(store) -> None:
    """pending_from counts pending notifications from each address."""
    store.save(_notification(ID1, peer="192.0.2.1"))
    store.save(_notification(ID2, peer="192.0.2.1"))
    store.save(_notification("Notified_id_00000003", peer="192.0.2.2"))
    assert store.pending_from("192.0.2.1") == 2
    assert store.pending_from("192.0.2.2") == 1
    assert store.pending_from("192.0.2.3") == 0
    assert _reloaded(store).pending_from("192.0.2.1") == 2


def test_count_not_doubled_by_resave(store) -> None:
    n = _notification()
    store.save(n)
    n.attempts += 1
    store.save(n)
    assert store.pending_from("192.0.2.1") == 1


def test_save_with_a_limit_refuses_a_new_notification_past_it(store) -> None:
    """[limits] pending_per_origin: a new one past the limit is not stored; a known one is."""
    store.save(_notification(ID1), limit=2)
    store.save(_notification(ID2), limit=2)
    with pytest.raises(TooManyPending):
        store.save(_notification("Notified_id_00000003"), limit=2)
    assert store.get("sender.example", "Notified_id_00000003") is None
    assert _reloaded(store).get("sender.example", "Notified_id_00000003") is None
    store.save(_notification(ID1, attempts=1), limit=2)   # already stored: no limit
    store.save(_notification("Notified_id_00000003", peer="192.0.2.2"), limit=2)
    assert store.pending_from("192.0.2.1") == 2 and store.pending_from("192.0.2.2") == 1


def test_retrieved_not_counted(store) -> None:
    """A retrieved notification is kept but no longer pending."""
    n = _notification()
    store.save(n)
    retrieved = _notification(state=RETRIEVED, keep_until=9999.0)
    store.save(retrieved)
    assert store.pending_from("192.0.2.1") == 0
    assert store.get("sender.example", ID1).state == RETRIEVED
    assert _reloaded(store).pending_from("192.0.2.1") == 0


def test_peer_change_moves_count(store) -> None:
    """Re-notified from another address: the count follows the new peer."""
    store.save(_notification(peer="192.0.2.1"))
    store.save(_notification(peer="192.0.2.9"))
    assert store.pending_from("192.0.2.1") == 0
    assert store.pending_from("192.0.2.9") == 1


def test_state_change_in_place(store) -> None:
    """
    The Retriever changes the stored object in place, then saves it: a
    pending notification marked retrieved no longer counts.
    """
    n = _notification()
    store.save(n)
    n.state = RETRIEVED
    n.keep_until = 500.0
    store.save(n)
    assert store.pending_from("192.0.2.1") == 0


def test_remove(store) -> None:
    n = _notification()
    store.save(n)
    store.save(_notification(ID2))
    store.remove(n)
    assert store.get("sender.example", ID1) is None
    assert store.pending_from("192.0.2.1") == 1
    assert len(_reloaded(store)) == 1
    store.remove(n)  # twice: nothing happens
    assert store.pending_from("192.0.2.1") == 1


def test_remove_retrieved(store) -> None:
    store.save(_notification(ID2))
    retrieved = _notification(state=RETRIEVED)
    store.save(retrieved)
    store.remove(retrieved)
    assert store.pending_from("192.0.2.1") == 1


# -- RecordWrites: in order per record ----------------------------------------------------


class _HeldWrites:
    """A store_file whose writes land when the test says."""

    def __init__(self) -> None:
        self.requests: list = []

    def __call__(self, temporary, final, data):
        from twisted.internet.defer import Deferred

        d = Deferred()
        self.requests.append((temporary, final, data, d))
        return d

    def land(self, index: int) -> None:
        from pullmail.storage.durable import write_atomically

        _, final, data, d = self.requests[index]
        write_atomically(Path(final), data)
        d.callback(None)


def _writes(tmp_path):
    store = PendingStore(tmp_path)
    store.load()
    held = _HeldWrites()
    return store, held, RecordWrites(store, run_blocking=None, store_file=held)


def test_writes_of_one_record_land_in_the_order_asked(tmp_path) -> None:
    store, held, writes = _writes(tmp_path)
    notification = _notification()
    done: list = []
    writes.save(notification).addCallback(lambda _: done.append("first"))
    notification.state = RETRIEVED
    writes.save(notification).addCallback(lambda _: done.append("second"))
    assert len(held.requests) == 1 and writes.pending(notification.key)
    held.land(0)
    assert done == ["first"]
    assert len(held.requests) == 2        # asked only now, with the record as it is
    assert json.loads(held.requests[1][2])["state"] == "retrieved"
    held.land(1)
    assert done == ["first", "second"] and not writes.pending(notification.key)


def test_writes_of_other_records_do_not_wait(tmp_path) -> None:
    store, held, writes = _writes(tmp_path)
    writes.save(_notification(ID1))
    writes.save(_notification(ID2))
    assert len(held.requests) == 2


def test_a_removal_waits_for_the_writes_asked_before(tmp_path) -> None:
    """A record removed while a write of it is on its way stays removed."""
    store, held, writes = _writes(tmp_path)
    notification = _notification()
    writes.save(notification)
    writes.remove(notification)
    held.land(0)
    assert list(tmp_path.glob("*.json")) == []
    assert store.by_key(notification.key) is None


def test_a_failed_write_is_the_callers_and_the_next_goes_on(tmp_path) -> None:
    store, held, writes = _writes(tmp_path)
    notification = _notification()
    failures = []
    writes.save(notification).addErrback(failures.append)
    done: list = []
    writes.save(notification).addCallback(done.append)
    held.requests[0][3].errback(OSError(28, "No space left on device"))
    assert failures[0].check(OSError)
    held.land(1)
    assert done == [None]


# -- the mark "retrieved" beside the record (files) -----------------------------------------


def _marked(tmp_path) -> tuple[PendingStore, Notification]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = PendingStore(tmp_path)
    store.load()
    notification = _notification()
    store.save(notification)
    notification.state, notification.keep_until = RETRIEVED, 5000.0
    store.mark_retrieved(notification)
    return store, notification


def test_a_mark_is_read_back_at_load(tmp_path) -> None:
    store, notification = _marked(tmp_path)
    assert store.pending_from("192.0.2.1") == 0
    again = PendingStore(tmp_path)
    again.load()
    loaded = again.get("sender.example", ID1)
    assert (loaded.state, loaded.keep_until, loaded.delivering) == (RETRIEVED, 5000.0, False)
    assert again.pending_from("192.0.2.1") == 0


def test_a_mark_cut_short_leaves_the_record_pending(tmp_path) -> None:
    """A crash may leave the mark empty (it is not fsynced): the record stays pending."""
    store, notification = _marked(tmp_path)
    (tmp_path / f"{notification.key}.retrieved").write_bytes(b"")
    again = PendingStore(tmp_path)
    again.load()
    loaded = again.get("sender.example", ID1)
    assert (loaded.state, loaded.delivering) == (PENDING, True)


def test_a_durable_write_and_a_removal_take_the_mark_away(tmp_path) -> None:
    store, notification = _marked(tmp_path)
    mark = tmp_path / f"{notification.key}.retrieved"
    notification.state = PENDING
    store.save(notification)
    assert not mark.exists()
    notification.state = RETRIEVED
    store.mark_retrieved(notification)
    store.paths_for(notification)            # a write through the fsync helper follows
    assert not mark.exists()
    store.mark_retrieved(notification)
    store.remove(notification)
    assert list(tmp_path.iterdir()) == []


def test_a_mark_without_its_record_is_swept_at_load(tmp_path) -> None:
    store, notification = _marked(tmp_path)
    (tmp_path / f"{notification.key}.json").unlink()
    PendingStore(tmp_path).load()
    assert list(tmp_path.iterdir()) == []


def test_the_offline_listing_reads_marks(tmp_path) -> None:
    """`pullmail queue` with no node running shows a marked record as retrieved."""
    from pullmail.node.control import offline_listing

    _marked(tmp_path / "pending")
    [row] = offline_listing(tmp_path, 1000.0)
    assert (row["state"], row["next"]) == (RETRIEVED, 4000.0)
    assert offline_listing(tmp_path / "nothing", 0.0) == []
