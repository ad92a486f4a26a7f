"""
Tests for L{pullmail.storage.record}: versioned JSON records, and reading a folder
of them at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from pullmail.storage import record


@dataclass
class Sample:
    name: str
    count: int = 0


def test_dump_load_round_trip() -> None:
    data = record.dump(Sample("a", 3), 2)
    assert record.load(Sample, data, 2) == Sample("a", 3)


def test_load_refuses_another_version() -> None:
    with pytest.raises(ValueError):
        record.load(Sample, record.dump(Sample("a"), 1), 2)
    with pytest.raises(ValueError):
        record.load(Sample, b"[1, 2]", 2)


def test_load_ignores_fields_added_later() -> None:
    data = b'{"version": 2, "name": "a", "count": 1, "added_later": true}'
    assert record.load(Sample, data, 2) == Sample("a", 1)


def test_dump_leaves_out_excluded_fields() -> None:
    assert b"count" not in record.dump(Sample("a"), 2, exclude=("count",))


@dataclass
class Nested:
    inner: Sample
    tags: list
    options: dict


def test_dump_writes_what_it_always_wrote() -> None:
    """The values taken as they are (not deep-copied first): the same bytes on disk."""
    value = Nested(Sample("a", 3), ["x", "y"], {"notify": {"b@example.org": ["FAILURE"]}})
    assert record.dump(value, 1) == (
        b'{\n "inner": {\n  "count": 3,\n  "name": "a"\n },\n "options": {\n  "notify": {\n'
        b'   "b@example.org": [\n    "FAILURE"\n   ]\n  }\n },\n "tags": [\n  "x",\n  "y"\n ],'
        b'\n "version": 1\n}')
    assert record.load(Nested, record.dump(value, 1), 1).inner == {"name": "a", "count": 3}


def test_dump_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError):
        record.dump(Sample(object()), 1)


def test_read_folder_reads_the_records_whole(tmp_path) -> None:
    contents = {
        "small": b"{}",
        "boundary": b"x" * record.READ_SIZE,
        "large": os.urandom(3 * record.READ_SIZE + 17),
        "empty": b"",
    }
    for stem, data in contents.items():
        (tmp_path / f"{stem}.json").write_bytes(data)
    (tmp_path / ".hidden.json").write_bytes(b"temporary")
    (tmp_path / ".half-written.json.123.tmp").write_bytes(b"{")
    (tmp_path / "notes.txt").write_bytes(b"other")
    assert dict(record.read_folder(tmp_path)) == contents


def test_read_folder_goes_in_inode_order(tmp_path) -> None:
    for i in range(50):
        (tmp_path / f"r{i:02}.json").write_bytes(b"{}")
    stems = [stem for stem, _ in record.read_folder(tmp_path)]
    inodes = [os.stat(tmp_path / f"{stem}.json").st_ino for stem in stems]
    assert inodes == sorted(inodes)
    assert sorted(stems) == [f"r{i:02}" for i in range(50)]


def test_read_folder_other_suffix(tmp_path) -> None:
    (tmp_path / "a.eml").write_bytes(b"message")
    (tmp_path / "a.json").write_bytes(b"{}")
    assert list(record.read_folder(tmp_path, ".eml")) == [("a", b"message")]


def test_read_folder_skips_folders_and_links(tmp_path) -> None:
    (tmp_path / "real.json").write_bytes(b"{}")
    (tmp_path / "folder.json").mkdir()
    secret = tmp_path.parent / f"{tmp_path.name}-secret"
    secret.write_bytes(b"not a record")
    (tmp_path / "link.json").symlink_to(secret)
    assert list(record.read_folder(tmp_path)) == [("real", b"{}")]
