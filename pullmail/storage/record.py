"""
Versioned JSON records on disk (no pickle: STYLE anti-pattern 6): readable
by an operator, refused when written by an unknown version, tolerant of
fields added later.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

__all__ = ["dump", "load", "read_files", "read_folder"]

READ_SIZE = 64 * 1024

T = TypeVar("T")


def dump(record, version: int, exclude: tuple[str, ...] = ()) -> bytes:
    """
    The record's fields (but C{exclude}) and C{version}, as JSON.  The
    fields are taken as they are, not copied first (C{dataclasses.asdict}
    deep-copies every value: half the cost of a record write that every
    queued message and every notification makes); a dataclass inside one
    is written as its fields, as C{asdict} would.
    """
    data = {name: getattr(record, name) for name in _field_order(type(record))
            if name not in exclude}
    data["version"] = version
    return json.dumps(data, sort_keys=True, indent=1, default=_fields).encode("utf-8")


@functools.cache
def _field_order(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _fields(value):
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def load(cls: type[T], data: bytes, version: int) -> T:
    """@raise ValueError: not JSON, or another version."""
    mapping = json.loads(data)
    if not isinstance(mapping, dict) or mapping.pop("version", None) != version:
        raise ValueError(f"not a version {version} {cls.__name__} record")
    known = _field_names(cls)
    return cls(**{k: v for k, v in mapping.items() if k in known})


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def read_folder(folder: Path, suffix: str = ".json") -> Iterator[tuple[str, bytes]]:
    """
    Yield (stem, contents) for each regular file in C{folder} named
    C{*suffix} (dot files, folders and symbolic links aside), in the order
    of their inode numbers: the order of the inode tables on disk, so that
    a start-up with a cold cache reads them in one sweep rather than in the
    directory's hash order.  Files are opened relative to the folder,
    without resolving its path again.
    """
    with os.scandir(folder) as listing:
        names = sorted((item.inode(), item.name) for item in listing
                       if item.name.endswith(suffix) and not item.name.startswith(".")
                       and item.is_file(follow_symlinks=False))
    for name, data in read_files(folder, [name for _, name in names]):
        yield name[: -len(suffix)], data


def read_files(folder: Path, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """
    Yield (name, contents) of each of the files C{names} in C{folder} that
    exists, in the order given, opened relative to the folder (without
    resolving its path again) and never through a symbolic link.
    """
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=folder_fd)
            except FileNotFoundError:
                continue
            try:
                data = os.read(fd, READ_SIZE)
                if len(data) == READ_SIZE:  # a short read of a regular file is its end
                    data += b"".join(iter(lambda: os.read(fd, READ_SIZE), b""))
            finally:
                os.close(fd)
            yield name, data
    finally:
        os.close(folder_fd)
