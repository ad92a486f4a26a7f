# -*- test-case-name: tests.test_snapshot -*-
"""
A snapshot of a folder of records: what each file said when it was last
read, keyed by the file's identity, so that a start-up reads and parses
only the files that changed since (issue 17: a million outbox entries).

The snapshot is a cache, never the record of anything.  The folder's
listing says which records exist; a record is taken from the snapshot only
if its file is still the very file the snapshot read, that is if its
L{Identity} (inode, mtime, ctime, size) is unchanged.  Every change of a
record replaces its file (a new inode; L{durable.replace_file}), so a
changed record is read again, and so is one added since; one removed since
is not listed.  A snapshot that is missing, damaged, torn or of another
format is ignored: the start-up then reads every file, as without one.

On disk, one file written whole and renamed into place (tmp, fsync,
rename, fsync of the folder): a JSON header line naming the columns; then
chunks of up to L{ROWS_PER_CHUNK} rows, each stored column by column
(L{columns}: packed numbers, lines of text, or JSON, whichever fits the
column's values, so that a million rows decode in about a second); a last
line C{end <crc32 of all before it> <rows>}.  A row is C{(name, inode,
mtime_ns, ctime_ns, size, *values)}.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import struct
import zlib
from itertools import islice
from operator import attrgetter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pullmail.storage import columns as codec
from pullmail.storage.durable import publish_new_file

__all__ = ["Identity", "SnapshotUnusable", "identity", "list_folder", "list_folder_in_slices",
           "read_snapshot", "write_snapshot", "remove_leftovers", "SLICE"]

FORMAT = "pullmail-snapshot"
VERSION = 1
ROWS_PER_CHUNK = 4096     # encoding one holds the GIL for milliseconds, not seconds
# Files or rows per slice of a start-up's reading (L{list_folder_in_slices},
# the outbox's): a slice's longest step holds the GIL for milliseconds.
SLICE = 4096
_COUNT = struct.Struct("<Q")
BLOCK = 1 << 20
_TRAILER = b"end %08x %012d\n"
TRAILER_SIZE = len(_TRAILER % (0, 0))

# The file's identity: a file replaced, even by one reusing its inode
# number, differs in its times (and the snapshot is written from what was
# read after its listing was taken, so an identity is never newer than
# the contents beside it).
Identity = tuple[int, int, int, int]


class SnapshotUnusable(Exception):
    """The snapshot cannot be used (missing, damaged, another format); the reason."""


_identity = attrgetter("st_ino", "st_mtime_ns", "st_ctime_ns", "st_size")


def identity(stat: os.stat_result) -> Identity:
    return _identity(stat)


def list_folder(folder: Path, suffix: str = ".json") -> dict[str, Identity]:
    """
    stem -> identity of each regular file named C{*suffix} in C{folder}
    (dot files, folders and symbolic links aside), in the order of their
    inode numbers (L{list_folder_in_slices}, all at once).
    """
    listing: dict[str, Identity] = {}
    for _ in list_folder_in_slices(folder, listing, suffix):
        pass
    return listing


def list_folder_in_slices(folder: Path, into: dict[str, Identity],
                          suffix: str = ".json") -> Iterator[int]:
    """
    Fill C{into} with stem -> identity of each regular file named
    C{*suffix} in C{folder} (dot files, folders and symbolic links aside),
    stat'ed in the order of their inode numbers (a cold start reads the
    inode tables in one sweep), so that C{into} is in that order too.

    In slices of at most L{SLICE} files, each yielding how many it took:
    no step sorts or builds a dict over the whole folder in one C call,
    which would hold the GIL for up to half a second at a million files
    (the reactor's thread waits for it).  Each slice's inodes are sorted,
    and the sorted runs merged.  Within a slice the loops run in C (map,
    zip): a million files cost a million stat(2) calls and little else.
    """
    runs = []
    with os.scandir(folder) as listing:
        while taken := list(islice(listing, SLICE)):
            runs.append(sorted([(item.inode(), item.name) for item in taken
                                if item.name.endswith(suffix) and not item.name.startswith(".")
                                and item.is_file(follow_symlinks=False)]))
            yield len(taken)
    ordered = heapq.merge(*runs)
    del runs
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        stat = functools.partial(os.stat, dir_fd=folder_fd, follow_symlinks=False)
        cut = -len(suffix)
        while names := [name for _, name in islice(ordered, SLICE)]:
            try:
                identities = list(map(_identity, map(stat, names)))
            except FileNotFoundError:       # one went meanwhile
                kept = [(name, st) for name in names
                        if (st := _stat_or_none(stat, name)) is not None]
                names, identities = [name for name, _ in kept], [_identity(st) for _, st in kept]
            into.update(zip([name[:cut] for name in names], identities))
            yield len(names)
    finally:
        os.close(folder_fd)


def _stat_or_none(stat, name: str) -> os.stat_result | None:
    try:
        return stat(name)
    except FileNotFoundError:
        return None


def write_snapshot(path: Path, columns: Sequence[str],
                   rows: Iterable[tuple[str, Identity, Sequence]]) -> int:
    """
    Replace the snapshot at C{path} atomically with C{rows}: (name,
    identity, values in the order of C{columns}).  Blocking (run it in a
    thread: it gives the GIL up between chunks).  Returns the rows written.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    written = [0]
    publish_new_file(temporary, path, _encoded(columns, iter(rows), written))
    return written[0]


def _encoded(columns: Sequence[str], rows: Iterator, written: list[int]) -> Iterator[bytes]:
    """The snapshot's bytes, chunk by chunk; C{written[0]} counts the rows."""
    header = json.dumps({"format": FORMAT, "version": VERSION, "columns": list(columns)})
    data = header.encode("ascii") + b"\n"
    crc = 0
    while data:
        crc = zlib.crc32(data, crc)
        yield data
        batch = [(name, *ident, *values) for name, ident, values in islice(rows, ROWS_PER_CHUNK)]
        written[0] += len(batch)
        data = _chunk(batch, 5 + len(columns)) if batch else b""
    yield _TRAILER % (crc, written[0])


def _chunk(rows: list[tuple], width: int) -> bytes:
    if any(len(row) != width for row in rows):
        raise ValueError("a row of the wrong width")
    parts = [_COUNT.pack(len(rows))]
    for column in zip(*rows):
        tag, payload = codec.encode(column)
        parts += (tag, _COUNT.pack(len(payload)), payload)
    return b"".join(parts)


def read_snapshot(path: Path, columns: Sequence[str]) -> Iterator[list[list]]:
    """
    The chunks of the snapshot at C{path}, once the whole file is checked:
    each a list of columns C{[names, inodes, mtimes_ns, ctimes_ns, sizes,
    *values]}, so that a reader can match them in C loops (map, zip).

    @raise SnapshotUnusable: (before any row) missing, torn, damaged, or
        written for other columns.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotUnusable("none") from None
    try:
        body = _checked_length(fd)
        source = os.fdopen(os.dup(fd), "rb", buffering=BLOCK)
    finally:
        os.close(fd)
    try:
        _check_header(source.readline(), columns)
    except BaseException:
        source.close()
        raise
    return _chunks(source, body - source.tell(), 5 + len(columns))


def _check_header(line: bytes, columns: Sequence[str]) -> None:
    try:
        header = json.loads(line)
    except ValueError:
        raise SnapshotUnusable("damaged header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT \
            or header.get("version") != VERSION:
        raise SnapshotUnusable("another format")
    if header.get("columns") != list(columns):
        raise SnapshotUnusable("other columns (another version of pullmail)")


def _checked_length(fd: int) -> int:
    """The length of the body, once its checksum is found to match the trailer."""
    size = os.fstat(fd).st_size
    if size < TRAILER_SIZE:
        raise SnapshotUnusable("torn")
    body = size - TRAILER_SIZE
    parts = os.pread(fd, TRAILER_SIZE, body).split()
    if len(parts) != 3 or parts[0] != b"end":
        raise SnapshotUnusable("torn")
    crc, offset = 0, 0
    while offset < body:
        block = os.pread(fd, min(BLOCK, body - offset), offset)
        if not block:
            raise SnapshotUnusable("torn")
        crc = zlib.crc32(block, crc)
        offset += len(block)
    if crc != int(parts[1], 16):
        raise SnapshotUnusable("damaged (checksum)")
    return body


def _chunks(source, length: int, width: int) -> Iterator[list[list]]:
    """
    Each chunk in the next C{length} bytes of C{source}, as its columns.
    @raise ValueError: a chunk does not hold what it says.
    """
    with source:
        while length > 0:
            head = _read(source, _COUNT.size)
            (count,) = _COUNT.unpack(head)
            length -= len(head)
            decoded = []
            for _ in range(width):
                tag = _read(source, 1)
                size = _read(source, _COUNT.size)
                payload = _read(source, _COUNT.unpack(size)[0])
                length -= 1 + len(size) + len(payload)
                decoded.append(codec.decode(tag, payload, count))
            yield decoded
        if length < 0:
            raise ValueError("chunks overrun the snapshot's body")


def _read(source, size: int) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise ValueError("snapshot chunk cut short")
    return data


def remove_leftovers(path: Path) -> None:
    """Temporary files of snapshots whose writer died (kill -9) before the rename."""
    prefix = f".{path.name}."
    for name in os.listdir(path.parent):
        if name.startswith(prefix) and name.endswith(".tmp"):
            (path.parent / name).unlink(missing_ok=True)
