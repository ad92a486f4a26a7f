"""
Tests for L{pullmail.smtp.conduct} (error and junk budgets, the DATA
deadline, the [limits] keys behind them) and L{pullmail.logsafe} (peer
text in logs).  Pure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pullmail.config import ConfigError, parse
from pullmail.logsafe import printable
from pullmail.smtp import replies
from pullmail.smtp.conduct import Conduct, Judgement, SessionLimits, data_allowance


def test_errors_grow_a_delay_after_half_then_close():
    """
    max_errors = 6: errors 1-3 answer at once, 4 and 5 wait 1 s and 2 s
    longer each (the soft limit), the 6th closes with 421.
    """
    conduct = Conduct(SessionLimits(max_errors=6))
    judged = [conduct.judge("FOO", replies.S500_UNRECOGNIZED) for _ in range(6)]
    assert judged[:5] == [Judgement(), Judgement(), Judgement(),
                          Judgement(delay=1.0), Judgement(delay=2.0)]
    assert judged[5] == Judgement(close=replies.S421_TOO_MANY_ERRORS)


def test_positive_replies_do_not_count_or_wait():
    conduct = Conduct(SessionLimits(max_errors=4))
    for _ in range(3):
        conduct.judge("FOO", replies.S500_UNRECOGNIZED)
    assert conduct.judge("MAIL", replies.S250_SENDER_OK) == Judgement()
    assert conduct.errors == 3


def test_421_is_not_an_error_reply():
    conduct = Conduct(SessionLimits(max_errors=1))
    assert conduct.judge("AUTH", replies.S421_BLOCKED) == Judgement()


def test_errors_off():
    conduct = Conduct(SessionLimits(max_errors=0))
    assert all(conduct.judge("FOO", replies.S500_UNRECOGNIZED) == Judgement()
               for _ in range(1000))


@pytest.mark.parametrize("verb", ["NOOP", "RSET", "VRFY", "HELP"])
def test_junk_commands_close_past_the_limit(verb):
    conduct = Conduct(SessionLimits(max_junk_commands=3))
    reply = replies.S250_NOOP
    assert [conduct.judge(verb, reply) for _ in range(3)] == [Judgement()] * 3
    assert conduct.judge(verb, reply) == Judgement(close=replies.S421_TOO_MANY_JUNK)


def test_progress_resets_junk():
    """An accepted MAIL (or RCPT, message...) is progress; EHLO is not."""
    conduct = Conduct(SessionLimits(max_junk_commands=2))
    conduct.judge("NOOP", replies.S250_NOOP)
    conduct.judge("NOOP", replies.S250_NOOP)
    conduct.judge("EHLO", replies.S250_OK)
    assert conduct.junk == 2
    conduct.judge("MAIL", replies.S250_SENDER_OK)
    assert conduct.junk == 0
    conduct.judge("MAIL", replies.S503_NESTED_MAIL)   # a refusal is no progress
    assert conduct.junk == 0


def test_data_allowance():
    """data_timeout plus a second per min_data_rate octets (RFC 5321 4.5.3.2)."""
    limits = SessionLimits(data_timeout=300.0, min_data_rate=1000)
    assert data_allowance(limits, 0) == 300.0
    assert data_allowance(limits, 50_000) == 350.0
    assert data_allowance(SessionLimits(data_timeout=60.0, min_data_rate=0), 10**9) == 60.0


# -- printable --------------------------------------------------------------------


@pytest.mark.parametrize("raw, logged", [
    ("EHLO ok.example", "EHLO ok.example"),
    ("X\x1b[2J\x08\x07", "X\\x1b[2J\\x08\\x07"),
    ("a\r\nforged: line", "a\\x0d\\x0aforged: line"),
    (b"caf\xc3\xa9 \xff\xfe", "café \\xff\\xfe"),
    ("a\\x41", "a\\x5cx41"),                        # no ambiguity with an escape
    ("\u202eevil\u2028", "\\u202eevil\\u2028"),     # bidi override, line separator
    ("\x85\x9b", "\\x85\\x9b"),                      # C1 controls (NEL, CSI)
])
def test_printable(raw, logged):
    assert printable(raw) == logged


def test_printable_cuts():
    assert printable("x" * 600) == "x" * 512 + "..."


@given(st.one_of(st.text(), st.binary()))
def test_printable_never_lets_a_control_through(value):
    text = printable(value, limit=10_000)
    assert text.isprintable()


# -- the [limits] keys behind SessionLimits ---------------------------------------

_BASE = Path("/srv/pullmail")
_NODE = {"node": {"domains": ["example.org"]}}


def test_limits_defaults():
    limits = parse(_NODE, _BASE).limits
    assert (limits.tls_handshake_timeout, limits.command_timeout, limits.data_timeout,
            limits.min_data_rate, limits.improper_pipelining, limits.pregreet_wait,
            limits.max_errors, limits.max_junk_commands) == \
        (30.0, 300.0, 300.0, 1024, "reject", 0.0, 20, 100)
    assert SessionLimits() == SessionLimits(30.0, 300.0, 300.0, 1024, "reject", 0.0, 20, 100)


def test_limits_values():
    limits = parse({**_NODE, "limits": {
        "tls_handshake_timeout": "10s", "command_timeout": "1m", "data_timeout": "2m",
        "min_data_rate": "2KiB", "improper_pipelining": "allow", "pregreet_wait": "3s",
        "max_errors": 0, "max_junk_commands": 7,
    }}, _BASE).limits
    assert (limits.tls_handshake_timeout, limits.command_timeout, limits.data_timeout,
            limits.min_data_rate, limits.improper_pipelining, limits.pregreet_wait,
            limits.max_errors, limits.max_junk_commands) == \
        (10.0, 60.0, 120.0, 2048, "allow", 3.0, 0, 7)


@pytest.mark.parametrize("key, value", [
    ("tls_handshake_timeout", "0s"), ("command_timeout", "0s"), ("data_timeout", "0s"),
    ("improper_pipelining", "maybe"), ("max_errors", -1), ("max_junk_commands", -1),
    ("min_data_rate", "fast"), ("pregreet_wait", "soon"),
])
def test_limits_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as caught:
        parse({**_NODE, "limits": {key: value}}, _BASE)
    assert caught.value.option == f"limits.{key}"
