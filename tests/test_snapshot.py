"""
The outbox's index snapshot (issue 17): a cache of the records checked
file by file, never the record of anything.  Each test is a state a kill -9
or an operator can leave, and what the next start-up must make of it.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from pullmail.storage import columns, snapshot
from pullmail.storage.durable import replace_file
from pullmail.storage.outbox import (
    COLUMNS,
    NOTIFIED,
    SNAPSHOT,
    Loaded,
    MaildirOutbox,
    read_in_slices,
    refreshed_snapshot,
)
from pullmail.storage.refresh import SnapshotRefresh
from pullmail.testing import HeldRunner, assert_no_result, make_entry, result_of

MESSAGE = [b"Subject: x\r\n\r\nhello\r\n"]


def _id(n: int) -> str:
    return f"Entry{n:015d}"


def _filled(root: Path, count: int = 5) -> MaildirOutbox:
    outbox = MaildirOutbox(root)
    outbox.load()
    for n in range(count):
        outbox.add([make_entry(id=_id(n), created=1000.0 + n, next_attempt=2000.5 + n,
                               dsn={"envid": f"E{n}"} if n % 2 else {},
                               offers=["DSN"] if n == 3 else [])], MESSAGE)
    return outbox


def _reloaded(root: Path) -> MaildirOutbox:
    outbox = MaildirOutbox(root)
    outbox.load()
    return outbox


def _indexed(logged_events) -> dict:
    [event] = [e for e in logged_events if e.get("event") == "outbox-indexed"][-1:]
    return {"reused": event["reused"], "read": event["read"]}


def _state(outbox: MaildirOutbox) -> dict:
    return {entry.id: asdict(entry) for entry in outbox.entries()}


# -- the columns ------------------------------------------------------------------------


@pytest.mark.parametrize("values", [
    [1.5, 2.0, -0.0], [1, 2, 2**62], [2**70, 1], [1, 1.0], ["a", "b\nc"], ["x", "é", "\udcff"],
    ["same"] * 9, ["dom.example", "other.example"] * 8, [None, None], [None, 1.5], [True, False],
    [[], []], [{}, {}], [["a"], ["b", "c"]], [{"envid": "x"}, {}], ["", ""],
])
def test_a_column_comes_back_as_it_went(values) -> None:
    tag, payload = columns.encode(values)
    back = columns.decode(tag, payload, len(values))
    assert back == values
    assert [type(v) for v in back] == [type(v) for v in values]


def test_each_row_gets_its_own_mutable_value() -> None:
    for empty in ([], {}):
        back = columns.decode(*columns.encode([empty] * 3), 3)
        assert len({id(v) for v in back}) == 3


def test_repeated_text_is_one_object() -> None:
    back = columns.decode(*columns.encode(["a.example", "b.example"] * 4), 8)
    assert back[0] is back[2]


def test_a_column_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError):
        columns.decode(*columns.encode([1.0, 2.0]), 3)


# -- the file ---------------------------------------------------------------------------


def _rows(count: int) -> list:
    return [(f"n{i}", (i, 10 * i, 20 * i, 30), (f"n{i}", float(i), [f"r{i}"])) for i in range(count)]


def _read(path: Path, names=("id", "when", "recipients")) -> list[tuple]:
    return [row for chunk in snapshot.read_snapshot(path, names) for row in zip(*chunk)]


def test_written_and_read_back_across_chunks(tmp_path) -> None:
    path = tmp_path / "s"
    rows = _rows(snapshot.ROWS_PER_CHUNK + 3)
    assert snapshot.write_snapshot(path, ("id", "when", "recipients"), rows) == len(rows)
    assert _read(path) == [(name, *ident, *values) for name, ident, values in rows]
    assert os.listdir(tmp_path) == ["s"]


def test_an_empty_snapshot(tmp_path) -> None:
    snapshot.write_snapshot(tmp_path / "s", ("id",), [])
    assert _read(tmp_path / "s", ("id",)) == []


@pytest.mark.parametrize("damage", ["truncated", "flipped", "header", "empty", "extended"])
def test_a_damaged_snapshot_is_refused_before_any_row(tmp_path, damage) -> None:
    path = tmp_path / "s"
    snapshot.write_snapshot(path, ("id", "when", "recipients"), _rows(50))
    data = bytearray(path.read_bytes())
    if damage == "truncated":          # a write cut short (no fsync before a power cut)
        data = data[: len(data) // 2]
    elif damage == "flipped":
        data[len(data) // 2] ^= 0x40
    elif damage == "header":
        data[2] ^= 0x40
    elif damage == "empty":
        data = bytearray()
    else:
        data = data[:-snapshot.TRAILER_SIZE] + b"x" + data[-snapshot.TRAILER_SIZE:]
    path.write_bytes(bytes(data))
    with pytest.raises(snapshot.SnapshotUnusable):
        snapshot.read_snapshot(path, ("id", "when", "recipients"))


def test_a_snapshot_of_other_columns_is_refused(tmp_path) -> None:
    snapshot.write_snapshot(tmp_path / "s", ("id", "when", "recipients"), _rows(2))
    with pytest.raises(snapshot.SnapshotUnusable, match="columns"):
        snapshot.read_snapshot(tmp_path / "s", ("id", "when", "recipients", "new_field"))


def test_no_snapshot(tmp_path) -> None:
    with pytest.raises(snapshot.SnapshotUnusable, match="none"):
        snapshot.read_snapshot(tmp_path / "s", ("id",))


def test_listing_gives_identities_of_regular_files_only(tmp_path) -> None:
    for name in ("a.json", "b.json", ".hidden.json", "c.txt"):
        (tmp_path / name).write_bytes(b"{}")
    (tmp_path / "d.json").mkdir()
    (tmp_path / "e.json").symlink_to(tmp_path / "a.json")
    found = snapshot.list_folder(tmp_path)
    assert sorted(found) == ["a", "b"]
    assert found["a"] == snapshot.identity(os.stat(tmp_path / "a.json"))


def test_a_replaced_file_has_another_identity(tmp_path) -> None:
    """How every record changes (L{durable.replace_file}): a new inode."""
    path = tmp_path / "a.json"
    path.write_bytes(b"one")
    before = snapshot.list_folder(tmp_path)["a"]
    replace_file(path, b"two")                        # same size
    assert snapshot.list_folder(tmp_path)["a"] != before


# -- the outbox over it -----------------------------------------------------------------


def test_a_start_after_a_snapshot_reads_no_file_and_finds_the_same(tmp_path, logged_events) -> None:
    outbox = _filled(tmp_path)
    first = _reloaded(tmp_path)                      # no snapshot yet: files; writes one
    assert _indexed(logged_events) == {"reused": 0, "read": 5}
    assert (tmp_path / SNAPSHOT).exists()
    second = _reloaded(tmp_path)
    assert _indexed(logged_events) == {"reused": 5, "read": 0}
    assert _state(second) == _state(first) == _state(outbox)
    assert all(type(entry.state) is type(NOTIFIED) for entry in second.entries())


def test_changes_since_the_snapshot_are_read_from_the_files(tmp_path, logged_events) -> None:
    _filled(tmp_path)
    outbox = _reloaded(tmp_path)                     # the snapshot: entries 0-4
    changed = outbox.get(_id(1))
    changed.state, changed.expires, changed.attempts = NOTIFIED, 9999.0, 3
    outbox.update(changed)
    outbox.remove(_id(2))
    outbox.add([make_entry(id=_id(7))], MESSAGE)
    os.unlink(tmp_path / "data" / f"{_id(4)}.eml")   # an entry without its message is none
    after = _reloaded(tmp_path)
    assert _indexed(logged_events) == {"reused": 2, "read": 2}
    assert sorted(e.id for e in after.entries()) == [_id(0), _id(1), _id(3), _id(7)]
    assert asdict(after.get(_id(1))) == asdict(changed)


def test_an_entry_claimed_when_the_node_died_is_released_and_read_again(tmp_path, logged_events) -> None:
    _filled(tmp_path)
    outbox = _reloaded(tmp_path)
    assert outbox.claim(_id(3)) is not None          # a RETR in progress, then kill -9
    restarted = MaildirOutbox(tmp_path)
    assert restarted.load() == [_id(3)]
    assert _indexed(logged_events)["reused"] >= 4
    assert not restarted.get(_id(3)).claimed
    assert (tmp_path / "entries" / f"{_id(3)}.json").exists()
    assert _state(restarted) == _state(outbox) | {_id(3): asdict(outbox.get(_id(3))) | {"claimed": False}}


def test_killed_while_writing_a_snapshot(tmp_path, logged_events) -> None:
    """The old snapshot is whole (the new one was never renamed); the half-written one goes."""
    _filled(tmp_path)
    expected = _state(_reloaded(tmp_path))
    leftover = tmp_path / f".{SNAPSHOT}.4242.tmp"
    leftover.write_bytes(b'{"format": "pullmail-snapshot"')
    assert _state(_reloaded(tmp_path)) == expected
    assert _indexed(logged_events) == {"reused": 5, "read": 0}
    assert not leftover.exists()


@pytest.mark.parametrize("cut", [0, 10, -1])
def test_a_torn_snapshot_is_ignored_and_replaced(tmp_path, logged_events, cut) -> None:
    _filled(tmp_path)
    expected = _state(_reloaded(tmp_path))
    path = tmp_path / SNAPSHOT
    path.write_bytes(path.read_bytes()[:cut])
    assert _state(_reloaded(tmp_path)) == expected
    assert _indexed(logged_events) == {"reused": 0, "read": 5}
    assert [e["reason"] for e in logged_events if e.get("event") == "outbox-snapshot-ignored"]
    _reloaded(tmp_path)                               # the snapshot written again is whole
    assert _indexed(logged_events) == {"reused": 5, "read": 0}


def test_a_snapshot_of_another_version_is_ignored(tmp_path, logged_events) -> None:
    _filled(tmp_path)
    expected = _state(_reloaded(tmp_path))
    snapshot.write_snapshot(tmp_path / SNAPSHOT, COLUMNS[:-1], [])
    assert _state(_reloaded(tmp_path)) == expected
    assert _indexed(logged_events) == {"reused": 0, "read": 5}


def test_a_snapshot_row_named_for_another_entry_is_not_trusted(tmp_path, logged_events) -> None:
    _filled(tmp_path, 2)
    listing = snapshot.list_folder(tmp_path / "entries")
    forged = make_entry(id=_id(0), sender="mallory@evil.example")
    snapshot.write_snapshot(tmp_path / SNAPSHOT, COLUMNS,
                            [(_id(1), listing[_id(1)], tuple(getattr(forged, c) for c in COLUMNS))])
    outbox = _reloaded(tmp_path)
    assert {e.sender for e in outbox.entries()} == {"alice@sender.example"}


def test_few_changes_keep_the_snapshot(tmp_path) -> None:
    _filled(tmp_path, 30)
    outbox = _reloaded(tmp_path)
    written = os.stat(tmp_path / SNAPSHOT).st_ino
    outbox.add([make_entry(id=_id(99))], MESSAGE)    # 1 in 31: not worth a rewrite
    _reloaded(tmp_path)
    assert os.stat(tmp_path / SNAPSHOT).st_ino == written


def test_a_snapshot_that_cannot_be_written_is_only_logged(tmp_path, logged_events, monkeypatch) -> None:
    _filled(tmp_path)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot, "write_snapshot", full)
    outbox = _reloaded(tmp_path)
    assert len(outbox) == 5
    assert [e for e in logged_events if e.get("event") == "outbox-snapshot-failed"]
    assert outbox.unsnapshotted == 5                 # still to write, at the next check


# -- reading in the background ---------------------------------------------------------------


def test_a_background_load_keeps_retr_waiting_not_refused(tmp_path) -> None:
    _filled(tmp_path)
    runner = HeldRunner()
    outbox = MaildirOutbox(tmp_path, runner, background=True)
    loading = outbox.load()
    assert_no_result(loading)
    found, acquired, missing = outbox.find(_id(1)), outbox.acquire(_id(2)), outbox.find(_id(50))
    for d in (found, acquired, missing):
        assert_no_result(d)
    runner.run_all()
    assert result_of(loading) == []
    assert result_of(found).id == _id(1)
    assert result_of(acquired).claimed
    assert result_of(missing) is None
    assert result_of(outbox.find(_id(3))).id == _id(3)      # at once now


def test_entries_added_and_removed_while_loading(tmp_path) -> None:
    _filled(tmp_path)
    runner = HeldRunner()
    outbox = MaildirOutbox(tmp_path, run_blocking=None, background=True)
    outbox._run_blocking = runner                    # the load waits; the writes do not
    loading = outbox.load()
    outbox.add([make_entry(id=_id(10))], MESSAGE)
    outbox.add([make_entry(id=_id(11))], MESSAGE)
    kept = outbox.get(_id(10))
    while runner.work:
        function, args, d = runner.work.pop(0)
        step = function(*args)
        if step is None:                             # the thread has read both files...
            outbox.remove(_id(11))                   # ...then one is delivered
        d.callback(step)
    result_of(loading)
    assert outbox.get(_id(10)) is kept
    assert outbox.get(_id(11)) is None
    assert len(outbox) == 6


# -- written again while the node runs (refresh) ------------------------------------------


def _change(outbox: MaildirOutbox, numbers) -> None:
    for n in numbers:
        entry = outbox.get(_id(n))
        entry.attempts += 1
        outbox.update(entry)


def _refreshing(tmp_path, count: int, runner=None) -> tuple[MaildirOutbox, SnapshotRefresh, Clock]:
    """An outbox of C{count} entries loaded (its snapshot written), checked every 300 s."""
    _filled(tmp_path, count)
    outbox = MaildirOutbox(tmp_path, runner)
    outbox.load()
    if runner is not None:
        runner.run_all()
    clock = Clock()
    refresh = SnapshotRefresh(outbox, clock, interval=300.0)
    refresh.start()
    return outbox, refresh, clock


def test_enough_changes_write_the_snapshot_again_at_the_next_check(tmp_path, logged_events) -> None:
    """
    Stop 12: past a tenth of the entries changed, the next check writes the
    snapshot again; a fresh start then reads none of their files.
    """
    outbox, refresh, clock = _refreshing(tmp_path, 40)
    first = os.stat(tmp_path / SNAPSHOT).st_ino
    _change(outbox, range(4))                        # 4 of 40: not yet
    clock.advance(300)
    assert os.stat(tmp_path / SNAPSHOT).st_ino == first
    _change(outbox, [4])
    outbox.remove(_id(5))
    outbox.add([make_entry(id=_id(77))], MESSAGE)    # 7 of 40
    assert outbox.unsnapshotted == 7
    clock.advance(299)
    assert os.stat(tmp_path / SNAPSHOT).st_ino == first
    clock.advance(1)
    assert os.stat(tmp_path / SNAPSHOT).st_ino != first
    assert outbox.unsnapshotted == 0
    assert [e["entries"] for e in logged_events
            if e.get("event") == "outbox-snapshot-written"][-1] == 40
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    after = _reloaded(tmp_path)
    assert _indexed(logged_events) == {"reused": 40, "read": 0}
    assert _state(after) == _state(outbox)
    refresh.stop()


def test_without_it_the_next_start_reads_the_changed_files(tmp_path, logged_events) -> None:
    """The control: the same changes, no check yet: a start reads their files."""
    outbox, refresh, clock = _refreshing(tmp_path, 40)
    _change(outbox, range(7))
    clock.advance(299)
    _reloaded(tmp_path)
    assert _indexed(logged_events) == {"reused": 33, "read": 7}
    refresh.stop()


def test_a_clean_stop_writes_what_changed(tmp_path, logged_events) -> None:
    outbox, refresh, clock = _refreshing(tmp_path, 40)
    _change(outbox, [3])                             # 1 of 40: no check would write it
    clock.advance(300)
    refresh.stop()
    assert not clock.getDelayedCalls()
    after = _reloaded(tmp_path)
    assert _indexed(logged_events) == {"reused": 40, "read": 0}
    assert after.get(_id(3)).attempts == outbox.get(_id(3)).attempts


def test_a_stop_with_nothing_changed_writes_nothing(tmp_path) -> None:
    outbox, refresh, clock = _refreshing(tmp_path, 10)
    first = os.stat(tmp_path / SNAPSHOT).st_ino
    assert refresh.stop() is None
    assert os.stat(tmp_path / SNAPSHOT).st_ino == first


def test_what_a_start_left_stale_counts(tmp_path) -> None:
    """
    A start that kept the snapshot (few changes) counts what it had wrong,
    as it judged it: a changed entry twice (its file read, its row wrong).
    """
    _filled(tmp_path, 50)
    _change(_reloaded(tmp_path), [1, 2])              # snapshot of 50, 2 changed since
    assert _reloaded(tmp_path).unsnapshotted == 4


def test_written_in_a_thread_one_at_a_time(tmp_path, logged_events) -> None:
    """
    Off the reactor thread; no second write while one runs; changes made
    meanwhile count against the new snapshot, and a start reads them.
    """
    runner = HeldRunner()
    outbox, refresh, clock = _refreshing(tmp_path, 20, runner)
    _change(outbox, range(5))
    runner.run_all()                                 # the records' writes
    clock.advance(300)
    [(function, args, d)] = runner.work
    assert function.func is refreshed_snapshot
    assert outbox.snapshot_writing
    _change(outbox, range(5, 8))                     # meanwhile: 3 of 20
    clock.advance(300)                               # due again, but one is running
    assert [f for f, _, _ in runner.work].count(function) == 1
    runner.run_all()                                 # the snapshot first, then their writes
    assert not outbox.snapshot_writing
    assert outbox.unsnapshotted == 3
    _reloaded(tmp_path)
    assert _indexed(logged_events) == {"reused": 17, "read": 3}
    clock.advance(300)
    runner.run_all()
    _reloaded(tmp_path)
    assert _indexed(logged_events) == {"reused": 20, "read": 0}
    refresh.stop()


def test_killed_while_writing_it_again(tmp_path, logged_events, monkeypatch) -> None:
    """
    A crash mid-write (half a temporary file, no rename): the old snapshot
    is whole and used for what did not change; the changes are counted
    again for the next check; the next start removes the half file.
    """
    outbox, refresh, clock = _refreshing(tmp_path, 40)
    old = (tmp_path / SNAPSHOT).read_bytes()
    _change(outbox, range(6))

    def dies(temporary, final, chunks, *args, **kwargs):
        with open(temporary, "wb") as half:
            half.write(next(iter(chunks)))
        raise OSError(5, "killed mid-write")

    monkeypatch.setattr(snapshot, "publish_new_file", dies)
    clock.advance(300)
    assert (tmp_path / SNAPSHOT).read_bytes() == old
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert outbox.unsnapshotted == 6
    assert [e for e in logged_events if e.get("event") == "outbox-snapshot-failed"]
    monkeypatch.undo()
    after = _reloaded(tmp_path)
    assert _indexed(logged_events)["reused"] == 34
    assert _state(after) == _state(outbox)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    refresh.stop()


def test_the_rewrite_keeps_only_rows_still_right(tmp_path) -> None:
    """
    L{refreshed_snapshot} from the folder alone: a file replaced after the
    old snapshot is read again, one gone is dropped, one added is read.
    """
    _filled(tmp_path, 6)
    outbox = _reloaded(tmp_path)
    _change(outbox, [2])
    outbox.remove(_id(4))
    outbox.add([make_entry(id=_id(9))], MESSAGE)
    assert refreshed_snapshot(tmp_path, tmp_path / SNAPSHOT) == 6
    listing = snapshot.list_folder(tmp_path / "entries")
    rows = {row[0]: row for chunk in snapshot.read_snapshot(tmp_path / SNAPSHOT, COLUMNS)
            for row in zip(*chunk)}
    assert sorted(rows) == sorted(listing) == sorted(e.id for e in outbox.entries())
    for name, row in rows.items():
        assert row[1:5] == listing[name]
        assert dict(zip(COLUMNS, row[5:])) == {
            k: v for k, v in asdict(outbox.get(name)).items() if k != "claimed"}


# -- read in bounded slices (issue 17: no long stall of the reactor) -------------------------


def _mixed_folder(tmp_path) -> MaildirOutbox:
    """40 entries, a snapshot, then some changed, removed, added, one without its message."""
    _filled(tmp_path, 40)
    outbox = _reloaded(tmp_path)
    _change(outbox, range(0, 40, 7))
    outbox.remove(_id(3))
    outbox.add([make_entry(id=_id(50 + n)) for n in range(6)], MESSAGE)
    os.unlink(tmp_path / "data" / f"{_id(9)}.eml")
    return outbox


@pytest.fixture
def small_slices(monkeypatch):
    """Slices (and snapshot chunks) of 4: every phase of a read takes several."""
    monkeypatch.setattr(snapshot, "SLICE", 4)
    monkeypatch.setattr(snapshot, "ROWS_PER_CHUNK", 4)


@pytest.mark.parametrize("with_snapshot", [True, False])
def test_the_index_is_read_in_bounded_slices(tmp_path, small_slices, with_snapshot) -> None:
    """
    Every slice of a start-up's reading takes at most SLICE files, rows or
    entries (the first check of the snapshot file aside), and the index
    read is the same as read whole.
    """
    expected = _state(_mixed_folder(tmp_path))
    del expected[_id(9)]
    if not with_snapshot:
        os.unlink(tmp_path / SNAPSHOT)
    loaded = Loaded({}, [])
    steps = list(read_in_slices(tmp_path, tmp_path / SNAPSHOT, loaded))
    assert steps and max(steps) <= 4
    # listing entries and data, 45 stats, the snapshot's 10 chunks or 44 files, rows, freeing
    assert len(steps) > 3 * 46 // 4
    assert {e.id: asdict(e) for e in loaded.index.values()} == expected
    assert (loaded.reused, loaded.read) == ((32, 12) if with_snapshot else (0, 44))


def test_a_background_load_is_one_slice_a_job(tmp_path, small_slices) -> None:
    """
    The node's load runs one slice per disk-thread job, the next asked for
    only once the last is done (the reactor runs between), with the garbage
    collector off until the index is in place.
    """
    expected = _state(_mixed_folder(tmp_path))
    del expected[_id(9)]
    runner = HeldRunner()
    outbox = MaildirOutbox(tmp_path, runner, background=True)
    loading = outbox.load()
    waiting = outbox.find(_id(52))
    jobs = 0
    while not loading.called:
        assert len(runner.work) == 1
        assert not gc.isenabled()
        assert_no_result(waiting)
        function, args, d = runner.work.pop(0)
        d.callback(function(*args))
        jobs += 1
    assert jobs > 3 * 45 // 4
    assert gc.isenabled()
    assert result_of(loading) == []
    runner.run_all()                                 # the new snapshot (12 of 44 were read)
    assert result_of(waiting).id == _id(52)
    assert _state(outbox) == expected
