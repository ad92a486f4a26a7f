"""
DKIM signing and verification (pullmail.trust.dkim): our signatures
verify at dkimpy for both algorithms, and every malformed signature, key
record or DNS failure of the issue's list gives a result, not a traceback.
"""

from __future__ import annotations

import base64
import random
import re
import time
from pathlib import Path

import dkim
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, TXTAnswer
from pullmail.testing import assert_no_result, result_of
from dkim.canonicalization import Relaxed, Simple

from pullmail.trust import message as message_module
from pullmail.trust.dkim import MAX_SIGNATURES, Signer, Verifier, check_tags, signed_fields
from pullmail.trust.dkim_records import KeyRecords
from pullmail.trust.message import ParsedMessage

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: lunch\r\n"
    b"Date: Sat, 05 Dec 2026 03:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Shall we?\r\n"
)
NOW = 1_700_000_000


def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture
def signer(dkim_keys):
    return Signer(dkim_keys[0], clock())


class FakeTXT:
    """
    TXT answers from a dict; a name mapped to an exception fails with it.
    C{answer} is the resolver's C{txt_answer}: every answer, a missing
    name's too, lives C{ttl} seconds.
    """

    def __init__(self, records, ttl: float = 300.0) -> None:
        self.records = dict(records)
        self.ttl = ttl
        self.asked: list[str] = []
        self.waiting: dict[str, defer.Deferred] = {}

    def __call__(self, name: str) -> defer.Deferred:
        self.asked.append(name)
        answer = self.records.get(name, DNSPermanentError(name, ttl=self.ttl))
        if answer == "hang":
            self.waiting[name] = defer.Deferred()
            return self.waiting[name]
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer if isinstance(answer, list) else [answer])

    def answer(self, name: str) -> defer.Deferred:
        return self(name).addCallback(TXTAnswer, self.ttl)


def blocking(function, *args):
    return defer.succeed(function(*args))


def dnsfunc(records):
    return lambda name, timeout=5: records[name.decode().rstrip(".")].encode()


def verifier(txt: FakeTXT, run=blocking, at: Clock | None = None) -> Verifier:
    """A Verifier whose key records come from C{txt}, kept on the clock C{at}."""
    return Verifier(KeyRecords(txt.answer, at or clock()), run)


def verify(message: bytes, records, run=blocking) -> list:
    return result_of(verifier(FakeTXT(records), run).verify(message))


# -- signing -------------------------------------------------------------------------


def test_signs_once_per_algorithm_and_both_verify_at_dkimpy(signer, dkim_keys):
    signed = b"".join(signer.sign([MESSAGE]))
    parsed = dkim.DKIM(signed)
    assert signed.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in signed and b"a=ed25519-sha256" in signed
    assert b"s=pm1-rsa;" in signed and b"s=pm1-ed25519;" in signed
    assert parsed.verify(0, dnsfunc=dnsfunc(dkim_keys[1]))
    assert parsed.verify(1, dnsfunc=dnsfunc(dkim_keys[1]))
    assert signed.endswith(MESSAGE)


def test_signature_is_relaxed_and_dated_by_the_clock(signer):
    signed = b"".join(signer.sign([MESSAGE]))
    assert b"c=relaxed/relaxed" in signed
    assert f"t={NOW};".encode() in signed


def test_survives_refolding_on_the_way(signer, dkim_keys):
    """Relaxed/relaxed: a relay that refolds the header leaves it valid."""
    signed = b"".join(signer.sign([MESSAGE])).replace(b"Subject: lunch", b"Subject:  \r\n\tlunch")
    assert dkim.DKIM(signed).verify(0, dnsfunc=dnsfunc(dkim_keys[1]))


def test_oversigns_the_fields_a_forger_would_add(signer, dkim_keys):
    signed = b"".join(signer.sign([MESSAGE]))
    forged = signed.replace(b"Subject: lunch\r\n", b"Subject: lunch\r\nSubject: pay me\r\n")
    assert not dkim.DKIM(forged).verify(0, dnsfunc=dnsfunc(dkim_keys[1]))
    fields = signed_fields([(b"From", b""), (b"To", b""), (b"Received", b"")])
    assert fields.count(b"from") == 2 and fields.count(b"to") == 2
    assert fields.count(b"cc") == 1 and fields.count(b"mime-version") == 1
    assert b"received" not in fields and b"list-id" not in fields


