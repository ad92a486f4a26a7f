"""
Submission and TLS end to end (SPEC 8, README "Sending mail: submission",
"TLS"): real nodes, raw sockets, a CA of our own.

    example.test     127.0.5.2   mx.example.test     alice, bob (submission)
    sender.test      127.0.5.20  mx.sender.test      carol ([delivery] tls = verify)
    receiver.test    127.0.5.21  mx.receiver.test    dave  (cert from our CA)
    wrongname.test   127.0.5.22  mx.wrongname.test   erin  (CA cert for wrong.example)
    selfsigned.test  127.0.5.23  mx.selfsigned.test  frank (self-signed cert)

Clients bind to their own sources in 127.0.5.10 .. 127.0.5.19 so that the
AUTH throttle of one test cannot leak into another.  Every address used
here is in 127.0.5.1 .. 127.0.5.40.
"""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import email.utils
import json
import os
import re
import secrets
import smtplib
import socket
import ssl
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from .certs import CertificateAuthority
from .certs import pem_key as _pem_key
from .certs import x509_name as _name
from .harness import (
    SMTP_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    DNSServer,
    Node,
    RawSMTP,
    free_port,
    merge_settings,
    wait_until,
)

DNS_IP = "127.0.5.1"
NODE_IP = "127.0.5.2"
SENDER_IP = "127.0.5.20"
RECEIVER_IP = "127.0.5.21"
WRONG_IP = "127.0.5.22"
SELF_IP = "127.0.5.23"

# Client sources, one per concern.
SRC_BASIC = "127.0.5.10"
SRC_GUESSER = "127.0.5.11"
SRC_BYSTANDER = "127.0.5.12"
SRC_INJECT = "127.0.5.13"
SRC_TLS = "127.0.5.14"
SRC_SUBMIT = "127.0.5.15"

HOSTNAME = "mx.example.test"
ALICE = "alice@example.test"
BOB = "bob@example.test"
CAROL = "carol@sender.test"
DAVE = "dave@receiver.test"
ERIN = "erin@wrongname.test"
FRANK = "frank@selfsigned.test"
PASSWORD = "pw-" + "s" * 10
BOB_PASSWORD = "pw-" + "b" * 10


def _spf(ip):
    return f"v=spf1 ip4:{ip} -all"


RECORDS = {
    "example.test": {"A": [NODE_IP], "MX": [[10, "mx.example.test"]], "TXT": [_spf(NODE_IP)]},
    "mx.example.test": {"A": [NODE_IP]},
    "sender.test": {"A": [SENDER_IP], "MX": [[10, "mx.sender.test"]],
                    "TXT": [_spf(SENDER_IP)]},
    "mx.sender.test": {"A": [SENDER_IP]},
    "receiver.test": {"A": [RECEIVER_IP], "MX": [[10, "mx.receiver.test"]],
                      "TXT": [_spf(RECEIVER_IP)]},
    "mx.receiver.test": {"A": [RECEIVER_IP]},
    "wrongname.test": {"A": [WRONG_IP], "MX": [[10, "mx.wrongname.test"]],
                       "TXT": [_spf(WRONG_IP)]},
    "mx.wrongname.test": {"A": [WRONG_IP]},
    "selfsigned.test": {"A": [SELF_IP], "MX": [[10, "mx.selfsigned.test"]],
                        "TXT": [_spf(SELF_IP)]},
    "mx.selfsigned.test": {"A": [SELF_IP]},
}

FAST = {
    "retrieval": {"schedule": ["0s", "2s", "4s"]},
    "delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "3s"},
    "limits": {"auth_tarpit_max": "2s", "auth_fail_limit": 3, "auth_fail_window": "1h",
               "auth_block": "30s", "idle_timeout": "30s"},
}




def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def unverified() -> ssl.SSLContext:
    return ssl._create_unverified_context()


def keywords(texts: list[str]) -> set[str]:
    """EHLO reply lines after the first, upper-cased."""
    return {t.upper() for t in texts[1:]}


def has_keyword(texts: list[str], word: str) -> bool:
    return any(t.split(" ", 1)[0] == word for t in keywords(texts))


