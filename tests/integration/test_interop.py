"""
Interoperability with real third-party mail software from Debian: swaks
(a scriptable SMTP client, playing a user's mail program) and Postfix (an
MTA, playing the rest of the Internet).

    pullmail.test   127.0.0.71  mx.pullmail.test  alice, bob   (pullmail node)
    postfix.test    127.0.0.72  mx.postfix.test   carol, dave  (private Postfix,
                                                  smtpd on 127.0.0.72:2525,
                                                  relayhost [127.0.0.71]:2525)
    a mail client   127.0.0.73  (swaks, and smtplib into Postfix)
    a guesser       127.0.0.75  (wrong passwords: its own AUTH failure count)
    DNS             127.0.0.74:<free port>  (harness DNSServer)

Postfix offers no GDEL, so pullmail reaches it by push fallback; both sides
offer STARTTLS, so each direction runs over TLS.

The packages are C{swaks}, C{libnet-ssleay-perl} (swaks' TLS: only a
Recommends) and C{postfix} (Debian/Ubuntu).  When a tool is missing, the
session tries C{apt-get install -y} of those once (as
root, with apt-get present, with Postfix preseeded to "No configuration" so
that no system instance is set up); if that fails too, the tests that need
the tool are skipped, with a banner on stderr and a warning in the summary.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from .harness import (
    SMTP_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    DNSServer,
    Node,
    free_port,
    wait_until,
)
from .postfix import PostfixInstance, make_workdir, postfix_unavailable

PULLMAIL_IP = "127.0.0.71"
POSTFIX_IP = "127.0.0.72"
CLIENT_IP = "127.0.0.73"
DNS_IP = "127.0.0.74"
GUESSER_IP = "127.0.0.75"
POSTFIX_PORT = SMTP_PORT  # pullmail's [delivery] remote_port stays 2525

ALICE = "alice@pullmail.test"
BOB = "bob@pullmail.test"
CAROL = "carol@postfix.test"
DAVE = "dave@postfix.test"
ALICE_PASSWORD = "alice-Pw-" + "7" * 8
BOB_PASSWORD = "bob-Pw-" + "3" * 8

RECORDS = {
    "pullmail.test": {"A": [PULLMAIL_IP], "MX": [[10, "mx.pullmail.test"]],
                      "TXT": [f"v=spf1 ip4:{PULLMAIL_IP} -all"]},
    "mx.pullmail.test": {"A": [PULLMAIL_IP]},
    "postfix.test": {"A": [POSTFIX_IP], "MX": [[10, "mx.postfix.test"]],
                     "TXT": [f"v=spf1 ip4:{POSTFIX_IP} -all"]},
    "mx.postfix.test": {"A": [POSTFIX_IP]},
}

# swaks only Recommends libnet-ssleay-perl, without which it has no TLS.
APT_PACKAGES = ("swaks", "libnet-ssleay-perl", "postfix")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


# -- the tools: find them, or install them once, or skip loudly ---------------


def _missing_tools() -> dict[str, str]:
    """package -> why it is unusable, for the packages these tests need."""
    missing = {}
    swaks = shutil.which("swaks", path=SBIN_PATH)
    if swaks is None:
        missing["swaks"] = "swaks is not installed"
    else:
        support = subprocess.run([swaks, "--support"], capture_output=True, text=True,
                                 timeout=60, stdin=subprocess.DEVNULL)
        if "=== TLS supported" not in support.stdout + support.stderr:
            missing["swaks"] = ("swaks has no TLS support (libnet-ssleay-perl missing): "
                                + (support.stdout + support.stderr).strip()[-300:])
    reason = postfix_unavailable()
    if reason is not None:
        missing["postfix"] = reason
    return missing


def _apt_install(packages: list[str]) -> str:
    """Try C{apt-get install -y PACKAGES} (then after an update); a transcript."""
    apt = shutil.which("apt-get", path=SBIN_PATH)
    if apt is None or os.geteuid() != 0:
        return "apt-get not available, or not root: not installing"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    if "postfix" in packages and shutil.which("debconf-set-selections", path=SBIN_PATH):
        # No system instance: the tests run their own, privately configured.
        subprocess.run(
            ["debconf-set-selections"], env=env, capture_output=True, timeout=60,
            input=b"postfix postfix/main_mailer_type select No configuration\n",
        )
    for attempt in ([[apt, "install", "-y", "--no-install-recommends", *packages]],
                    [[apt, "update"],
                     [apt, "install", "-y", "--no-install-recommends", *packages]]):
        ok = True
        for argv in attempt:
            try:
                result = subprocess.run(argv, env=env, capture_output=True, text=True,
                                        timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                log.append(f"$ {' '.join(argv)}\n{e}")
                ok = False
                break
            log.append(f"$ {' '.join(argv)} -> {result.returncode}\n"
                       + (result.stdout + result.stderr)[-1500:])
            if result.returncode != 0:
                ok = False
                break
        if ok:
            break
    return "\n".join(log)


def _loud_skip(config, package: str, reason: str, transcript: str) -> None:
    message = (
        f"INTEROP TESTS SKIPPED: the Debian package {package!r} cannot be used "
        f"({reason}); `apt-get install -y {' '.join(APT_PACKAGES)}` did not help. "
        "These tests check pullmail against real third-party software and did NOT run."
    )
    banner = "!" * 78
    # Past pytest's output capture, so that it shows even though the test
    # is only skipped; and as a warning in the summary too.
    capture = config.pluginmanager.getplugin("capturemanager") if config else None
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        sys.stderr.write(f"\n{banner}\n{message}\n{transcript}\n{banner}\n")
        sys.stderr.flush()
    warnings.warn(message, pytest.PytestWarning, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def interop_tools():
    """Which tools are still missing after (at most) one install attempt."""
    missing = _missing_tools()
    transcript = ""
    if missing:
        transcript = _apt_install(list(APT_PACKAGES))
        missing = _missing_tools()
    return missing, transcript


@pytest.fixture(scope="session")
def swaks_path(interop_tools, pytestconfig):
    missing, transcript = interop_tools
    if "swaks" in missing:
        _loud_skip(pytestconfig, "swaks", missing["swaks"], transcript)
    return shutil.which("swaks", path=SBIN_PATH)


@pytest.fixture(scope="session")
def postfix_ok(interop_tools, pytestconfig):
    missing, transcript = interop_tools
    if "postfix" in missing:
        _loud_skip(pytestconfig, "postfix", missing["postfix"], transcript)
    return True


# -- the network ------------------------------------------------------------------


def _system_postfix_state() -> dict[str, str]:
    """Digests of the system instance's config files (which must not change)."""
    state = {}
    for name in ("main.cf", "master.cf"):
        path = Path("/etc/postfix") / name
        try:
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            state[name] = "absent"
    return state


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    server = DNSServer(tmp_path_factory.mktemp("interop-dns"), RECORDS,
                       free_port(DNS_IP), address=DNS_IP)
    with server:
        yield server