def test_foreign_or_ambiguous_from_is_not_signed(signer):
    foreign = MESSAGE.replace(b"alice@example.org", b"alice@example.com")
    assert signer.sign([foreign]) == [foreign]
    lookalike = MESSAGE.replace(b"alice@example.org", b"alice@badexample.org")
    assert signer.sign([lookalike]) == [lookalike]
    two = MESSAGE.replace(b"<alice@example.org>", b"<alice@example.org>, eve@example.org")
    assert signer.sign([two]) == [two]


def test_arc_seal_over_our_verdicts(signer, dkim_keys, monkeypatch):
    """RFC 8617 i=1, verified by dkimpy; signed in OpenSSL, not by dkimpy's slow RSA."""
    results = b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=a@b.test\r\n"
    message = results + MESSAGE

    def slow_rsa(*args):
        raise AssertionError("dkimpy's pure-Python RSA: 10 ms in the reactor")

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", slow_rsa)
    arc = signer.seal(message, "example.org", results, "none")
    names = [line.split(b":", 1)[0] for line in arc]
    assert names == [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results"]
    assert b"cv=none" in arc[0]
    cv, _, _ = dkim.arc_verify(b"".join(arc) + message, dnsfunc=dnsfunc(dkim_keys[1]))
    assert cv == dkim.CV_Pass
    assert arc[2] == (b"ARC-Authentication-Results: i=1; mx.example.org; "
                      b"spf=pass smtp.mailfrom=a@b.test\r\n")
    assert signer.seal(message, "example.com", results, "none") == []


def test_a_message_dkimpy_cannot_parse_is_sent_unsigned_and_unsealed(signer, logged_events):
    junk = b"From: alice@example.org\r\n\x01bad line\r\n\r\nbody\r\n"
    assert signer.sign([junk]) == [junk]
    assert signer.seal(junk, "example.org", b"Authentication-Results: x; none\r\n", "none") == []
    assert [e["event"] for e in logged_events if e.get("event", "").endswith("failed")] == [
        "dkim-sign-failed", "arc-failed"]


def test_large_messages_are_signed_and_sealed_off_the_reactor_thread(dkim_keys):
    ran = []

    def run(function, *args):
        ran.append(function.__name__)
        return defer.succeed(function(*args))

    signer = Signer(dkim_keys[0], clock(), run)
    results = b"Authentication-Results: mx.example.org; none\r\n"
    big = MESSAGE + b"y" * 76 * 1000
    assert len(result_of(signer.signing([MESSAGE]))) == 3
    assert len(result_of(signer.sealing(results + MESSAGE, "example.org", results, "none"))) == 3
    assert ran == []
    assert len(result_of(signer.signing([big]))) == 3
    assert len(result_of(signer.sealing(results + big, "example.org", results, "none"))) == 3
    assert ran == ["sign", "seal"]


# -- verifying -----------------------------------------------------------------------


def test_both_signatures_pass(signer, dkim_keys):
    results = verify(b"".join(signer.sign([MESSAGE])), dkim_keys[1])
    assert [(r.result, r.domain, r.selector) for r in results] == [
        ("pass", "example.org", "pm1-rsa"), ("pass", "example.org", "pm1-ed25519")]
    assert all(len(r.signature) == 12 for r in results)


def test_unsigned_message_has_no_results_and_no_lookup():
    txt = FakeTXT({})
    assert result_of(verifier(txt).verify(MESSAGE)) == []
    assert txt.asked == []


def test_changed_body_fails(signer, dkim_keys):
    signed = b"".join(signer.sign([MESSAGE])).replace(b"Shall we?", b"Pay me.")
    assert {r.result for r in verify(signed, dkim_keys[1])} == {"fail"}


def signature(tags: bytes) -> bytes:
    return b"DKIM-Signature: " + tags + b"\r\n" + MESSAGE


@pytest.mark.parametrize("tags", [
    b"v=1; a=rsa-sha256; d=example.org; s=pm1-rsa",                       # no b=, bh=, h=
    b"v=1; a=rsa-sha256; d=example.org; s=pm1-rsa; h=from; bh=!!!; b=@@@",  # bad base64
    b"v=1; a=rsa-sha256; d=example.org; s=pm1-rsa; h=from; bh=AA==; b=AA==; x",  # bad tag list
    b"v=2; a=rsa-sha256; d=example.org; s=pm1-rsa; h=from; bh=AA==; b=AA==",  # version
    b"v=1; a=rot13; d=example.org; s=pm1-rsa; h=from; bh=AA==; b=AA==",     # algorithm
    b"v=1; a=rsa-sha256; d=example.org; s=pm1-rsa; h=subject; bh=AA==; b=AA==",  # From unsigned
    b"\xff\xfe; d=\x00",                                                   # junk bytes
])
def test_malformed_signature_is_permerror(dkim_keys, tags):
    [result] = verify(signature(tags), dkim_keys[1])
    assert result.result == "permerror"


def test_length_larger_than_the_body_is_permerror(dkim_keys, tmp_path):
    """RFC 6376 3.5 l=: longer than the body: the signature is invalid."""
    pem = next(k for k in dkim_keys[0]["example.org"] if k.pem).pem
    header = dkim.sign(MESSAGE, b"pm1-rsa", b"example.org", pem, length=True,
                       canonicalize=(b"relaxed", b"relaxed"))
    assert verify(header + MESSAGE, dkim_keys[1])[0].result == "pass"
    longer = header.replace(b"l=11;", b"l=500;")
    assert b"l=500;" in longer
    assert verify(longer + MESSAGE, dkim_keys[1])[0].result == "permerror"


def test_rsa_sha1_is_not_accepted(dkim_keys):
    pem = next(k for k in dkim_keys[0]["example.org"] if k.pem).pem
    header = dkim.sign(MESSAGE, b"pm1-rsa", b"example.org", pem,
                       signature_algorithm=b"rsa-sha1")
    assert verify(header + MESSAGE, dkim_keys[1])[0].result == "permerror"


def test_fifty_signatures_check_five(signer, dkim_keys):
    signed = b"".join(signer.sign([MESSAGE]))
    many = b"".join(signed.split(b"From:")[0] for _ in range(25)) + MESSAGE
    txt = FakeTXT(dkim_keys[1])
    results = result_of(verifier(txt).verify(many))
    assert len(results) == MAX_SIGNATURES
    assert {r.result for r in results} == {"pass"}
    assert sorted(txt.asked) == sorted(dkim_keys[1])      # each key name asked once


@pytest.mark.parametrize("record, expected", [
    (DNSPermanentError("nxdomain"), "permerror"),          # missing: no such name
    ([], "permerror"),                                     # missing: no TXT there
    ("v=DKIM1; k=rsa; p=", "permerror"),                   # revoked
    ("v=DKIM1; k=rsa; p=!!notbase64!!", "permerror"),      # garbled
    ("v=DKIM1; k=rsa p=AAAA", "permerror"),                # bad tag syntax
    ("v=DKIM2; k=rsa; p=AAAA", "permerror"),               # bad version
    ("v=DKIM1; k=dsa; p=AAAA", "permerror"),               # unknown key type
    (DNSTemporaryError("timeout"), "temperror"),           # DNS timed out
])
def test_key_record_problems(signer, dkim_keys, record, expected):
    records = dict(dkim_keys[1])
    records["pm1-rsa._domainkey.example.org"] = record
    results = verify(b"".join(signer.sign([MESSAGE])), records)
    assert [r.result for r in results] == [expected, "pass"]


def test_rsa_key_under_1024_bits_fails(dkim_keys):
    """RFC 8301 3.2."""
    pem = (Path(__file__).parent / "data" / "rsa512.pem").read_bytes()
    header = dkim.sign(MESSAGE, b"weak", b"example.org", pem,
                       canonicalize=(b"relaxed", b"relaxed"))
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_private_key(pem, None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    records = {"weak._domainkey.example.org":
               "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()}
    [result] = verify(header + MESSAGE, records)
    assert result.result == "fail"
    assert "too small" in result.reason


def test_dns_that_stops_answering_holds_only_this_message(signer, dkim_keys):
    """The first key answers, the second hangs: no result until it times out."""
    records = dict(dkim_keys[1])
    records["pm1-ed25519._domainkey.example.org"] = "hang"
    txt = FakeTXT(records)
    d = verifier(txt).verify(b"".join(signer.sign([MESSAGE])))
    assert_no_result(d)
    txt.waiting["pm1-ed25519._domainkey.example.org"].errback(DNSTemporaryError("timeout"))
    assert [r.result for r in result_of(d)] == ["pass", "temperror"]


def test_large_messages_are_checked_off_the_reactor_thread(signer, dkim_keys):
    big = MESSAGE + b"x" * 70 + b"\r\n" * 1 + (b"y" * 76 + b"\r\n") * 5000
    ran = []

    def run(function, *args):
        ran.append(function.__name__)
        return defer.succeed(function(*args))

    results = verify(b"".join(signer.sign([big])), dkim_keys[1], run)
    assert [r.result for r in results] == ["pass", "pass"]
    assert ran == ["_prepare", "_check_all"]




# -- the cost of a check: what is parsed and canonicalised, and how ------------------


def test_only_the_signed_fields_are_canonicalised(signer, dkim_keys, monkeypatch):
    """Forty Received fields that no h= names cost nothing; shared fields once."""
    signed = b"".join(signer.sign([MESSAGE]))
    trace = b"".join(b"Received: from relay%d.test by mx.test; Sat, 5 Dec 2026\r\n" % n
                     for n in range(40))
    canonicalised = []
    original = message_module.relaxed_field

    def counting(name, value):
        canonicalised.append(name.lower())
        return original(name, value)

    monkeypatch.setattr(message_module, "relaxed_field", counting)
    results = verify(trace + signed, dkim_keys[1])
    assert [r.result for r in results] == ["pass", "pass"]
    assert b"received" not in canonicalised
    # From, To, Subject, Date, Message-ID once; each signature field once.
    assert sorted(canonicalised) == sorted(
        [b"from", b"to", b"subject", b"date", b"message-id"] + [b"dkim-signature"] * 2)


def test_parsed_message_is_dkimpys_parse():
    """CRLF throughout: the header parsed alone; a bare LF: dkimpy's whole parse."""
    for message in (MESSAGE, MESSAGE.replace(b"Shall we?\r\n", b"Shall\nwe?\n"),
                    b"\r\nbody only\r\n", b"From: a@b.test\r\n", b"From: a@b.test",
                    b"From a@b.test Sat Dec 5\r\nFrom: a@b.test\r\n\r\nx\r\n\r\n"):
        parsed = ParsedMessage(message)
        headers, body = dkim.rfc822_parse(message)
        assert (parsed.headers, parsed.body) == (headers, body), message


def test_b_tag_emptied_as_dkimpy_empties_it():
    """Our faster pattern for RFC 6376 3.7's empty b= agrees with dkimpy's RE_BTAG."""
    pieces = [b" ", b"\t", b"\r\n", b"\n", b"\r", b"b", b"=", b";", b"A", b"/", b"+", b"h",
              b"bh", b"b=", b"; b=", b"x", b"-"]
    rnd = random.Random(8)
    for _ in range(20000):
        value = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(25)))
        assert message_module._BTAG.sub(b"\\1", value) == dkim.RE_BTAG.sub(b"\\1", value), value


@pytest.mark.parametrize("algorithm", [Relaxed, Simple])
def test_canonical_body_is_dkimpys(algorithm):
    """The relaxed shortcut (nothing for its regexes to change) gives dkimpy's body."""
    pieces = [b" ", b"  ", b"\t", b"\r\n", b"\r\n\r\n", b"x", b"yz", b"\n"]
    rnd = random.Random(6376)
    for _ in range(5000):
        body = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(12)))
        parsed = ParsedMessage(b"From: a@b.test\r\n\r\n" + body)
        assert parsed.canonical_body(algorithm) == algorithm.canonicalize_body(parsed.body), body