def auth_line(texts: list[str]) -> str | None:
    for t in keywords(texts):
        if t.split(" ", 1)[0] == "AUTH":
            return t
    return None


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    server = DNSServer(tmp_path_factory.mktemp("sub-dns"), RECORDS, free_port(DNS_IP),
                       address=DNS_IP)
    with server:
        yield server


def common(dns: DNSServer) -> dict:
    return {"dns": {"nameservers": [dns.nameserver], "timeout": "2s"}}


@pytest.fixture(scope="module")
def node(tmp_path_factory, dns):
    """The submission node: generates its own certificate at first start."""
    n = Node(tmp_path_factory.mktemp("sub-node"), "sub", NODE_IP, ["example.test"], HOSTNAME,
             users={ALICE: PASSWORD, BOB: BOB_PASSWORD},
             aliases="sales@example.test: alice@example.test\n",
             settings=merge_settings(FAST, common(dns)))
    assert not (n.dir / "var" / "tls" / "cert.pem").exists()
    with n:
        yield n


def connect(port: int, source: str, address: str = NODE_IP, timeout: float = 10.0) -> RawSMTP:
    client = RawSMTP(address, port, timeout=timeout, source=source)
    assert client.greeting[0] == 220, client.greeting
    return client


def tls_session(port: int, source: str) -> RawSMTP:
    """Connected, EHLO, STARTTLS, EHLO again."""
    client = connect(port, source)
    client.ehlo()
    code, texts = client.starttls()
    assert code == 220, (code, texts)
    return client


def implicit(source: str, context: ssl.SSLContext | None = None,
             server_hostname: str | None = None) -> RawSMTP:
    """A connection to the submissions port, in TLS from the first byte."""
    client = RawSMTP(NODE_IP, SUBMISSIONS_PORT, timeout=10, source=source, greeting=False)
    client.sock = (context or unverified()).wrap_socket(client.sock,
                                                        server_hostname=server_hostname)
    client.greeting = client.read_reply()
    return client


# -- 1. submission: TLS, then AUTH, then an owned sender --------------------------


def test_submission_requires_tls_then_auth(node):
    with connect(SUBMISSION_PORT, SRC_BASIC) as c:
        code, texts = c.ehlo()
        assert has_keyword(texts, "STARTTLS"), texts
        assert auth_line(texts) is None, texts
        # GDEL/RETR belong to the MX service only (SPEC 1).
        assert not has_keyword(texts, "GDEL") and not has_keyword(texts, "RETR"), texts
        code, texts = c.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert (code, texts[0][:5]) == (530, "5.7.0"), (code, texts)
        code, texts = c.command("AUTH LOGIN")
        assert (code, texts[0][:5]) == (530, "5.7.0"), (code, texts)
        code, texts = c.command(f"MAIL FROM:<{ALICE}>")
        assert (code, texts[0][:5]) == (530, "5.7.0"), (code, texts)

        code, texts = c.starttls()
        assert code == 220, (code, texts)
        code, texts = c.ehlo()
        assert not has_keyword(texts, "STARTTLS"), texts
        mechanisms = set((auth_line(texts) or "").split()[1:])
        assert {"PLAIN", "LOGIN"} <= mechanisms, texts

        code, texts = c.command(f"MAIL FROM:<{ALICE}>")
        assert (code, texts[0][:5]) == (530, "5.7.0"), (code, texts)

        code, texts = c.command("AUTH PLAIN %%%not-base64%%%")
        assert (code, texts[0][:5]) == (501, "5.5.2"), (code, texts)

        # LOGIN cancelled with "*", at the user name and at the password.
        code, texts = c.command("AUTH LOGIN")
        assert code == 334 and base64.b64decode(texts[0]) == b"Username:", (code, texts)
        c.expect("*", 501)
        c.expect("AUTH LOGIN", 334)
        code, texts = c.command(b64(ALICE))
        assert code == 334 and base64.b64decode(texts[0]) == b"Password:", (code, texts)
        c.expect("*", 501)
        # Still usable, still unauthenticated.
        c.expect("NOOP", 250)
        c.expect(f"MAIL FROM:<{ALICE}>", 530)

        # An authorisation identity other than the user: refused.
        code, texts = c.command(f"AUTH PLAIN {plain(ALICE, PASSWORD, authzid=BOB)}")
        assert (code, texts[0][:5]) == (535, "5.7.8"), (code, texts)

        # PLAIN without an initial response, then the right credentials.
        c.expect("AUTH PLAIN", 334)
        code, texts = c.command(plain(ALICE, PASSWORD))
        assert (code, texts[0][:5]) == (235, "2.7.0"), (code, texts)
        c.expect(f"AUTH PLAIN {plain(ALICE, PASSWORD)}", 503)

        code, texts = c.command(f"MAIL FROM:<{BOB}>")
        assert (code, texts[0][:5]) == (553, "5.7.1"), (code, texts)
        assert "not owned" in texts[0], texts
        code, texts = c.command("MAIL FROM:<mallory@outside.test>")
        assert (code, texts[0][:5]) == (553, "5.7.1"), (code, texts)
        c.expect("MAIL FROM:<sales@example.test>", 250)
        c.expect("RSET", 250)
        c.expect(f"MAIL FROM:<{ALICE}>", 250)
        c.command("QUIT")

    # LOGIN, the whole exchange, and PLAIN with authzid = user, as bob.
    with tls_session(SUBMISSION_PORT, SRC_BASIC) as c:
        c.ehlo()
        c.expect("AUTH LOGIN", 334)
        c.expect(b64(BOB), 334)
        code, texts = c.command(b64(BOB_PASSWORD))
        assert (code, texts[0][:5]) == (235, "2.7.0"), (code, texts)
        code, texts = c.command("MAIL FROM:<sales@example.test>")
        assert (code, texts[0][:5]) == (553, "5.7.1"), (code, texts)
        c.expect(f"MAIL FROM:<{BOB}>", 250)
    with tls_session(SUBMISSION_PORT, SRC_BASIC) as c:
        c.ehlo()
        code, texts = c.command(f"AUTH PLAIN {plain(BOB, BOB_PASSWORD, authzid=BOB)}")
        assert (code, texts[0][:5]) == (235, "2.7.0"), (code, texts)


