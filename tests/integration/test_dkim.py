"""
Signing and verifying end to end (SPEC 11.1, issue 13): real nodes, a DNS
server holding the DKIM key and DMARC records, and OpenDKIM as the outside
verifier and signer.

    signer.test    127.0.0.80  mx.signer.test    alice, dave (keys by dkim-keygen)
    verifier.test  127.0.0.81  mx.verifier.test  bob; fwd@ -> dave@signer.test
    127.0.0.82     a client outside every SPF record (spoofs the DMARC domains)
    127.0.0.83     the client SPF authorises for odkim.test and none.test (and
                   the verifier, forwarding, for none.test)

OpenDKIM: ``opendkim -t`` (the filter's test mode: real libopendkim) with
``TestPublicKeys`` verifies our mail and, in sign mode, signs with
rsa-sha256 and ed25519-sha256.  ``opendkim-testmsg`` signs with rsa-sha1
only (it has no algorithm option), which RFC 8301 forbids: pullmail says
``permerror`` to it.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import dkim
import pytest

from .harness import DNSServer, NodeFactory, free_port, smtp, submit, wait_until

SIGNER_IP, VERIFIER_IP, STRANGER, FRIEND = "127.0.0.80", "127.0.0.81", "127.0.0.82", "127.0.0.83"
ALICE, DAVE, BOB = "alice@signer.test", "dave@signer.test", "bob@verifier.test"
PASSWORD = "pw-" + "d" * 10

RECORDS = {
    "signer.test": {"A": [SIGNER_IP], "MX": [[10, "mx.signer.test"]],
                    "TXT": [f"v=spf1 ip4:{SIGNER_IP} -all"]},
    "mx.signer.test": {"A": [SIGNER_IP]},
    "_dmarc.signer.test": {"TXT": ["v=DMARC1; p=reject"]},
    "verifier.test": {"A": [VERIFIER_IP], "MX": [[10, "mx.verifier.test"]],
                      "TXT": [f"v=spf1 ip4:{VERIFIER_IP} -all"]},
    "mx.verifier.test": {"A": [VERIFIER_IP]},
    "_dmarc.verifier.test": {"TXT": ["v=DMARC1; p=reject"]},
    "reject.test": {"TXT": [f"v=spf1 ip4:{FRIEND} -all"]},
    "_dmarc.reject.test": {"TXT": ["v=DMARC1; p=reject"]},
    "quarantine.test": {"TXT": [f"v=spf1 ip4:{FRIEND} -all"]},
    "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    # The verifier forwards none.test's mail (GDEL asks SPF about the sender).
    "none.test": {"TXT": [f"v=spf1 ip4:{FRIEND} ip4:{VERIFIER_IP} -all"]},
    "_dmarc.none.test": {"TXT": ["v=DMARC1; p=none"]},
    "loop._domainkey.none.test": {"CNAME": ["loop._domainkey.none.test"]},
    "odkim.test": {"TXT": [f"v=spf1 ip4:{FRIEND} -all"]},
    "_dmarc.odkim.test": {"TXT": ["v=DMARC1; p=reject"]},
}
FAST = {"retrieval": {"schedule": ["0s", "2s", "4s"]},
        "delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "3s"}}


def zone_records(text: str) -> dict:
    """``name. IN TXT "a" "b"`` lines -> the DNS server's {name: {"TXT": [value]}}."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r'(\S+)\. IN TXT ((?:"[^"]{1,255}" ?)+)', line)
        assert match, line
        found[match.group(1)] = {"TXT": ["".join(re.findall(r'"([^"]*)"', match.group(2)))]}
    return found


class World:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dns = DNSServer(workdir / "dns", RECORDS, free_port("127.0.0.1"))
        self.dns.start()
        self.factory = NodeFactory(workdir / "nodes")
        self.signer = self.factory.for_domain("signer", SIGNER_IP, "signer.test", [ALICE, DAVE],
                                              PASSWORD, FAST, self.dns, start=False)
        self.verifier = self.factory.for_domain(
            "verifier", VERIFIER_IP, "verifier.test", [BOB], PASSWORD, FAST, self.dns,
            settings={"dkim": {"generate": False}}, start=False)
        self.verifier.write_aliases(f"fwd@verifier.test: {DAVE}\n")
        self.keys: dict = {}
        for node in (self.signer, self.verifier):
            self.keys.update(zone_records(node.cli("dkim-keygen").stdout.decode()))
        records = dict(RECORDS)
        records.update(self.keys)
        self.dns.update(records)
        self.records = records
        self.signer.start()
        self.verifier.start()

    def close(self) -> None:
        self.factory.close()
        self.dns.stop()

    def txt(self, name: str) -> str:
        return self.records[name]["TXT"][0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with contextlib.closing(World(tmp_path_factory.mktemp("dkim"))) as w:
        yield w


def letter(sender: str, token: str, to: str = BOB) -> bytes:
    return (f"From: Someone <{sender}>\r\nTo: {to}\r\nSubject: {token}\r\n"
            f"Date: Sat, 05 Dec 2026 04:00:00 +0000\r\nMessage-ID: <{token}@x.test>\r\n"
            f"\r\nbody of {token}\r\n").encode()


def push(source: str, sender: str, message: bytes, to: str = BOB) -> None:
    with smtp(VERIFIER_IP, source=source, local_hostname="client.test") as client:
        client.sendmail(sender, [to], message)


def delivered(node, address: str, token: str, folder: str = "", timeout: float = 15) -> bytes:
    box = node.maildir(address) / folder / "new" if folder else node.maildir(address) / "new"

    def find():
        for path in box.glob("*") if box.is_dir() else ():
            data = path.read_bytes()
            if token.encode() in data:
                return data
        return None

    return wait_until(find, timeout, message=f"{token} in {box}")


def results_of(message: bytes, authserv_id: str = "mx.verifier.test") -> str:
    """
    The one Authentication-Results field at the top, unfolded: under only
    the Return-Path and Delivered-To that local delivery writes above
    everything (as Postfix's virtual(8) does).
    """
    local = re.match(rb"Return-Path: <[^>\r\n]*>\r\nDelivered-To: [^\r\n]+\r\n", message)
    assert local, message[:200]
    message = message[local.end():]
    assert message.startswith(b"Authentication-Results: " + authserv_id.encode() + b";")
    assert message.count(b"Authentication-Results: " + authserv_id.encode()) == 1
    field = re.match(rb"Authentication-Results:(.*?\r\n)(?![ \t])", message, re.S).group(1)
    return re.sub(r"\s+", " ", field.decode())


def dnsfunc(world):
    return lambda name, timeout=5: world.txt(name.decode().rstrip(".")).encode()


# -- OpenDKIM --------------------------------------------------------------------------

OPENDKIM = shutil.which("opendkim") or (Path("/usr/sbin/opendkim").exists()
                                        and "/usr/sbin/opendkim")
needs_opendkim = pytest.mark.skipif(
    not OPENDKIM, reason="!!! OpenDKIM (Debian opendkim, opendkim-tools) not installed: "
                         "the interop tests are SKIPPED; run tests/run as root !!!")


def opendkim(workdir: Path, config: str, message: bytes) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "od.conf").write_text(config + "Syslog no\nRequireSafeKeys false\n")
    (workdir / "msg.eml").write_bytes(message.replace(b"\r\n", b"\n"))
    result = subprocess.run([OPENDKIM, "-vvv", "-x", str(workdir / "od.conf"), "-t",
                             str(workdir / "msg.eml")], capture_output=True, timeout=30)
    return (result.stdout + result.stderr).decode("utf-8", "replace")


@needs_opendkim
def test_pulled_submission_verifies_here_at_dkimpy_and_at_opendkim(world, tmp_path):
    token = "pull-" + secrets.token_hex(4)
    assert submit(world.signer, ALICE, PASSWORD, [BOB], letter(ALICE, token)) == {}
    message = delivered(world.verifier, BOB, token)
    verdicts = results_of(message)
    assert "spf=pass smtp.mailfrom=alice@signer.test" in verdicts
    assert verdicts.count("dkim=pass header.d=signer.test") == 2
    assert "header.s=pm1-rsa" in verdicts and "header.s=pm1-ed25519" in verdicts
    assert "dmarc=pass (p=reject dis=none) header.from=signer.test" in verdicts
    world.verifier.wait_log(r"RETR \S+ at 127\.0\.0\.80: 250", 5)   # it came by RETR

    parsed = dkim.DKIM(message)
    assert parsed.verify(0, dnsfunc=dnsfunc(world)) and parsed.verify(1, dnsfunc=dnsfunc(world))

    keys = "".join(f"{name} {world.txt(name)}\n" for name in world.keys)
    (tmp_path / "keys").write_text(keys)
    report = opendkim(tmp_path, f"Mode v\nTestPublicKeys {tmp_path / 'keys'}\n", message)
    assert re.search(r"dkim=pass \(2048-bit key\) header\.d=signer\.test .*"
                     r"header\.a=rsa-sha256 header\.s=pm1-rsa", report), report
    assert re.search(r"dkim=pass header\.d=signer\.test .*header\.a=ed25519-sha256 "
                     r"header\.s=pm1-ed25519", report), report


@needs_opendkim
@pytest.mark.parametrize("algorithm, key", [("rsa-sha256", "pm1-rsa"),
                                            ("ed25519-sha256", "pm1-ed25519")])
def test_mail_opendkim_signs_passes_here(world, tmp_path, algorithm, key):
    """OpenDKIM signs for odkim.test with a key of ours, published as ext-…."""
    pem = world.signer.dir / "dkim" / f"signer.test.{key}.pem"
    selector = f"ext-{algorithm.partition('-')[0]}"
    records = dict(world.records)
    records[f"{selector}._domainkey.odkim.test"] = world.records[f"{key}._domainkey.signer.test"]
    world.dns.update(records)
    world.records = records
    token = "odkim-" + secrets.token_hex(4)
    plain = letter("carol@odkim.test", token)
    report = opendkim(tmp_path, (
        f"Mode s\nDomain odkim.test\nSelector {selector}\nKeyFile {pem}\n"
        f"SignatureAlgorithm {algorithm}\nCanonicalization relaxed/relaxed\n"
        "InternalHosts 0.0.0.0/0\n"), plain)
    # -vvv shows the field the filter would insert.
    signature = re.search(r"hname='DKIM-Signature' hvalue='(.*?)'\n", report, re.S)
    assert signature, report
    signed = ("DKIM-Signature: " + signature.group(1) + "\r\n").replace(
        "\r\n", "\n").replace("\n", "\r\n").encode() + plain
    push(FRIEND, "carol@odkim.test", signed)
    verdicts = results_of(delivered(world.verifier, BOB, token))
    assert f"dkim=pass header.d=odkim.test header.s={selector}" in verdicts
    assert "dmarc=pass" in verdicts


@pytest.mark.skipif(not shutil.which("opendkim-testmsg"), reason="!!! opendkim-tools missing !!!")
def test_opendkim_testmsg_signs_rsa_sha1_which_rfc_8301_refuses(world):
    token = "sha1-" + secrets.token_hex(4)
    plain = letter("carol@none.test", token)
    pem = world.signer.dir / "dkim" / "signer.test.pm1-rsa.pem"
    signed = subprocess.run(["opendkim-testmsg", "-C", "-d", "none.test", "-k", str(pem),
                             "-s", "sha1"], input=plain, capture_output=True, check=True,
                            timeout=30).stdout
    assert b"a=rsa-sha1" in signed
    records = dict(world.records)
    records["sha1._domainkey.none.test"] = world.records["pm1-rsa._domainkey.signer.test"]
    world.dns.update(records)
    world.records = records
    push(FRIEND, "carol@none.test", signed.replace(b"\r\r\n", b"\r\n"))
    assert "dkim=permerror (rsa-sha1 is not accepted" in results_of(
        delivered(world.verifier, BOB, token))


# -- DMARC enforcement (SPEC 11.1) --------------------------------------------------------


def test_p_reject_gets_550_after_data_and_nothing_is_stored(world):
    token = "reject-" + secrets.token_hex(4)
    before = world.verifier.mail_snapshot()
    with pytest.raises(smtplib.SMTPDataError) as caught:
        push(STRANGER, "ceo@reject.test", letter("ceo@reject.test", token))
    assert caught.value.smtp_code == 550
    assert caught.value.smtp_error.startswith(b"5.7.1 ")
    assert b"DMARC policy of reject.test" in caught.value.smtp_error
    time.sleep(0.5)
    assert world.verifier.mail_snapshot().new_since(before) == {}


def test_several_from_fields_get_550_after_data_and_nothing_is_stored(world):
    """RFC 7489 6.6.1: the reader sees one From, a checker might judge the other."""
    token = "twofrom-" + secrets.token_hex(4)
    before = world.verifier.mail_snapshot()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        push(FRIEND, "ceo@none.test",
             b"From: ceo@none.test\r\n" + letter("boss@signer.test", token))
    assert refused.value.smtp_code == 550
    assert b"5.7.1 Rejected by the DMARC check: 2 From fields" in refused.value.smtp_error
    time.sleep(0.5)
    assert world.verifier.mail_snapshot().new_since(before) == {}


def test_p_quarantine_goes_to_junk(world):
    token = "junk-" + secrets.token_hex(4)
    push(STRANGER, "ceo@quarantine.test", letter("ceo@quarantine.test", token))
    verdicts = results_of(delivered(world.verifier, BOB, token, folder=".Junk"))
    assert "spf=fail" in verdicts
    assert "dmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.test" in verdicts


def test_p_none_delivers_with_the_header_and_forgeries_removed(world):
    token = "none-" + secrets.token_hex(4)
    forged = (b"Authentication-Results: mx.verifier.test; dkim=pass header.d=bank.test\r\n"
              b"Authentication-Results: elsewhere.test; spf=pass\r\n")
    push(STRANGER, "ceo@none.test", forged + letter("ceo@none.test", token))
    message = delivered(world.verifier, BOB, token)
    verdicts = results_of(message)
    assert "dmarc=fail (p=none dis=none) header.from=none.test" in verdicts
    assert b"bank.test" not in message and b"elsewhere.test; spf=pass" in message


def test_cname_loop_at_the_key_name_gives_a_result(world):
    token = "loop-" + secrets.token_hex(4)
    fake = (b"DKIM-Signature: v=1; a=rsa-sha256; d=none.test; s=loop; c=relaxed/relaxed;"
            b" h=from; bh=AAAA; b=AAAA\r\n")
    push(FRIEND, "ceo@none.test", fake + letter("ceo@none.test", token))
    verdicts = results_of(delivered(world.verifier, BOB, token))
    assert re.search(r"dkim=(temperror|permerror) .*header\.s=loop", verdicts), verdicts
    assert "spf=pass" in verdicts


def test_submission_gets_auth_pass(world):
    token = "sub-" + secrets.token_hex(4)
    assert submit(world.verifier, BOB, PASSWORD, [BOB], letter(BOB, token)) == {}
    verdicts = results_of(delivered(world.verifier, BOB, token))
    assert verdicts.strip() == "mx.verifier.test; auth=pass smtp.auth=bob@verifier.test"


def test_alias_forward_is_sealed_with_arc_and_the_chain_verifies_at_the_next_node(world):
    """
    The verifier seals the forward (RFC 8617 i=1, cv=none); the signer node,
    retrieving it, validates the chain through its own resolver: arc=pass.
    """
    token = "fwd-" + secrets.token_hex(4)
    push(FRIEND, "ceo@none.test", letter("ceo@none.test", token, to="fwd@verifier.test"),
         to="fwd@verifier.test")
    message = delivered(world.signer, DAVE, token, timeout=20)
    assert "arc=pass (i=1 d=verifier.test)" in results_of(message, "mx.signer.test")
    assert b"ARC-Seal: i=1; cv=none;" in message
    cv, results, reason = dkim.arc_verify(message, dnsfunc=dnsfunc(world))
    assert cv == dkim.CV_Pass, (reason, results)
    assert b"ARC-Authentication-Results: i=1; mx.verifier.test;" in message
    assert re.search(rb"spf=pass smtp.mailfrom=ceo@none.test", message)


def test_a_tampered_arc_chain_is_arc_fail(world):
    """A sealed message changed on the way: the verifier says arc=fail, and delivers."""
    token = "arc-" + secrets.token_hex(4)
    upstream = b"Authentication-Results: mx.signer.test; spf=pass smtp.mailfrom=x@none.test\r\n"
    original = upstream + letter("ceo@none.test", token)
    key = next(world.signer.dir.rglob("signer.test.*-rsa.pem"))
    selector = key.name.split(".")[-2]
    arc = dkim.arc_sign(original, selector.encode(), b"signer.test", key.read_bytes(),
                        b"mx.signer.test")
    push(FRIEND, "ceo@none.test", b"".join(arc) + original.replace(b"body of", b"changed"))
    verdicts = results_of(delivered(world.verifier, BOB, token))
    assert "arc=fail (i=1 d=signer.test Most recent ARC-Message-Signature did not validate)" \
        in verdicts, verdicts


def test_report_mode_only_writes_the_header(world):
    world.verifier.configure({"trust": {"dmarc": "report"}})
    world.verifier.restart()
    try:
        token = "report-" + secrets.token_hex(4)
        push(STRANGER, "ceo@reject.test", letter("ceo@reject.test", token))
        verdicts = results_of(delivered(world.verifier, BOB, token))
        assert "dmarc=fail (p=reject dis=reject) header.from=reject.test" in verdicts
    finally:
        world.verifier.configure({"trust": {"dmarc": "enforce"}})
        world.verifier.restart()