def test_header_parse_is_dkimpys():
    """parse_header (CRLF only) gives dkimpy's rfc822_parse fields, and fails where it fails."""
    pieces = [b"From: a@b.test\r\n", b"To:x\r\n", b" folded\r\n", b"\tmore\r\n", b"X-A:\r\n",
              b"From b@c Sat\r\n", b"bad line\r\n", b"Sub ject: y\r\n", b"a:b:c\r\n", b"\r\n",
              b"\x7f: z\r\n", b"K:  v  \r\n", b"DKIM-Signature: v=1; b=AA\r\n"]
    rnd = random.Random(5322)
    for _ in range(5000):
        header = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(8))) + b"\r\n"
        same_as_dkimpy(message_module.parse_header, lambda h: dkim.rfc822_parse(h)[0], header)


def same_as_dkimpy(ours, theirs, value) -> None:
    """C{ours}(value) is what C{theirs}(value) is, or raises what it raises."""
    try:
        expected = theirs(value)
    except Exception as e:
        with pytest.raises(type(e)):
            ours(value)
    else:
        assert ours(value) == expected, value


def test_relaxed_field_is_dkimpys():
    pieces = [b" ", b"  ", b"\t", b"\r\n", b"\r\n ", b"\r\n\t", b"x", b"Yz", b";", b"\x0b",
              b"\r", b"\n", b"\x0c"]
    rnd = random.Random(6376)
    for _ in range(5000):
        name = rnd.choice([b"Subject", b"FROM ", b"x-y"])
        value = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(10))) + b"\r\n"
        assert message_module.relaxed_field(name, value) == \
            Relaxed.canonicalize_headers([(name, value)])[0], value


