"""
MTA-STS end to end (SPEC 11.2, RFC 8461, README "MTA-STS"): a pullmail
sender with ``[delivery] mta_sts`` on, a pullmail receiver whose
certificate our own CA made, and a real HTTPS server (http.server and ssl,
its certificate from the same CA) serving each test domain's policy.

    DNS           127.0.6.1
    sender.test   127.0.6.20  mx.sender.test   carol (mta_sts, tls_ca = our CA)
    <domain>      127.0.6.21  mx.<domain>      one receiver for every domain below
    policy host   127.0.6.30  mta-sts.<domain> (HTTPS on a free port)

    good.test         enforce, mx.good.test listed          delivered by GDEL + RETR
    nomatch.test      enforce, only elsewhere.nomatch.test   nothing sent; queued, reason
    badcert.test      enforce, listed, but the receiver's certificate does not name it
    testing.test      testing, only elsewhere.testing.test   delivered, reported
    testingcert.test  testing, listed, certificate without the name: delivered, reported
    oversized.test, garbled.test, redirect.test, wrongtype.test: nomatch's policy made
                      invalid (over 64 KiB, not the grammar, behind a 302, text/html):
                      no policy applies, so the mail is delivered
    bücher.test       (xn--bcher-kva.test) enforce, mx "*.bücher.test": delivered
"""

from __future__ import annotations

import json
import re
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .certs import CertificateAuthority
from .harness import (
    SUBMISSION_PORT,
    DNSServer,
    Node,
    free_port,
    merge_settings,
    submit,
    wait_until,
)

DNS_IP = "127.0.6.1"
SENDER_IP = "127.0.6.20"
RECEIVER_IP = "127.0.6.21"
POLICY_IP = "127.0.6.30"
CAROL = "carol@sender.test"
RCPT = "rcpt@good.test"
PASSWORD = "pw-" + "c" * 10
POLICY_ID = "20260101"
IDN = "xn--bcher-kva.test"             # bücher.test

ENFORCE_ELSEWHERE = b"version: STSv1\r\nmode: enforce\r\nmx: elsewhere.nomatch.test\r\n" \
                    b"max_age: 86400\r\n"


def _policy(mode: str, mx: str) -> bytes:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n".encode()


# host -> (status, content type, body, extra headers, send Content-Length)
ANSWERS = {
    "good.test": (200, "text/plain", _policy("enforce", "mx.good.test"), {}, True),
    "nomatch.test": (200, "text/plain; charset=utf-8", ENFORCE_ELSEWHERE, {}, True),
    "badcert.test": (200, "text/plain", _policy("enforce", "*.badcert.test"), {}, True),
    "testing.test": (200, "text/plain", _policy("testing", "elsewhere.testing.test"), {}, True),
    "testingcert.test": (200, "text/plain", _policy("testing", "mx.testingcert.test"), {},
                         True),
    # Valid fields all the way, but over 64 KiB, and no Content-Length to warn.
    "oversized.test": (200, "text/plain",
                       ENFORCE_ELSEWHERE + b"x-padding: " + b"p" * 70_000 + b"\r\n", {}, False),
    "garbled.test": (200, "text/plain", b"<html><body>mode: enforce</body></html>\n", {}, True),
    "redirect.test": (302, "text/plain", b"", {"Location": "/real-policy.txt"}, True),
    "wrongtype.test": (200, "text/html", ENFORCE_ELSEWHERE, {}, True),
    # bücher.test: its policy host and MX by their A-labels; the mx pattern
    # written with a U-label.
    IDN: (200, "text/plain", _policy("enforce", "*.bücher.test"), {}, True),
}
DOMAINS = list(ANSWERS)
# The receiver's certificate names every MX but these.
UNCERTIFIED = {"mx.badcert.test", "mx.testingcert.test"}


