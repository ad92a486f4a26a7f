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
rename, fsync of the folder): a JSON header line; lines each holding a JSON
array of rows C{[name, inode, mtime_ns, ctime_ns, size, *values]}; a last
line C{end <crc32 of all before it> <rows>}.
"""

from __future__ import annotations

import json
import os
import zlib
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pullmail.storage.durable import fsync_directory

__all__ = ["Identity", "SnapshotUnusable", "identity", "list_folder", "read_snapshot",
           "write_snapshot", "remove_leftovers"]

FORMAT = "pullmail-snapshot"
VERSION = 1
ROWS_PER_LINE = 2000      # json.dumps/loads of one line holds the GIL ~ms, not seconds
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


def identity(stat: os.stat_result) -> Identity:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)


def list_folder(folder: Path, suffix: str = ".json") -> dict[str, Identity]:
    """
    stem -> identity of each regular file named C{*suffix} in C{folder}
    (dot files, folders and symbolic links aside), in the order of their
    inode numbers: a cold start reads the inode tables in one sweep.
    """
    with os.scandir(folder) as listing:
        names = sorted((item.inode(), item.name) for item in listing
                       if item.name.endswith(suffix) and not item.name.startswith("."))
    found: dict[str, Identity] = {}
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        cut = -len(suffix)
        for _, name in names:
            try:
                stat = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.st_mode & 0o170000 == 0o100000:     # S_ISREG
                found[name[:cut]] = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
    finally:
        os.close(folder_fd)
    return found


def write_snapshot(path: Path, columns: Sequence[str],
                   rows: Iterable[tuple[str, Identity, Sequence]]) -> int:
    """
    Replace the snapshot at C{path} atomically with C{rows}: (name,
    identity, values in the order of C{columns}).  Blocking (run it in a
    thread: it gives the GIL up between lines).  Returns the rows written.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    header = json.dumps({"format": FORMAT, "version": VERSION, "columns": list(columns)})
    crc, count = 0, 0
    rows = iter(rows)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=BLOCK, closefd=False) as out:
            line = header.encode("ascii") + b"\n"
            while line:
                crc = zlib.crc32(line, crc)
                out.write(line)
                batch = [[name, *ident, *values] for name, ident, values in islice(rows, ROWS_PER_LINE)]
                count += len(batch)
                line = (json.dumps(batch, separators=(",", ":")).encode("ascii") + b"\n"
                        if batch else b"")
            out.write(_TRAILER % (crc, count))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)
    fsync_directory(path.parent)
    return count


def read_snapshot(path: Path, columns: Sequence[str]) -> Iterator[list]:
    """
    The rows of the snapshot at C{path}, as lists C{[name, inode, mtime_ns,
    ctime_ns, size, *values]}, once the whole file is checked.

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
    return _rows(source, body - source.tell())


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
    trailer = os.pread(fd, TRAILER_SIZE, body)
    parts = trailer.split()
    if len(parts) != 3 or parts[0] != b"end":
        raise SnapshotUnusable("torn")
    crc, left, offset = 0, body, 0
    while left:
        block = os.pread(fd, min(BLOCK, left), offset)
        if not block:
            raise SnapshotUnusable("torn")
        crc = zlib.crc32(block, crc)
        offset += len(block)
        left -= len(block)
    if crc != int(parts[1], 16):
        raise SnapshotUnusable("damaged (checksum)")
    return body


def _rows(source, length: int) -> Iterator[list]:
    """Each row of the lines in the next C{length} bytes of C{source}."""
    with source:
        while length > 0:
            line = source.readline()
            length -= len(line)
            yield from json.loads(line)


def remove_leftovers(path: Path) -> None:
    """Temporary files of snapshots whose writer died (kill -9) before the rename."""
    prefix = f".{path.name}."
    for name in os.listdir(path.parent):
        if name.startswith(prefix) and name.endswith(".tmp"):
            (path.parent / name).unlink(missing_ok=True)