def test_tag_list_is_dkimpys():
    pieces = [b"a", b"bh", b"=", b";", b" ", b"\t", b"1", b"x=y", b"_", b"-", b"9", b"A=", b";;"]
    rnd = random.Random(3)
    for _ in range(5000):
        value = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(10)))
        same_as_dkimpy(message_module.tag_list, dkim.util.parse_tag_value, value)


def test_signature_tag_checks_are_dkimpys():
    """check_tags refuses what dkimpy's validate_signature_fields refuses, and only that."""
    now = int(time.time())
    verdicts = set()
    choices = {
        b"v": [b"1", b"2"], b"a": [b"rsa-sha256", b"ed25519-sha256", b"rsa-sha1", b"rot13"],
        b"b": [b"AAAA", b"AA A=", b"A", b"!!", b"AAAA==="], b"bh": [b"AAAA", b"AAA", b"AA=="],
        b"d": [b"example.org", b"ex(ample", "exämple".encode()], b"h": [b"from"],
        b"s": [b"pm1"], b"i": [b"@example.org", b"a@sub.example.org", b"a@example.com",
                               b"example.org", b"xexample.org"],
        b"l": [b"10", b"x", b"1" * 80], b"q": [b"dns/txt", b"dns"], b"cv": [b"pass", b"maybe"],
        b"t": [str(now).encode(), str(now + 50000).encode(), b"12a"],
        b"x": [str(now + 10).encode(), str(now - 50000).encode(), b"0", b"z"],
    }
    rnd = random.Random(8301)
    for _ in range(5000):
        # Mostly the first (valid) value, so that both verdicts come often.
        sig = {name: values[0] if rnd.random() < 0.7 else rnd.choice(values)
               for name, values in choices.items()
               if rnd.random() < (0.95 if name in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
                                  else 0.3)}
        try:
            dkim.validate_signature_fields(dict(sig))
            accepted = True
        except Exception:
            accepted = False
        try:
            check_tags(dict(sig))
            ours = True
        except Exception:
            ours = False
        assert ours == accepted, sig
        verdicts.add(accepted)
    assert verdicts == {True, False}