# -- 2. throttling of password guessers ----------------------------------------------


def test_wrong_passwords_are_tarpitted_then_blocked(node):
    with tls_session(SUBMISSION_PORT, SRC_GUESSER) as early, \
            tls_session(SUBMISSION_PORT, SRC_GUESSER) as c:
        early.ehlo()    # opened before the block: it must not keep guessing
        c.ehlo()
        times = []
        for attempt in range(3):
            started = time.monotonic()
            code, texts = c.command(f"AUTH PLAIN {plain(ALICE, f'wrong-{attempt}')}", timeout=15)
            times.append(time.monotonic() - started)
            expected = (535, "5.7.8") if attempt < 2 else (421, "4.7.0")
            assert (code, texts[0][:5]) == expected, (attempt, code, texts)
        c.expect_closed(5)   # the failure that blocks the address also ends the session
        # 1 s, then 2 s (auth_tarpit_max = 2s), then 2 s again.
        assert times[0] >= 0.8, times
        assert times[1] >= 1.6, times
        assert times[1] - times[0] >= 0.6, times
        assert times[2] >= 1.6, times
        node.wait_log(rf"blocking {re.escape(SRC_GUESSER)} for 30(\.0)?s after 3 failed AUTHs", 5)
        # Even the right password is refused on the connection opened earlier.
        code, texts = early.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert (code, texts[0][:5]) == (421, "4.7.0"), (code, texts)
        early.expect_closed(5)

    # The guesser is now refused at connect, on both submission services.
    with RawSMTP(NODE_IP, SUBMISSION_PORT, timeout=5, source=SRC_GUESSER) as c:
        assert (c.greeting[0], c.greeting[1][0][:5]) == (421, "4.7.0"), c.greeting
        c.expect_closed(5)
    with implicit(SRC_GUESSER) as c:
        assert (c.greeting[0], c.greeting[1][0][:5]) == (421, "4.7.0"), c.greeting
    # ... but the MX service still greets it,
    with connect(SMTP_PORT, SRC_GUESSER) as c:
        c.ehlo()
        assert c.command("QUIT")[0] == 221
    # ... and another address logs in at once, with no tarpit.
    with tls_session(SUBMISSION_PORT, SRC_BYSTANDER) as c:
        c.ehlo()
        started = time.monotonic()
        c.expect(f"AUTH PLAIN {plain(ALICE, PASSWORD)}", 235)
        assert time.monotonic() - started < 0.8


