"""
The node's log vocabulary: every mail event pullmail emits, defined once.

Each L{Event} has one name (the C{event} field of the twisted.logger event,
with one meaning), one format, and so one set of fields: the names in its
format.  Code emits an event by calling it with those fields, and the
metrics, the tests and the operator's log searches all read the same names.
Diagnostics that are not mail events (a traceback, a start-up line) are
plain log calls.

"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from types import MappingProxyType

from twisted.logger import Logger, LogLevel

__all__ = ["Event", "VOCABULARY"]


@dataclass(frozen=True)
class Event:
    """One kind of mail event: its name, its level and its format."""

    name: str
    format: str
    level: LogLevel = LogLevel.info
    fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = {f.split(".")[0].split("[")[0].split("!")[0]
                 for _, f, _, _ in string.Formatter().parse(self.format) if f}
        object.__setattr__(self, "fields", frozenset(names))

    def __call__(self, log: Logger, **fields: object) -> None:
        """Emit this event on C{log}; the fields must be exactly the format's."""
        if fields.keys() != self.fields:
            missing = sorted(self.fields - fields.keys())
            extra = sorted(fields.keys() - self.fields)
            raise TypeError(f"event {self.name}: missing {missing}, unexpected {extra}")
        log.emit(self.level, self.format, event=self.name, **fields)


def _vocabulary(*events: Event) -> MappingProxyType:
    table: dict[str, Event] = {}
    for event in events:
        if event.name in table:
            raise ValueError(f"two events named {event.name}")
        table[event.name] = event
    return MappingProxyType(table)


VOCABULARY = _vocabulary()
