"""
Versioned JSON records on disk (no pickle: STYLE anti-pattern 6): readable
by an operator, refused when written by an unknown version, tolerant of
fields added later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import TypeVar

__all__ = ["dump", "load"]

T = TypeVar("T")


def dump(record, version: int, exclude: tuple[str, ...] = ()) -> bytes:
    data = asdict(record)
    for name in exclude:
        del data[name]
    data["version"] = version
    return json.dumps(data, sort_keys=True, indent=1).encode("utf-8")


def load(cls: type[T], data: bytes, version: int) -> T:
    """@raise ValueError: not JSON, or another version."""
    mapping = json.loads(data)
    if not isinstance(mapping, dict) or mapping.pop("version", None) != version:
        raise ValueError(f"not a version {version} {cls.__name__} record")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in mapping.items() if k in known})
