"""
Tests for L{pullmail.outbound.sts.policy}: the MTA-STS TXT record, the
policy file, MX matching and the decision, as tables (RFC 8461 3, 4, 5).
"""

from __future__ import annotations

import pytest

from pullmail.outbound.sts.policy import (
    MAX_POLICY_SIZE,
    Decision,
    Mode,
    Policy,
    PolicyError,
    Verdict,
    allowed,
    mx_matches,
    parse_policy,
    parse_txt,
)

# -- the TXT record (RFC 8461 3.1) ----------------------------------------------


@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1; id=abc"], "abc"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc ;  "], "abc"),
    (["v=STSv1; ext=1; id=abc"], "abc"),
    # Only the first instance of a field counts.
    (["v=STSv1; id=first; id=second"], "first"),
    # Other TXT records are ignored.
    (["v=spf1 -all", "v=STSv1; id=abc", "hello"], "abc"),
    (["v=STSv1; id=" + "a" * 32], "a" * 32),
])
def test_txt_valid(records, expected):
    assert parse_txt(records) == expected


@pytest.mark.parametrize("records", [
    [],
    ["v=spf1 -all"],
    # Two records beginning with v=STSv1;: no policy.
    ["v=STSv1; id=a", "v=STSv1; id=b"],
    ["v=STSv1"],                      # no ";": not a candidate record
    ["v=STSv2; id=abc"],
    ["V=STSv1; id=abc"],
    ["v=STSv1;"],
    ["v=STSv1; ext=1"],               # no id
    ["v=STSv1; id="],
    ["v=STSv1; id=abc-def"],          # id is ALPHA / DIGIT only
    ["v=STSv1; id=" + "a" * 33],      # at most 32
    ["v=STSv1; id=abc; garbage"],     # a field without "="
    ["v=STSv1; id=abc; =x"],
    ["v=STSv1; id=abc; x=a b"],       # no space inside a value
    ["v=STSv1; id=abc;; x=1"],
    ["v=STSv1; id=first; id=bad!id"] * 1 + ["v=STSv1; id=x"],
])
def test_txt_invalid(records):
    with pytest.raises(PolicyError):
        parse_txt(records)


# -- the policy file (RFC 8461 3.2) ---------------------------------------------

GOOD = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n" \
       b"max_age: 604800\r\n"


@pytest.mark.parametrize("body, expected", [
    (GOOD, Policy(Mode.ENFORCE, 604800, ("mail.example.com", "*.example.net"), "id1")),
    # LF alone ends lines too; the last terminator is optional.
    (b"version: STSv1\nmode: testing\nmx: mx.example.org\nmax_age: 86400",
     Policy(Mode.TESTING, 86400, ("mx.example.org",), "id1")),
    # Fields in any order, whitespace after ":" and at the end, names as given.
    (b"max_age:\t0\nmx:MX.Example.ORG  \nmode:   enforce\nversion: STSv1\n",
     Policy(Mode.ENFORCE, 0, ("mx.example.org",), "id1")),
    # mode none needs no mx.
    (b"version: STSv1\nmode: none\nmax_age: 31557600\n", Policy(Mode.NONE, 31557600, (), "id1")),
    # Unknown fields are ignored; repeated non-mx fields: the first counts.
    (b"version: STSv1\nmode: testing\nmode: enforce\nmx: a.example\nmax_age: 5\nmax_age: 9\n"
     b"x-future: some value here\n",
     Policy(Mode.TESTING, 5, ("a.example",), "id1")),
])
def test_policy_valid(body, expected):
    assert parse_policy(body, "id1") == expected


@pytest.mark.parametrize("body", [
    b"",
    b"<html><body>not found</body></html>",
    b"version: STSv1\nmode: enforce\nmx: a.example\n",                      # no max_age
    b"version: STSv1\nmx: a.example\nmax_age: 5\n",                         # no mode
    b"mode: enforce\nmx: a.example\nmax_age: 5\n",                          # no version
    b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 5\n",
    b"version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 5\n",
    b"version: STSv1\nmode: block\nmx: a.example\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmax_age: 5\n",                         # enforce, no mx
    b"version: STSv1\nmode: testing\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",   # over the bound
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1e3\n",
    b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 5\n",       # one wildcard label
    b"version: STSv1\nmode: enforce\nmx: mail.*.example\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: *example.com\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: a_b.example\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: a.example.\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: -a.example\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\ngarbage line\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\n\n",         # empty line
    b" version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\n",        # leading space
    b"version: STSv1\rmode: enforce\rmx: a.example\rmax_age: 5\r",          # CR alone
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\nx: \x00\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\nx: \xff\xfe\n",  # not UTF-8
    b"\xef\xbb\xbfversion: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\n",  # a BOM
])
def test_policy_invalid(body):
    with pytest.raises(PolicyError):
        parse_policy(body)