class PolicyServer:
    """The policy hosts: HTTPS on POLICY_IP, answering by the Host header."""

    def __init__(self, cert, key) -> None:
        self.hits: list[tuple[str, str]] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = self.headers.get("Host", "").split(":")[0].lower()
                hits.append((host, self.path))
                domain = host.removeprefix("mta-sts.")
                status, kind, body, extra, length = ANSWERS.get(
                    domain if self.path == "/.well-known/mta-sts.txt" else "",
                    (404, "text/plain", b"", {}, True))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.port = free_port(POLICY_IP)
        self.server = ThreadingHTTPServer((POLICY_IP, self.port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "PolicyServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self, domain: str) -> list[str]:
        return [path for host, path in self.hits if host == f"mta-sts.{domain}"]


def _records() -> dict:
    records = {
        "sender.test": {"A": [SENDER_IP], "MX": [[10, "mx.sender.test"]],
                        "TXT": [f"v=spf1 ip4:{SENDER_IP} -all"]},
        "mx.sender.test": {"A": [SENDER_IP]},
    }
    for domain in DOMAINS:
        records[domain] = {"MX": [[10, f"mx.{domain}"]]}
        records[f"mx.{domain}"] = {"A": [RECEIVER_IP]}
        records[f"_mta-sts.{domain}"] = {"TXT": [f"v=STSv1; id={POLICY_ID}"]}
        records[f"mta-sts.{domain}"] = {"A": [POLICY_IP]}
    return records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mta-sts")
    ca = CertificateAuthority(workdir / "ca")
    policy_names = [f"mta-sts.{d}" for d in DOMAINS]
    mx_names = [f"mx.{d}" for d in DOMAINS if f"mx.{d}" not in UNCERTIFIED]
    fast = {"retrieval": {"schedule": ["0s", "2s", "4s"]},
            "limits": {"idle_timeout": "30s"}}
    with DNSServer(workdir / "dns", _records(), free_port(DNS_IP), address=DNS_IP) as dns, \
            PolicyServer(*ca.leaf("policy", policy_names[0], also=tuple(policy_names[1:]))) \
            as policies:
        resolver = {"dns": {"nameservers": [dns.nameserver], "timeout": "2s"}}
        cert, key = ca.leaf("receiver", mx_names[0], also=tuple(mx_names[1:]))
        receiver = Node(
            workdir, "receiver", RECEIVER_IP, DOMAINS, "mx.good.test", users={RCPT: PASSWORD},
            aliases="".join(f"@{d}: {RCPT}\n" for d in DOMAINS if d != "good.test"),
            settings=merge_settings(fast, resolver, {
                "tls": {"certificate": str(cert), "key": str(key), "generate": False}}))
        sender = Node(
            workdir, "sender", SENDER_IP, ["sender.test"], "mx.sender.test",
            users={CAROL: PASSWORD},
            settings=merge_settings(fast, resolver, {"delivery": {
                "mta_sts": True, "mta_sts_port": policies.port, "tls_ca": str(ca.path),
                "push_retry": ["1s", "2s"], "connect_timeout": "3s"}}))
        with receiver, sender:
            yield {"sender": sender, "receiver": receiver, "policies": policies}


def send(world, domain: str, token: str) -> tuple[str, str]:
    """Submit a message to C{domain}; (queue id, outbox id)."""
    to = f"{token}@{domain}" if domain != "good.test" else RCPT
    message = (f"From: {CAROL}\r\nTo: {to}\r\nSubject: {token}\r\n"
               f"Message-ID: <{token}@sender.test>\r\n\r\nbody {token}\r\n").encode()
    assert submit(world["sender"], CAROL, PASSWORD, [to], message) == {}
    match = world["sender"].wait_log(rf"queued (\w+) as ([A-Za-z0-9_-]+) for \['{re.escape(to)}'\]",
                                     10)
    return match.group(1), match.group(2)


def wait_delivered(world, token: str) -> bytes:
    receiver, sender = world["receiver"], world["sender"]
    return wait_until(
        lambda: next((m for m in receiver.delivered(RCPT) if token.encode() in m), None), 20,
        message=lambda: f"{token} delivered\n{sender.diagnostics()}\n{receiver.diagnostics()}")


def queue_row(node: Node, entry_id: str) -> dict:
    rows = json.loads(node.cli("queue", "--json").stdout)["messages"]
    mine = [r for r in rows if r.get("id") == entry_id]
    assert mine, rows
    return mine[0]


def assert_never_sent(world, entry_id: str, token: str) -> None:
    time.sleep(0.5)
    receiver = world["receiver"]
    assert not [m for m in receiver.delivered(RCPT) if token.encode() in m]
    assert entry_id not in receiver.log_text(), receiver.diagnostics()


def test_enforce_delivers_to_a_listed_verified_mx(world):
    sender = world["sender"]
    token = "sts-good-" + secrets.token_hex(4)
    queue_id, entry_id = send(world, "good.test", token)
    assert f"body {token}".encode() in wait_delivered(world, token)
    sender.wait_log(r"MTA-STS policy of good\.test \(id 20260101\): enforce, "
                    r"mx \['mx\.good\.test'\], max_age 86400", 5)
    # By General Delivery: the RETR came from the listed MX and was answered.
    sender.wait_log(rf"retrieved {entry_id} \({queue_id}\) by {re.escape(RECEIVER_IP)}", 10)
    assert world["policies"].fetched("good.test") == ["/.well-known/mta-sts.txt"]
    cached = json.loads((sender.state_dir / "mta-sts" / "good.test.json").read_text())
    assert (cached["mode"], cached["mx"], cached["id"]) == ("enforce", ["mx.good.test"],
                                                            POLICY_ID)


def test_cached_policy_survives_a_restart(world):
    """RFC 8461 5.1: the policy is used from the cache, not fetched again."""
    sender = world["sender"]
    token = "sts-good-" + secrets.token_hex(4)
    send(world, "good.test", token)
    wait_delivered(world, token)
    before = len(world["policies"].fetched("good.test"))
    assert before >= 1
    sender.restart()
    token = "sts-again-" + secrets.token_hex(4)
    send(world, "good.test", token)
    wait_delivered(world, token)
    assert len(world["policies"].fetched("good.test")) == before


def test_enforce_sends_nothing_to_an_unlisted_mx(world):
    sender = world["sender"]
    token = "sts-nomatch-" + secrets.token_hex(4)
    queue_id, entry_id = send(world, "nomatch.test", token)
    sender.wait_log(rf"deferred {entry_id} \({queue_id}\) until [^:]+: MTA-STS enforce "
                    r"\(nomatch\.test\): MX mx\.nomatch\.test is not in the MTA-STS policy", 15)
    row = queue_row(sender, entry_id)
    assert row["state"] == "queued" and row["attempts"] >= 1, row
    assert "MTA-STS enforce (nomatch.test): MX mx.nomatch.test is not in the MTA-STS policy " \
           "(mx: elsewhere.nomatch.test)" in row["last_error"], row
    assert_never_sent(world, entry_id, token)


def test_enforce_sends_nothing_without_a_valid_certificate(world):
    sender = world["sender"]
    token = "sts-badcert-" + secrets.token_hex(4)
    queue_id, entry_id = send(world, "badcert.test", token)
    match = sender.wait_log(rf"deferred {entry_id} \({queue_id}\) until [^:]+: (.*)", 15)
    assert re.search(r"MTA-STS enforce \(badcert\.test\): MX mx\.badcert\.test: .*"
                     r"(VerificationError|DNSMismatch)", match.group(1)), match.group(1)
    row = queue_row(sender, entry_id)
    assert "MTA-STS enforce (badcert.test)" in row["last_error"], row
    assert_never_sent(world, entry_id, token)


@pytest.mark.parametrize("domain, report", [
    ("testing.test", r"MTA-STS testing \(testing\.test, id 20260101\): MX mx\.testing\.test "
                     r"is not in the MTA-STS policy"),
    ("testingcert.test", r"MTA-STS testing \(testingcert\.test\): MX mx\.testingcert\.test: "
                         r"certificate not valid for mx\.testingcert\.test"),
])
def test_testing_mode_delivers_and_reports(world, domain, report):
    token = "sts-testing-" + secrets.token_hex(4)
    send(world, domain, token)
    wait_delivered(world, token)
    world["sender"].wait_log(report, 5)


def test_a_u_label_domain_is_served_by_its_a_label(world):
    """
    Mail to bücher.test: the policy is found at _mta-sts.xn--bcher-kva.test
    and https://mta-sts.xn--bcher-kva.test/, its U-label mx pattern is
    compared as an A-label, and enforce lets the mail go to the listed MX.
    """
    import smtplib

    sender = world["sender"]
    token = "sts-idn-" + secrets.token_hex(4)
    message = f"From: {CAROL}\r\nSubject: {token}\r\n\r\nbody {token}\r\n".encode()
    with smtplib.SMTP(sender.address, SUBMISSION_PORT, local_hostname="client.test",
                      timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(CAROL, PASSWORD)
        assert client.sendmail(CAROL, [f"{token}@bücher.test"], message,
                               mail_options=["SMTPUTF8"]) == {}
    wait_delivered(world, token)
    sender.wait_log(rf"MTA-STS policy of {re.escape(IDN)} \(id 20260101\): enforce, "
                    rf"mx \['\*\.{re.escape(IDN)}'\]", 5)
    sender.wait_log(rf"MTA-STS enforce \({re.escape(IDN)}\): MX mx\.{re.escape(IDN)} "
                    r"certificate verified", 5)
    assert world["policies"].fetched(IDN) == ["/.well-known/mta-sts.txt"]
    assert (sender.state_dir / "mta-sts" / f"{IDN}.json").exists()


@pytest.mark.parametrize("domain, why", [
    ("oversized.test", r"FetchError: policy over 65536 octets"),
    ("garbled.test", r"invalid policy: line 1 is not a policy field"),
    ("redirect.test", r"FetchError: HTTP 302: a redirect, which MTA-STS does not follow"),
    ("wrongtype.test", r"FetchError: Content-Type 'text/html' is not text/plain"),
])
def test_a_bad_policy_is_no_policy(world, domain, why):
    """
    Each serves the enforce policy that keeps nomatch.test's mail back,
    made invalid: treated as no policy, so the mail goes out as before.
    """
    sender = world["sender"]
    token = "sts-bad-" + secrets.token_hex(4)
    send(world, domain, token)
    wait_delivered(world, token)
    sender.wait_log(rf"MTA-STS policy of {re.escape(domain)} \(id 20260101\) not usable: "
                    rf"{why}; no policy applies", 5)
    assert not (sender.state_dir / "mta-sts" / f"{domain}.json").exists()
    if domain == "redirect.test":
        assert world["policies"].fetched(domain) == ["/.well-known/mta-sts.txt"]