# -- 3. no AUTH on the MX service ------------------------------------------------------


def test_no_auth_on_the_mx_service(node):
    with connect(SMTP_PORT, SRC_BASIC) as c:
        code, texts = c.ehlo()
        assert auth_line(texts) is None, texts
        assert has_keyword(texts, "STARTTLS"), texts
        code, texts = c.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert (code, texts[0][:5]) == (502, "5.5.1"), (code, texts)
        assert c.starttls()[0] == 220
        code, texts = c.ehlo()
        assert auth_line(texts) is None, texts
        code, texts = c.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert (code, texts[0][:5]) == (502, "5.5.1"), (code, texts)
        code, texts = c.command("AUTH LOGIN")
        assert (code, texts[0][:5]) == (502, "5.5.1"), (code, texts)
        # And nothing relays: no AUTH means no outside recipient.
        assert c.command("MAIL FROM:<someone@outside.test>")[0] == 250
        code, texts = c.command("RCPT TO:<victim@elsewhere.test>")
        assert (code, texts[0][:5]) == (550, "5.7.1"), (code, texts)


# -- 4. STARTTLS command injection (CVE-2011-0411) ---------------------------------------


@pytest.mark.parametrize("port", [SMTP_PORT, SUBMISSION_PORT])
def test_starttls_discards_pipelined_input(node, port):
    with connect(port, SRC_INJECT) as c:
        c.ehlo()
        c.send(b"STARTTLS\r\nRSET\r\n")
        code, texts = c.read_reply()
        assert code == 220, (code, texts)
        # Nothing in clear after the 220 either.
        assert c.buffer == b"", c.buffer
        c.sock = unverified().wrap_socket(c.sock)
        c.assert_silent(0.5)
        code, texts = c.ehlo()
        assert code == 250 and texts[0].startswith(HOSTNAME), texts
        assert not has_keyword(texts, "STARTTLS"), texts
        if port == SUBMISSION_PORT:
            assert auth_line(texts) is not None, texts
        # The session is sound: one command, one reply.
        assert c.command("NOOP")[0] == 250
        c.assert_silent(0.3)

    # The same with a whole transaction injected behind STARTTLS.
    with connect(port, SRC_INJECT) as c:
        c.ehlo()
        c.send(b"STARTTLS\r\nMAIL FROM:<x@outside.test>\r\nRCPT TO:<alice@example.test>\r\n")
        assert c.read_reply()[0] == 220
        assert c.buffer == b""
        c.sock = unverified().wrap_socket(c.sock)
        c.assert_silent(0.5)
        c.ehlo()
        # No MAIL survived: RCPT is out of sequence.
        c.expect(f"RCPT TO:<{ALICE}>", 503)


# -- 5. implicit TLS and the generated certificate ------------------------------------------


def test_implicit_tls_on_submissions(node):
    with implicit(SRC_TLS) as c:
        assert c.greeting[0] == 220 and HOSTNAME in c.greeting[1][0], c.greeting
        version = c.sock.version()
        assert version in ("TLSv1.2", "TLSv1.3"), version
        code, texts = c.ehlo()
        assert not has_keyword(texts, "STARTTLS"), texts
        assert not has_keyword(texts, "GDEL"), texts
        assert {"PLAIN", "LOGIN"} <= set((auth_line(texts) or "").split()[1:]), texts
        c.expect("STARTTLS", 503)
        c.expect(f"MAIL FROM:<{ALICE}>", 530)
        code, texts = c.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert (code, texts[0][:5]) == (235, "2.7.0"), (code, texts)
        assert c.command(f"MAIL FROM:<{ALICE}>")[0] == 250
        assert c.command(f"MAIL FROM:<{BOB}>")[0] == 503  # nested MAIL


