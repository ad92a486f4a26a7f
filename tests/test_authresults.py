"""
The Authentication-Results field (pullmail.inbound.authresults, RFC
8601): what we write, and the forged copies of ours that we remove.
"""

from __future__ import annotations

from pullmail.inbound.authresults import Results, authentication_results, strip_ours
from pullmail.trust.arc import ARCResult
from pullmail.trust.dkim import DKIMResult
from pullmail.trust.dmarc import DMARCVerdict

BODY = b"From: a@example.com\r\nSubject: x\r\n\r\nhi\r\n"


def test_every_method_on_one_field():
    header = authentication_results("mx.example.org", Results(
        spf=("pass", "mailfrom", "bounce@example.com"),
        dkim=(DKIMResult("pass", "example.com", "s1", "AbCdEfGh1234"),
              DKIMResult("fail", "example.net", "s2", "", "body hash mismatch")),
        dmarc=DMARCVerdict("pass", "example.com", "reject", "none"),
    ))
    assert header == (
        b"Authentication-Results: mx.example.org;\r\n"
        b"\tspf=pass smtp.mailfrom=bounce@example.com;\r\n"
        b"\tdkim=pass header.d=example.com header.s=s1 header.b=AbCdEfGh1234;\r\n"
        b"\tdkim=fail (body hash mismatch) header.d=example.net header.s=s2;\r\n"
        b"\tdmarc=pass (p=reject dis=none) header.from=example.com\r\n"
    )


def test_unsigned_mail_says_dkim_none_and_no_method_says_none():
    header = authentication_results("mx", Results(spf=("none", "helo", "client.test")))
    assert b"spf=none smtp.helo=client.test;\r\n\tdkim=none\r\n" in header
    assert authentication_results("mx", Results()) == b"Authentication-Results: mx;\r\n\tnone\r\n"


def test_arc_result_after_dkim_with_the_last_sealer():
    """RFC 8617 7.1; the sealer's d= and the reason are peer text: comment-safe."""
    header = authentication_results("mx", Results(
        spf=("pass", "mailfrom", "a@example.com"), arc=ARCResult("none")))
    assert header.endswith(b"\tdkim=none;\r\n\tarc=none\r\n")
    header = authentication_results("mx", Results(
        spf=("pass", "mailfrom", "a@example.com"),
        arc=ARCResult("fail", 3, "lists.example.net", "b' \\xff(x)'\r\n")))
    assert header.endswith(b"\tarc=fail (i=3 d=lists.example.net b' xffx')\r\n")


def test_submission_names_the_user():
    header = authentication_results("mx", Results(auth_user="alice@example.org"))
    assert header.endswith(b"\tauth=pass smtp.auth=alice@example.org\r\n")


def test_peer_text_cannot_break_out():
    header = authentication_results("mx", Results(
        spf=("pass", "mailfrom", 'x"y;z@example.com'),
        dkim=(DKIMResult("permerror", "a b", "s;1", "", "bad ) (\r\n tag"),)))
    assert b"\r\n\t" not in header.split(b";\r\n\t", 3)[-1].rstrip(b"\r\n")
    assert b'smtp.mailfrom="xy;z@example.com"' in header
    assert b"(bad   tag)" in header and b'header.d="a b"' in header


def test_strip_ours_only():
    ours = b"Authentication-Results: MX.example.org; dkim=pass header.d=bank.test\r\n"
    folded = b"Authentication-Results: (comment) mx.example.org;\r\n\tspf=pass\r\n"
    theirs = b"Authentication-Results: mx.other.test; spf=fail\r\n"
    message = ours + theirs + folded + BODY
    assert strip_ours(message, "mx.example.org") == theirs + BODY
    assert strip_ours(BODY, "mx.example.org") is BODY
    in_body = BODY + ours
    assert strip_ours(in_body, "mx.example.org") == in_body