def _fields_line_by_line(message: bytes) -> list:
    """header_fields as it read the header before, a line at a time: the oracle."""
    fields = []
    end_of_header = message_module.header_end(message)
    position = 0
    while position < end_of_header:
        line_end = message.find(b"\r\n", position, end_of_header)
        if line_end < 0 or line_end == position:
            break
        match = re.compile(rb"([!-9;-~]+)[ \t]*:").match(message, position, line_end)
        if match is None:
            break
        end = line_end + 2
        while end < end_of_header and message[end:end + 1] in (b" ", b"\t"):
            next_end = message.find(b"\r\n", end, end_of_header)
            end = end_of_header if next_end < 0 else next_end + 2
        value = message[match.end():end].replace(b"\r\n", b"").strip()
        fields.append((match.group(1).lower(), value, position, end))
        position = end
    return fields


def test_header_fields_read_whole_fields_as_lines_did():
    pieces = [b"From: a\r\n", b" x\r\n", b"\tY\r\n", b"bad\r\n", b"\r\n", b"A:b", b" c", b"\r",
              b"\n", b"K :v\r\n", b"x:\r\n \r\n", b"To:\t<b@c>\r\n", b"\r\n\r\nbody"]
    rnd = random.Random(2822)
    for _ in range(20000):
        message = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(9)))
        assert message_module.header_fields(message) == _fields_line_by_line(message), message