def test_certificate_generated_for_the_hostname(node):
    cert_path = node.dir / "var" / "tls" / "cert.pem"
    key_path = node.dir / "var" / "tls" / "key.pem"
    assert cert_path.is_file() and key_path.is_file()
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600, oct(os.stat(key_path).st_mode)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert cns == [HOSTNAME], cns
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert HOSTNAME in san.get_values_for_type(x509.DNSName), san
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()

    # The node serves that certificate, on every TLS service.
    with implicit(SRC_TLS) as c:
        served = c.sock.getpeercert(binary_form=True)
    assert served == cert.public_bytes(serialization.Encoding.DER)
    with connect(SUBMISSION_PORT, SRC_TLS) as c:
        c.ehlo()
        c.starttls()
        served = c.sock.getpeercert(binary_form=True)
    assert served == cert.public_bytes(serialization.Encoding.DER)

    # A client verifying against that certificate and the name succeeds ...
    context = ssl.create_default_context(cadata=cert_path.read_text())
    with implicit(SRC_TLS, context, HOSTNAME) as c:
        assert c.greeting[0] == 220
    # ... but not under another name.
    client = RawSMTP(NODE_IP, SUBMISSIONS_PORT, timeout=10, source=SRC_TLS, greeting=False)
    with client, pytest.raises(ssl.SSLCertVerificationError):
        context.wrap_socket(client.sock, server_hostname="mx.other.test")


def old_client() -> ssl.SSLContext:
    """A client that speaks TLS 1.0 and 1.1 and nothing newer."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    return old


@pytest.mark.parametrize("port", [SUBMISSIONS_PORT, SUBMISSION_PORT, SMTP_PORT])
def test_tls_older_than_1_2_is_refused(node, port):
    old = old_client()
    modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    modern.check_hostname = False
    modern.verify_mode = ssl.CERT_NONE
    modern.maximum_version = ssl.TLSVersion.TLSv1_2

    def handshake(context):
        if port == SUBMISSIONS_PORT:
            client = RawSMTP(NODE_IP, port, timeout=5, source=SRC_TLS, greeting=False)
        else:
            client = connect(port, SRC_TLS, timeout=5)
            client.ehlo()
            assert client.command("STARTTLS")[0] == 220
        with client:
            client.sock = context.wrap_socket(client.sock)
            return client.sock.version()

    assert handshake(modern) == "TLSv1.2"
    try:
        version = handshake(old)
    except (ssl.SSLError, ConnectionError) as e:
        assert re.search(r"(?i)protocol.version|unsupported.protocol|no.protocols|"
                         r"wrong.version|EOF", str(e)), repr(e)
    else:
        pytest.fail(f"handshake with a TLS 1.1 client succeeded: {version}")


def test_the_old_client_can_speak_tls_1_1():
    """The client above is no straw man: a server allowing TLS 1.1 gets it."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("old.test")).issuer_name(_name("old.test"))
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (Path(folder) / "k.pem").write_bytes(_pem_key(key))
        server.load_cert_chain(Path(folder) / "c.pem", Path(folder) / "k.pem")
    listener = socket.socket()
    listener.bind((SRC_TLS, 0))
    listener.listen(1)
    listener.settimeout(5)
    results = []

    def serve():
        try:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                results.append(tls.version())
        except (OSError, ssl.SSLError) as e:
            results.append(repr(e))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=5,
                                       source_address=(SRC_TLS, 0))
        try:
            with old_client().wrap_socket(raw) as tls:
                version = tls.version()
        except ssl.SSLError as e:
            pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {e}")
        thread.join(5)
    finally:
        listener.close()
    assert version == "TLSv1.1", (version, results)


# -- 6. Date and Message-ID on submitted mail -------------------------------------------------


def submit_from(address: str, source: str, user: str, password: str, recipients,
                message: bytes, sender: str | None = None) -> dict:
    with smtplib.SMTP(address, SUBMISSION_PORT, local_hostname="client.submit.test",
                      timeout=20, source_address=(source, 0)) as client:
        client.starttls(context=unverified())
        client.login(user, password)
        refused = client.sendmail(sender or user, list(recipients), message)
        client.quit()
    return refused