@pytest.fixture(scope="module")
def node(tmp_path_factory, dns):
    node = Node(
        tmp_path_factory.mktemp("interop-nodes"), "pullmail", PULLMAIL_IP,
        ["pullmail.test"], "mx.pullmail.test",
        settings={
            "dns": {"nameservers": [dns.nameserver], "timeout": "2s"},
            "delivery": {"push_retry": ["1s", "2s"], "connect_timeout": "5s"},
            "limits": {"auth_tarpit_max": "1s", "idle_timeout": "30s"},
        },
    )
    # Users made the way an operator makes them: `pullmail adduser`, the
    # password on standard input.
    result = node.cli("adduser", ALICE, input=ALICE_PASSWORD)
    assert result.returncode == 0
    node.cli("adduser", BOB, input=BOB_PASSWORD)
    assert ALICE_PASSWORD not in (node.dir / "users").read_text()
    with node:
        yield node


@pytest.fixture(scope="module")
def system_postfix_before():
    return _system_postfix_state()


@pytest.fixture(scope="module")
def postfix(postfix_ok, node, system_postfix_before, tmp_path_factory):
    workdir = make_workdir()
    instance = PostfixInstance(
        workdir, POSTFIX_IP, POSTFIX_PORT, "postfix.test",
        relayhost=f"[{PULLMAIL_IP}]:{SMTP_PORT}", mailboxes=[CAROL, DAVE],
    )
    try:
        with instance:
            yield instance
    finally:
        instance.stop()
        leftovers = instance.processes()
        # Keep Postfix's log with pytest's other temporary files, for a look
        # after the run; the rest (queue, maildirs) goes.
        with contextlib.suppress(OSError):
            shutil.copy(instance.log_path, tmp_path_factory.mktemp("interop-postfix") / "maillog")
        shutil.rmtree(workdir, ignore_errors=True)
        assert not leftovers, f"Postfix processes left behind: {leftovers}"