def test_policy_oversized():
    """More than 64 KiB is refused even when every line is a valid field."""
    padding = b"x-pad: " + b"a" * 100 + b"\n"
    body = GOOD + padding * (MAX_POLICY_SIZE // len(padding))
    assert len(body) > MAX_POLICY_SIZE
    with pytest.raises(PolicyError, match="larger"):
        parse_policy(body)
    assert parse_policy(body[:MAX_POLICY_SIZE].rpartition(b"\n")[0]).mode is Mode.ENFORCE


# -- MX matching (RFC 8461 4.1) -------------------------------------------------


@pytest.mark.parametrize("pattern, host, expected", [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.Example.com", True),
    ("mail.example.com", "mail.example.com.", True),
    ("mail.example.com", "mail2.example.com", False),
    ("mail.example.com", "example.com", False),
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "MX.EXAMPLE.COM", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "foo.bar.example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "mail.example.com.evil", False),
    ("*.example.com", "mailexample.com", False),
])
def test_mx_matches(pattern, host, expected):
    assert mx_matches(pattern, host) is expected


# -- the decision (RFC 8461 5) --------------------------------------------------

ENFORCE = Policy(Mode.ENFORCE, 86400, ("mx.example.org", "*.backup.example"), "1")
TESTING = Policy(Mode.TESTING, 86400, ("mx.example.org",), "1")
NONE = Policy(Mode.NONE, 86400, (), "1")


@pytest.mark.parametrize("policy, host, verified, verdict", [
    (None, "anything.example", None, Verdict.DELIVER),
    (None, "anything.example", False, Verdict.DELIVER),
    (NONE, "anything.example", False, Verdict.DELIVER),
    (ENFORCE, "mx.example.org", None, Verdict.DELIVER),       # before connecting
    (ENFORCE, "mx.example.org", True, Verdict.DELIVER),
    (ENFORCE, "mx.example.org", False, Verdict.REFUSE),       # certificate failed
    (ENFORCE, "b1.backup.example", True, Verdict.DELIVER),
    (ENFORCE, "evil.example", None, Verdict.REFUSE),           # not listed
    (ENFORCE, "evil.example", True, Verdict.REFUSE),
    (TESTING, "mx.example.org", True, Verdict.DELIVER),
    (TESTING, "mx.example.org", False, Verdict.REPORT),
    (TESTING, "evil.example", None, Verdict.REPORT),
])
def test_allowed(policy, host, verified, verdict):
    decision = allowed(policy, host, verified)
    assert decision.verdict is verdict
    assert bool(decision.reason) is (verdict is not Verdict.DELIVER)


def test_reasons_name_the_problem():
    assert "not in the MTA-STS policy" in allowed(ENFORCE, "evil.example").reason
    assert "mx.example.org" in allowed(ENFORCE, "evil.example").reason
    assert "certificate" in allowed(ENFORCE, "mx.example.org", False).reason
    assert allowed(None, "x") == Decision(Verdict.DELIVER)


@pytest.mark.parametrize("pattern, kept", [
    ("mx.bücher.example", "mx.xn--bcher-kva.example"),
    ("*.Bücher.example", "*.xn--bcher-kva.example"),
    ("mx.xn--bcher-kva.example", "mx.xn--bcher-kva.example"),
])
def test_mx_patterns_in_u_labels_become_a_labels(pattern, kept):
    body = f"version: STSv1\nmode: enforce\nmx: {pattern}\nmax_age: 60\n".encode()
    assert parse_policy(body).mx == (kept,)


@pytest.mark.parametrize("pattern", ["mx.a\u200db.example", "*.-bücher.example"])
def test_mx_patterns_invalid_under_idna_2008(pattern):
    body = f"version: STSv1\nmode: enforce\nmx: {pattern}\nmax_age: 60\n".encode()
    with pytest.raises(PolicyError):
        parse_policy(body)