def find_message(node: Node, address: str, token: str) -> bytes:
    def look():
        for raw in node.delivered(address):
            if token.encode() in raw:
                return raw
        return None

    return wait_until(look, 10, message=lambda: f"{token} for {address}\n{node.diagnostics()}")


def test_submission_completes_date_and_message_id(node):
    token = "hdr-" + secrets.token_hex(6)
    bare = (f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {token}\r\n\r\nno date, no id\r\n").encode()
    assert submit_from(NODE_IP, SRC_SUBMIT, ALICE, PASSWORD, [BOB], bare) == {}
    raw = find_message(node, BOB, token)
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert len(msg.get_all("Date") or []) == 1, raw[:800]
    assert len(msg.get_all("Message-ID") or []) == 1, raw[:800]
    parsed = email.utils.parsedate_to_datetime(msg["Date"])
    assert abs(parsed.timestamp() - time.time()) < 120, msg["Date"]
    message_id = msg["Message-ID"].strip()
    assert re.fullmatch(r"<[^<>@\s]+@mx\.example\.test>", message_id), message_id
    # The body is untouched and the original header fields are all there once.
    assert raw.replace(b"\r\n", b"\n").endswith(b"\n\nno date, no id\n"), raw
    assert msg["Subject"] == token

    # Both present: none added, none changed.
    token2 = "hdr2-" + secrets.token_hex(6)
    date = "Tue, 01 Jan 2030 10:00:00 +0000"
    mid = f"<{token2}@client.example>"
    full = (f"From: {ALICE}\r\nTo: {BOB}\r\nDate: {date}\r\nMessage-ID: {mid}\r\n"
            f"Subject: {token2}\r\n\r\nhas both\r\n").encode()
    assert submit_from(NODE_IP, SRC_SUBMIT, ALICE, PASSWORD, [BOB], full) == {}
    raw2 = find_message(node, BOB, token2)
    msg2 = email.message_from_bytes(raw2, policy=email.policy.compat32)
    assert msg2.get_all("Date") == [date], raw2[:800]
    assert msg2.get_all("Message-ID") == [mid], raw2[:800]

    # Only one missing (lower-case name counts as present): only that one added.
    token3 = "hdr3-" + secrets.token_hex(6)
    half = (f"From: {ALICE}\r\nTo: {BOB}\r\ndate: {date}\r\nSubject: {token3}\r\n\r\n"
            f"has a date\r\n").encode()
    assert submit_from(NODE_IP, SRC_SUBMIT, ALICE, PASSWORD, [BOB], half) == {}
    raw3 = find_message(node, BOB, token3)
    msg3 = email.message_from_bytes(raw3, policy=email.policy.compat32)
    assert msg3.get_all("Date") == [date], raw3[:800]
    assert len(msg3.get_all("Message-ID") or []) == 1, raw3[:800]


# -- 7. outbound TLS in verify mode ------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def verify_world(tmp_path_factory, dns, ca):
    """A sender in verify mode and three receivers with different certificates."""
    workdir = tmp_path_factory.mktemp("verify")
    nodes = []

    def make(name, address, domain, user, tls=None, delivery=None):
        settings = merge_settings(FAST, common(dns), {"tls": tls or {}, "delivery": delivery or {}})
        n = Node(workdir, name, address, [domain], f"mx.{domain}", users={user: PASSWORD},
                 settings=settings)
        nodes.append(n)
        n.start()
        return n

    def files(cert_key):
        cert, key = cert_key
        return {"certificate": str(cert), "key": str(key), "generate": False}

    try:
        world = {
            "sender": make("sender", SENDER_IP, "sender.test", CAROL,
                           delivery={"tls": "verify", "tls_ca": str(ca.path)}),
            "good": make("good", RECEIVER_IP, "receiver.test", DAVE,
                         tls=files(ca.leaf("good", "mx.receiver.test"))),
            "wrong": make("wrong", WRONG_IP, "wrongname.test", ERIN,
                          tls=files(ca.leaf("wrong", "wrong.example"))),
            "self": make("self", SELF_IP, "selfsigned.test", FRANK,
                         tls=files(ca.leaf("self", "mx.selfsigned.test", self_signed=True))),
        }
        yield world
    finally:
        for n in nodes:
            n.kill()


def served_certificate(address: str) -> x509.Certificate:
    with RawSMTP(address, SMTP_PORT, timeout=10, source=SRC_TLS) as c:
        c.ehlo()
        c.starttls()
        return x509.load_der_x509_certificate(c.sock.getpeercert(binary_form=True))


def outbound_message(token: str, to: str) -> bytes:
    return (f"From: {CAROL}\r\nTo: {to}\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@sender.test>\r\n\r\nbody {token}\r\n").encode()


def send_out(sender: Node, to: str, token: str) -> tuple[str, str]:
    assert submit_from(SENDER_IP, SRC_SUBMIT, CAROL, PASSWORD, [to],
                       outbound_message(token, to)) == {}
    match = sender.wait_log(
        rf"queued (\w+) as ([A-Za-z0-9_-]+) for \['{re.escape(to)}'\]", 10)
    return match.group(1), match.group(2)


def queue_rows(node: Node) -> list[dict]:
    return json.loads(node.cli("queue", "--json").stdout)["messages"]


def test_verify_mode_delivers_to_a_valid_certificate(verify_world):
    sender, good = verify_world["sender"], verify_world["good"]
    served = served_certificate(RECEIVER_IP)
    assert served.subject == _name("mx.receiver.test")

    token = "verify-ok-" + secrets.token_hex(5)
    queue_id, gdel_id = send_out(sender, DAVE, token)
    raw = wait_until(
        lambda: [m for m in good.delivered(DAVE) if token.encode() in m], 20,
        message=lambda: f"{token} at {DAVE}\n{sender.diagnostics()}\n{good.diagnostics()}")[0]
    assert f"body {token}".encode() in raw
    sender.wait_log(r"session with mx\.receiver\.test \[127\.0\.5\.21\]: "
                    r"TLS, certificate verified", 5)
    sender.wait_log(rf"retrieved {gdel_id} \({queue_id}\) by {re.escape(RECEIVER_IP)}", 10)
    good.wait_log(rf"notification {gdel_id} from {re.escape(SENDER_IP)}", 5)


@pytest.mark.parametrize("which, to, host, address", [
    ("wrong", ERIN, "mx.wrongname.test", WRONG_IP),
    ("self", FRANK, "mx.selfsigned.test", SELF_IP),
])
def test_verify_mode_defers_on_a_bad_certificate(verify_world, which, to, host, address):
    sender, receiver = verify_world["sender"], verify_world[which]
    # The receiver does speak STARTTLS, with the certificate we gave it.
    served = served_certificate(address)
    assert served.subject == _name("wrong.example" if which == "wrong" else host)

    token = f"verify-{which}-" + secrets.token_hex(5)
    queue_id, gdel_id = send_out(sender, to, token)
    match = sender.wait_log(rf"deferred {gdel_id} \({queue_id}\) until [^:]+: (.*)", 15)
    reason = match.group(1)
    expected = (r"VerificationError.*DNSMismatch" if which == "wrong"
                else r"certificate verify failed")
    assert re.search(expected, reason), (
        f"deferral reason names no TLS problem: {reason!r}\n{sender.diagnostics()}")
    # Never claimed verified, and the receiver heard no notification.
    assert not re.search(rf"session with {re.escape(host)} \[[^]]+\]: TLS",
                         sender.log_text()), sender.diagnostics()
    rows = queue_rows(sender)
    mine = [r for r in rows if r.get("id") == gdel_id]
    assert mine, rows
    row = mine[0]
    assert (row["queue"], row["state"], row["queue_id"]) == ("push", "queued", queue_id), row
    assert row["recipients"] == [to] and row["attempts"] >= 1, row
    assert re.search(expected, row.get("last_error") or ""), row
    # A second attempt (push_retry 1 s) is deferred as well.
    sender.wait_log(rf"deferred {gdel_id} \({queue_id}\)(.|\n)*deferred {gdel_id} \({queue_id}\)",
                    10)
    time.sleep(0.5)
    assert not [m for m in receiver.delivered(to) if token.encode() in m]
    assert gdel_id not in receiver.log_text(), receiver.diagnostics()
    assert not re.search(rf"notification \S+ from {re.escape(SENDER_IP)}", receiver.log_text())