# -- helpers ----------------------------------------------------------------------


def token() -> str:
    return secrets.token_hex(6)


def body_for(tok: str) -> str:
    # A dot-led line checks dot-stuffing by each client and server on the way.
    return f"hello from the interop test {tok}\n.a line that starts with a dot\n..two\nEND {tok}"


def run_swaks(swaks_path, *args: str, source: str = CLIENT_IP,
              timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [swaks_path, "--local-interface", source, "--helo", "client.interop.test",
            "--timeout", "20", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    result.transcript = (f"$ {' '.join(argv)}\n-> exit {result.returncode}\n"
                         f"{result.stdout}{result.stderr}")
    return result


def swaks_send(swaks_path, port: int, mechanism: str, recipients: list[str], tok: str,
               implicit: bool = False, user: str = ALICE, password: str = ALICE_PASSWORD,
               sender: str | None = None, source: str = CLIENT_IP):
    tls = ["--tls-on-connect"] if implicit else ["--tls"]
    return run_swaks(
        swaks_path, "--server", f"{PULLMAIL_IP}:{port}", *tls,
        "--auth", mechanism, "--auth-user", user, "--auth-password", password,
        "--from", sender or user, "--to", ",".join(recipients),
        "--h-Subject", f"interop {tok}", "--body", body_for(tok), source=source,
    )


def queued_as(result) -> str:
    """The queue id in pullmail's reply to end of data, as swaks saw it."""
    match = re.search(r"^<~  250 2\.0\.0 Ok: queued as (\w+)$", result.stdout, re.M)
    assert match, f"no 250 to end of data over TLS in swaks' transcript:\n{result.transcript}"
    return match.group(1)


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def assert_body_intact(raw: bytes, tok: str) -> None:
    body = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
    expected = body_for(tok).encode()
    assert body.rstrip(b"\n") == expected, body


def with_token(messages: list[bytes], tok: str) -> list[bytes]:
    return [m for m in messages if f"END {tok}".encode() in m]


def log_count(node: Node, pattern: str) -> int:
    return len(re.findall(pattern, node.log_text()))


def wait_log_count(node: Node, pattern: str, more_than: int, timeout: float = 10) -> None:
    """Wait until C{pattern} matches more than C{more_than} times in the node's log."""
    wait_until(lambda: log_count(node, pattern) > more_than, timeout,
               message=lambda: f"a new {pattern!r} in the log\n{node.diagnostics()}")


def wait_for_token(node: Node, address: str, tok: str, timeout: float = 15) -> bytes:
    found = wait_until(
        lambda: with_token(node.delivered(address), tok), timeout,
        message=lambda: f"message {tok} for {address}\n{node.diagnostics()}",
    )
    assert len(found) == 1, f"{len(found)} copies of {tok} for {address}"
    return found[0]


# -- a mail client submitting to pullmail (swaks) -----------------------------------


class SwaksSubmissionTests:
    """swaks as a user's mail program: 587 STARTTLS and 465 TLS, PLAIN and LOGIN."""

    @pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
    def test_starttls_auth_to_local_recipient(self, swaks_path, node, mechanism):
        tok = token()
        result = swaks_send(swaks_path, SUBMISSION_PORT, mechanism, [BOB], tok)
        assert result.returncode == 0, result.transcript
        out = result.stdout
        # The plaintext part: STARTTLS offered, AUTH not (SPEC 8).
        before_tls = out.split("=== TLS started", 1)[0]
        assert "=== TLS started" in out, result.transcript
        assert re.search(r"^<-  250[ -]STARTTLS$", before_tls, re.M), result.transcript
        assert "AUTH" not in before_tls.split("-> EHLO", 1)[1], result.transcript
        assert re.search(r"^<~  250[ -]AUTH .*\bPLAIN\b", out, re.M), result.transcript
        assert re.search(r"^<~  250[ -]AUTH .*\bLOGIN\b", out, re.M), result.transcript
        assert re.search(r"^<~  235 ", out, re.M), result.transcript
        queue_id = queued_as(result)

        raw = wait_for_token(node, BOB, tok)
        assert_body_intact(raw, tok)
        message = parse(raw)
        assert message["Subject"] == f"interop {tok}"
        received = message.get_all("Received")[0]
        assert f"[{CLIENT_IP}]" in received and "with ESMTPSA" in received, received
        assert queue_id in received, (queue_id, received)
        node.wait_log(rf"accepted {queue_id} from <{re.escape(ALICE)}>")

    @pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
    def test_implicit_tls_auth_to_local_recipient(self, swaks_path, node, mechanism):
        tok = token()
        result = swaks_send(swaks_path, SUBMISSIONS_PORT, mechanism, [BOB], tok,
                            implicit=True)
        assert result.returncode == 0, result.transcript
        out = result.stdout
        # TLS before the greeting: every server line is marked as over TLS.
        assert out.index("=== TLS started") < out.index("<~  220 "), result.transcript
        assert not re.search(r"^<-  ", out, re.M), result.transcript
        assert re.search(r"^<~  235 ", out, re.M), result.transcript
        queue_id = queued_as(result)
        raw = wait_for_token(node, BOB, tok)
        assert_body_intact(raw, tok)
        assert queue_id in parse(raw).get_all("Received")[0]

    @pytest.mark.parametrize("port,implicit", [(SUBMISSION_PORT, False),
                                               (SUBMISSIONS_PORT, True)])
    def test_wrong_password_is_535(self, swaks_path, node, port, implicit):
        tok = token()
        refused = rf"{re.escape(GUESSER_IP)} AUTH: 535 5\.7\.8"
        before = log_count(node, refused)
        result = swaks_send(swaks_path, port, "PLAIN", [BOB], tok, implicit=implicit,
                            password="not-" + ALICE_PASSWORD, source=GUESSER_IP)
        # swaks: exit 28 is "error in AUTH".
        assert result.returncode == 28, result.transcript
        assert re.search(r"^<~\* 535 5\.7\.8 ", result.stdout, re.M), result.transcript
        assert "MAIL FROM" not in result.stdout, result.transcript
        wait_log_count(node, refused, before)
        assert not with_token(node.delivered(BOB), tok)

    def test_mail_without_auth_is_530(self, swaks_path, node):
        """No AUTH (here: not even TLS) on submission: MAIL gets 530 5.7.0."""
        tok = token()
        result = run_swaks(
            swaks_path, "--server", f"{PULLMAIL_IP}:{SUBMISSION_PORT}",
            "--from", ALICE, "--to", BOB, "--body", body_for(tok),
        )
        assert result.returncode == 23, result.transcript  # 23: error in MAIL
        assert re.search(r"^<\*\* 530 5\.7\.0 ", result.stdout, re.M), result.transcript
        assert not with_token(node.delivered(BOB), tok)

    def test_sender_not_owned_is_553(self, swaks_path, node):
        tok = token()
        result = swaks_send(swaks_path, SUBMISSION_PORT, "LOGIN", [BOB], tok,
                            sender=BOB)  # logged in as alice
        assert result.returncode == 23, result.transcript  # 23: error in MAIL
        assert re.search(r"^<~\* 553 5\.7\.1 Sender address rejected: not owned by user$",
                         result.stdout, re.M), result.transcript
        assert not with_token(node.delivered(BOB), tok)


# -- pullmail pushes to Postfix (no GDEL there) ----------------------------------------


class PushToPostfixTests:
    """A user of pullmail writes to a Postfix site: push fallback, over STARTTLS."""

    @pytest.mark.parametrize("port,mechanism,implicit", [
        (SUBMISSION_PORT, "LOGIN", False),
        (SUBMISSIONS_PORT, "PLAIN", True),
    ])
    def test_remote_recipient_delivered_into_postfix(
        self, swaks_path, node, postfix, port, mechanism, implicit,
    ):
        tok = token()
        result = swaks_send(swaks_path, port, mechanism, [CAROL], tok, implicit=implicit)
        assert result.returncode == 0, result.transcript
        queue_id = queued_as(result)

        raw = postfix.wait_delivered(CAROL, contains=f"END {tok}".encode())[0]
        assert_body_intact(raw, tok)
        message = parse(raw)
        assert message["Return-Path"] == f"<{ALICE}>"
        assert message["Delivered-To"] == CAROL
        postfix_received, pullmail_received = message.get_all("Received")[:2]
        # Postfix took it from pullmail's address, over TLS (Postfix offered it).
        assert f"[{PULLMAIL_IP}]" in postfix_received, postfix_received
        assert "by mx.postfix.test (Postfix) with ESMTPS" in postfix_received, postfix_received
        assert "by mx.pullmail.test (pullmail)" in pullmail_received, pullmail_received
        assert queue_id in pullmail_received

        node.wait_log(
            rf"push attempt \S+ \({queue_id}\) to mx\.postfix\.test: "
            rf"accepted \['{re.escape(CAROL)}'\], refused \[\], deferred \[\]"
        )
        node.wait_log(rf"delivered {queue_id} to \['{re.escape(CAROL)}'\] at mx\.postfix\.test")
        assert not re.search(rf"notif\w* .*{queue_id}", node.log_text())
        postfix.wait_log(
            rf"TLS connection established from unknown\[{re.escape(PULLMAIL_IP)}\]")
        postfix.wait_log(rf"to=<{re.escape(CAROL)}>, relay=virtual, .*status=sent")

    def test_local_and_remote_recipients_in_one_submission(self, swaks_path, node, postfix):
        tok = token()
        result = swaks_send(swaks_path, SUBMISSION_PORT, "PLAIN", [BOB, CAROL], tok)
        assert result.returncode == 0, result.transcript
        queue_id = queued_as(result)
        local = wait_for_token(node, BOB, tok)
        remote = postfix.wait_delivered(CAROL, contains=f"END {tok}".encode())[0]
        assert_body_intact(local, tok)
        assert_body_intact(remote, tok)
        node.wait_log(rf"delivered {queue_id} to \['{re.escape(CAROL)}'\]")
        # Only the remote recipient was pushed.
        assert not re.search(rf"delivered {queue_id} to \[[^\]]*{re.escape(BOB)}",
                             node.log_text())

    def test_postfix_refusal_bounces_to_the_sender(self, swaks_path, node, postfix):
        """Postfix refuses an unknown user (550 5.1.1): alice gets an RFC 3464 DSN."""
        tok = token()
        nobody = "nobody-here@postfix.test"
        result = swaks_send(swaks_path, SUBMISSION_PORT, "LOGIN", [nobody], tok)
        assert result.returncode == 0, result.transcript
        queue_id = queued_as(result)
        postfix.wait_log(rf"NOQUEUE: reject: RCPT from unknown\[{re.escape(PULLMAIL_IP)}\]: "
                         rf"550 5\.1\.1 <{re.escape(nobody)}>")

        def dsn():
            return [m for m in node.delivered(ALICE)
                    if b"multipart/report" in m and nobody.encode() in m
                    and f"END {tok}".encode() in m]

        found = wait_until(dsn, 20, message=lambda: f"a DSN for {tok}\n{node.diagnostics()}")
        message = parse(found[0])
        assert message.get_content_type() == "multipart/report"
        assert message.get_param("report-type") == "delivery-status"
        assert "MAILER-DAEMON@mx.pullmail.test" in message["From"]
        # Header fields unfolded (RFC 5322 2.2.3), as a DSN reader would.
        report = re.sub(r"\r?\n[ \t]+", " ", found[0].decode("utf-8", "replace"))
        assert f"Final-Recipient: rfc822; {nobody}" in report
        assert "Action: failed" in report
        assert "Status: 5.1.1" in report
        assert "Remote-MTA: dns; mx.postfix.test" in report
        assert re.search(rf"Diagnostic-Code: smtp; 550 5\.1\.1 <{re.escape(nobody)}>: "
                         r"Recipient address rejected: User unknown in virtual mailbox table",
                         report), report
        node.wait_log(rf"failed DSN for {queue_id} to <{re.escape(ALICE)}>")
        assert not postfix.delivered(nobody)


# -- Postfix relays into pullmail's MX service ------------------------------------------


class PostfixRelaysIntoPullmailTests:
    """Postfix with relayhost = [pullmail]:2525 hands mail to pullmail's MX service."""

    def message(self, tok: str, to: str) -> bytes:
        return (
            f"From: Dave <{DAVE}>\r\nTo: <{to}>\r\nSubject: relayed {tok}\r\n"
            f"Message-ID: <{tok}@postfix.test>\r\n\r\n"
            + body_for(tok).replace("\n", "\r\n") + "\r\n"
        ).encode()

    def test_relayed_mail_lands_in_the_maildir(self, node, postfix):
        tok = token()
        refused = postfix.send(DAVE, [BOB], self.message(tok, BOB), source=CLIENT_IP)
        assert refused == {}
        raw = wait_for_token(node, BOB, tok, timeout=30)
        assert_body_intact(raw, tok)
        message = parse(raw)
        assert message["Subject"] == f"relayed {tok}"
        pullmail_received, postfix_received = message.get_all("Received")[:2]
        # pullmail's own, for a connection from Postfix's address, over TLS.
        assert f"[{POSTFIX_IP}]" in pullmail_received, pullmail_received
        assert "by mx.pullmail.test (pullmail) with ESMTPS" in pullmail_received, \
            pullmail_received
        # Postfix's, for the client's submission to it.
        assert "by mx.postfix.test (Postfix)" in postfix_received, postfix_received
        assert f"[{CLIENT_IP}]" in postfix_received, postfix_received

        queue_id = re.search(r" id (\w+)", pullmail_received).group(1)
        # Postfix logged pullmail's reply to end of data, naming that id.
        postfix.wait_log(
            rf"to=<{re.escape(BOB)}>, relay={re.escape(PULLMAIL_IP)}\[{re.escape(PULLMAIL_IP)}\]"
            rf":{SMTP_PORT}, .*status=sent \(250 2\.0\.0 Ok: queued as {queue_id}\)")
        node.wait_log(rf"accepted {queue_id} from <{re.escape(DAVE)}> for "
                      rf"\['{re.escape(BOB)}'\].* via {re.escape(POSTFIX_IP)}")
        node.wait_log(rf"TLS started with {re.escape(POSTFIX_IP)}\b")
        postfix.wait_log(
            rf"TLS connection established to {re.escape(PULLMAIL_IP)}\[{re.escape(PULLMAIL_IP)}\]"
            rf":{SMTP_PORT}")

    def test_unknown_pullmail_user_bounced_by_postfix(self, node, postfix):
        """pullmail's 550 at RCPT is final for Postfix: dave gets Postfix's bounce."""
        tok = token()
        nobody = "nobody-here@pullmail.test"
        rejected = rf"{re.escape(POSTFIX_IP)} RCPT: 550 5\.1\.1 No such user here"
        before = log_count(node, rejected)
        refused = postfix.send(DAVE, [nobody], self.message(tok, nobody), source=CLIENT_IP)
        assert refused == {}
        bounce = postfix.wait_delivered(DAVE, contains=f"END {tok}".encode())[0]
        text = bounce.decode("utf-8", "replace")
        assert "MAILER-DAEMON" in text
        assert re.search(rf"<{re.escape(nobody)}>: host {re.escape(PULLMAIL_IP)}\[", text), text
        assert re.search(r"said: 550 5\.1\.1 No\s+such\s+user\s+here\s+\(in reply to RCPT TO",
                         text), text
        assert "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in text, text
        wait_log_count(node, rejected, before)
        assert not node.maildir(nobody).exists()


# -- the private Postfix stays private ------------------------------------------------


def test_private_postfix_instance_is_isolated(postfix, system_postfix_before):
    """It listens on its own address and port only, and leaves /etc/postfix alone."""
    assert postfix.listening() == {(POSTFIX_IP, POSTFIX_PORT)}
    assert postfix.postconf("-h", "queue_directory").strip() == str(postfix.queue_dir)
    assert postfix.postconf("-h", "config_directory").strip() == str(postfix.config_dir)
    master = postfix.master_pid()
    assert master is not None and master in postfix.processes()
    log = postfix.log_text()
    assert f"configuration {postfix.config_dir}" in log
    assert not re.search(r"\b(warning|fatal|panic):", log), postfix.log_tail()
    assert _system_postfix_state() == system_postfix_before
