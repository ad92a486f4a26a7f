"""Tests for L{pullmail.maillog}: the log vocabulary."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from twisted.logger import Logger, LogLevel

from pullmail import maillog
from pullmail.maillog import VOCABULARY, Event

PACKAGE = Path(maillog.__file__).parent


def test_every_event_is_in_the_vocabulary_once():
    constants = [v for v in vars(maillog).values() if isinstance(v, Event)]
    assert sorted(e.name for e in constants) == sorted(VOCABULARY)
    assert len(set(VOCABULARY)) == len(constants)


def test_two_events_may_not_share_a_name():
    with pytest.raises(ValueError, match="two events named x"):
        maillog._vocabulary(Event("x", "a"), Event("x", "b"))


def test_fields_are_the_format_s_and_the_extras():
    event = Event("e", "{a} and {b!r} of {c.d}", extras=("code",))
    assert event.fields == {"a", "b", "c", "code"}


def test_emitting_needs_exactly_the_fields():
    seen: list[dict] = []
    log = Logger(namespace="pullmail.test", observer=seen.append)
    event = Event("thing-done", "{what} done", LogLevel.warn, extras=("code",))
    event(log, what="it", code=250)
    [emitted] = seen
    assert (emitted["event"], emitted["log_format"], emitted["log_level"]) == (
        "thing-done", "{what} done", LogLevel.warn)
    assert (emitted["what"], emitted["code"]) == ("it", 250)
    with pytest.raises(TypeError, match=r"missing \['code'\]"):
        event(log, what="it")
    with pytest.raises(TypeError, match=r"unexpected \['peer'\]"):
        event(log, what="it", code=1, peer="x")


def _event_literals(path: Path) -> list[int]:
    """Lines of C{path} that name an event by a string instead of the vocabulary."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "event" and isinstance(
                node.value, ast.Constant):
            found.append(node.lineno)
    return found


def test_no_event_is_named_outside_the_vocabulary():
    """Issue 12 item 5: every event is defined once, in pullmail.maillog."""
    offenders = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if path.name != "maillog.py" and (lines := _event_literals(path))
    }
    assert offenders == {}
