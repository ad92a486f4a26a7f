"""
Tests for DSN (RFC 3461, 3464; issue 14 item 4): the parameters' syntax and
replies, what is kept and passed on, and what the reports honour.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail.accounts.users import Accounts
from pullmail.inbound.router import Router
from pullmail.outbound.bounce import FailedRecipient, build_dsn
from pullmail.outbound.bouncer import Reports, returned_limit
from pullmail.smtp import dsn
from pullmail.smtp.client import _envelope
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import ServerMachine, ServerPolicy
from pullmail.testing import FakeDeliveryAgent, result_of

ACCOUNTS = Accounts(frozenset({"example.org"}), users={"alice@example.org": "h",
                                                       "bob@example.org": "h"},
                    aliases={"team@example.org": ("alice@example.org", "bob@example.org")})


def _machine() -> ServerMachine:
    m = ServerMachine(ServerPolicy(hostname="mx.example.org", domains=("example.org",),
                                   accounts=ACCOUNTS), Session("192.0.2.1", "smtp"))
    assert "DSN" in m.handle("EHLO client.test").text.split("\n")
    return m


@pytest.mark.parametrize("line, reply", [
    ("MAIL FROM:<x@remote.test> RET=HDRS ENVID=abc+2Bdef", (250, "2.1.0")),
    ("MAIL FROM:<x@remote.test> RET=full", (250, "2.1.0")),
    ("MAIL FROM:<x@remote.test> RET=BODY", (501, "5.5.4")),
    ("MAIL FROM:<x@remote.test> RET", (501, "5.5.4")),
    ("MAIL FROM:<x@remote.test> ENVID=a+2", (501, "5.5.4")),          # malformed xtext
    ("MAIL FROM:<x@remote.test> ENVID=a+2b", (501, "5.5.4")),         # lower-case hex
    ("MAIL FROM:<x@remote.test> ENVID=" + "e" * 100, (250, "2.1.0")),
    ("MAIL FROM:<x@remote.test> ENVID=" + "e" * 101, (501, "5.5.4")),  # RFC 3461 4.4
    ("MAIL FROM:<x@remote.test> RET=HDRS RET=FULL", (501, "5.5.4")),   # duplicate
    ("MAIL FROM:<x@remote.test> ret=HDRS RET=HDRS", (501, "5.5.4")),   # duplicate, any case
    ("MAIL FROM:<x@remote.test> XFOO=1", (555, "5.5.4")),              # unknown, as before
])
def test_mail_parameters(line, reply):
    action = _machine().handle(line)
    assert (action.code, action.enhanced) == reply


@pytest.mark.parametrize("params, reply, kept", [
    ("NOTIFY=SUCCESS,FAILURE,DELAY", (250, "2.1.5"), {"notify": "SUCCESS,FAILURE,DELAY"}),
    ("notify=never", (250, "2.1.5"), {"notify": "NEVER"}),
    ("NOTIFY=NEVER,SUCCESS", (501, "5.5.4"), None),
    ("NOTIFY=SUCCESS,SUCCESS", (501, "5.5.4"), None),
    ("NOTIFY=SOMETIMES", (501, "5.5.4"), None),
    ("NOTIFY", (501, "5.5.4"), None),
    ("ORCPT=rfc822;bob+40example.org", (250, "2.1.5"), {"orcpt": "rfc822;bob+40example.org"}),
    ("ORCPT=RFC822;b", (250, "2.1.5"), {"orcpt": "rfc822;b"}),
    ("ORCPT=rfc822", (501, "5.5.4"), None),
    ("ORCPT=rfc822;a+zz", (501, "5.5.4"), None),
    ("ORCPT=;a", (501, "5.5.4"), None),
    ("NOTIFY=DELAY NOTIFY=DELAY", (501, "5.5.4"), None),
    ("NOTIFY=DELAY XFOO=1", (555, "5.5.4"), None),
])
def test_rcpt_parameters(params, reply, kept):
    m = _machine()
    m.handle("MAIL FROM:<x@remote.test>")
    action = m.handle(f"RCPT TO:<alice@example.org> {params}")
    assert (action.code, action.enhanced) == reply
    if kept is not None:
        assert m.envelope.rcpt_params == {"alice@example.org": kept}
    else:
        assert m.envelope.recipients == ()


@pytest.mark.parametrize("text", ["a+b=c d", "ü@x", "plain", ""])
def test_xtext_round_trip(text):
    encoded = dsn.xtext_encode(text)
    assert encoded.isascii() and "=" not in encoded and " " not in encoded
    assert dsn.xtext_decode(encoded) == text if text.isascii() else True


@pytest.mark.parametrize("notify, what, wanted", [
    (None, "FAILURE", True), (None, "DELAY", True), (None, "SUCCESS", False),
    ("NEVER", "FAILURE", False), ("NEVER", "DELAY", False),
    ("SUCCESS", "SUCCESS", True), ("SUCCESS", "FAILURE", False),
    ("FAILURE", "DELAY", False), ("DELAY,FAILURE", "DELAY", True),
])
def test_wants(notify, what, wanted):
    params = {"notify": {"a@x": notify}} if notify else {}
    assert dsn.wants(params, "a@x", what) is wanted


def test_router_keeps_params_per_final_address_and_reports_delivery():
    """An alias's NOTIFY holds for its members; NOTIFY=SUCCESS: Action: delivered."""
    delivery = FakeDeliveryAgent()
    reports = []

    class Outbound:
        def enqueue(self, queue_id, sender, recipients, chunks, origin=None, smtputf8=False,
                    dsn=None):
            reports.append((sender, recipients, b"".join(chunks)))
            return defer.succeed(None)

    router = Router("mx.example.org", ACCOUNTS, delivery, Clock(), Outbound())
    envelope = Envelope("x@remote.test", ("team@example.org",),
                        params={"RET": "HDRS", "ENVID": "id+2B1"},
                        rcpt_params={"team@example.org": {"notify": "SUCCESS",
                                                          "orcpt": "rfc822;team+40example.org"}})
    assert router.dsn_of(envelope) == {
        "ret": "HDRS", "envid": "id+2B1",
        "notify": {"alice@example.org": "SUCCESS", "bob@example.org": "SUCCESS"},
        "orcpt": {"alice@example.org": "rfc822;team+40example.org",
                  "bob@example.org": "rfc822;team+40example.org"},
    }
    message = [b"Subject: s\r\n\r\nsecret body\r\n"]
    reply = result_of(router.accept(Session("192.0.2.1", "smtp"), envelope, message, 10))
    assert reply.code == 250
    [(sender, recipients, report)] = reports
    assert (sender, recipients) == ("", ["x@remote.test"])
    assert report.count(b"Action: delivered\r\n") == 2
    assert b"Original-Envelope-Id: id+1" in report and b"secret body" not in report


def _report(recipient: FailedRecipient, **kw) -> bytes:
    """A report on C{recipient} for alice@example.org's message."""
    return build_dsn(
        reporting_mta="mx.example.org", original_sender="x@remote.test", recipients=[recipient],
        original=b"Subject: s\r\n\r\nsecret body\r\n", queue_id="Q1", arrival_date=0.0,
        now=0.0, boundary="=_b", message_id="m@mx", **kw)


def test_success_report_content():
    report = _report(
        FailedRecipient("alice@example.org", "2.0.0", None, None, "delivered",
                        "rfc822;team+40example.org"),
        envid="id+2B1", full_message_limit=returned_limit({"ret": "HDRS"}, "delivered"),
    )
    assert b"Subject: Successful Mail Delivery Report" in report
    assert b"Action: delivered\r\nStatus: 2.0.0" in report
    assert b"Original-Envelope-Id: id+1\r\n" in report
    assert b"Original-Recipient: rfc822; team@example.org\r\n" in report
    assert b"Content-Type: text/rfc822-headers" in report and b"secret body" not in report


@pytest.mark.parametrize("params, action, limit", [
    ({}, "failed", 64 * 1024), ({"ret": "HDRS"}, "failed", 0), ({"ret": "FULL"}, "failed", 65536),
    ({}, "delivered", 0), ({"ret": "FULL"}, "relayed", 65536),
])
def test_returned_limit(params, action, limit):
    assert returned_limit(params, action) == limit


def test_ret_full_returns_up_to_the_message_size():
    """RFC 3461 4.3: RET=FULL is the whole message, not a 64 KiB cut."""
    assert returned_limit({"ret": "FULL"}, "failed", 10_000_000) == 10_000_000
    assert returned_limit({"ret": "FULL"}, "delivered", 10_000_000) == 10_000_000
    assert returned_limit({}, "failed", 10_000_000) == 64 * 1024
    assert returned_limit({"ret": "HDRS"}, "failed", 10_000_000) == 0


def _reports(max_size=1_000_000, authorised=None):
    sent = []

    def send(sender, message):
        sent.append((sender, message))
        return defer.succeed(None)

    return Reports("mx.example.org", Clock(), send, authorised, max_size), sent


BIG = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 20_000 + b"\r\nTHE END\r\n"


@pytest.mark.parametrize("params, max_size, whole", [
    ({"ret": "FULL"}, 1_000_000, True),     # 320 KB, under [limits] message_size
    ({}, 1_000_000, False),                 # no RET: the 64 KiB choice (headers)
    ({"ret": "FULL"}, 100_000, False),      # over message_size + 64 KiB: headers
])
def test_reports_return_ret_full_originals_whole(params, max_size, whole):
    reports, sent = _reports(max_size)
    done = result_of(defer.Deferred.fromCoroutine(reports.send(
        queue_id="Q1", sender="x@remote.test", dsn_params=params, origin=None, arrival=0.0,
        recipients=[FailedRecipient("a@remote.test", "5.1.1", "550 no", None)],
        action="failed", original=BIG,
    )))
    assert done == ["a@remote.test"]
    [(_, report)] = sent
    assert (b"THE END" in report) is whole
    assert b"Subject: big" in report


@pytest.mark.parametrize("service, user, reported", [
    ("smtp", None, False),                 # pushed from 192.0.2.1, which SPF does not back
    ("submission", "x@remote.test", True),  # submitted: no origin to check
])
def test_router_success_report_obeys_spf(service, user, reported, logged_events):
    """SPEC 7: a success report is backscatter too when SPF does not back the sender."""
    asked = []

    def authorised(origin, sender):
        asked.append((origin, sender))
        return defer.succeed(False)

    reports, sent = _reports(authorised=authorised)
    router = Router("mx.example.org", ACCOUNTS, FakeDeliveryAgent(), Clock())
    router.reports = reports
    envelope = Envelope("x@remote.test", ("alice@example.org",),
                        rcpt_params={"alice@example.org": {"notify": "SUCCESS"}})
    session = Session("192.0.2.1", service, user=user)
    assert result_of(router.accept(session, envelope, [b"Subject: s\r\n\r\nb\r\n"], 10)).code == 250
    assert bool(sent) is reported
    assert asked == ([] if user else [("192.0.2.1", "x@remote.test")])
    if not reported:
        assert [e for e in logged_events if e.get("event") == "bounce-unauthorised-dropped"]


class _Channel:
    def __init__(self):
        self.sent = []

    def send(self, data):
        self.sent.append(data)

    def reply(self):
        return defer.succeed(Reply(250, "2.0.0", "ok"))


def test_client_passes_the_parameters_on():
    channel = _Channel()
    params = {"ret": "HDRS", "envid": "e1", "notify": {"b@y": "SUCCESS,FAILURE"},
              "orcpt": {"b@y": "rfc822;b+40y"}}
    result_of(defer.Deferred.fromCoroutine(
        _envelope(channel, "a@x", ["b@y", "c@y"], None, None, False, True, params)))
    assert channel.sent == [b"MAIL FROM:<a@x> RET=HDRS ENVID=e1\r\n"
                            b"RCPT TO:<b@y> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40y\r\n"
                            b"RCPT TO:<c@y>\r\n"]


# -- ORCPT=utf-8 (RFC 6533 3) ------------------------------------------------------------

@pytest.mark.parametrize("value, smtputf8, kept", [
    ("utf-8;j\\x{F6}s\\x{E9}@example.org", False, "utf-8;j\\x{F6}s\\x{E9}@example.org"),
    ("UTF-8;j\u00f6s\u00e9@b\u00fccher.example", True,       # unitext, kept as xtext
     "utf-8;j\\x{F6}s\\x{E9}@b\\x{FC}cher.example"),
    ("utf-8;a\\x{2B}b@example.org", False, "utf-8;a\\x{2B}b@example.org"),   # "+" escaped
    ("utf-8;\\x{1F600}@example.org", False, "utf-8;\\x{1F600}@example.org"),  # 5 digits
    ("utf-8;plain@example.org", False, "utf-8;plain@example.org"),
    ("utf-8;j\u00f6s\u00e9@example.org", False, None),    # unitext without SMTPUTF8
    ("utf-8;a\\x{00F6}@example.org", True, None),         # leading zeros
    ("utf-8;a\\x{f6}@example.org", True, None),           # lower-case hex
    ("utf-8;a\\x{41}@example.org", True, None),           # "A" is a QCHAR: never escaped
    ("utf-8;a\\x{D800}@example.org", True, None),         # a surrogate
    ("utf-8;a\\x{110000}@example.org", True, None),       # beyond Unicode
    ("utf-8;a\\x{}@example.org", True, None),
    ("utf-8;a\\b@example.org", True, None),               # a bare backslash
    ("utf-8;a+2Bb@example.org", True, None),                # "+" is no QCHAR (xtext's form)
    ("utf-8;a=b@example.org", True, None),
    ("utf-8;nobody", True, None),                          # no mailbox
    ("utf-8;a@b@example.org", True, None),
    ("utf-8;", True, None),
    ("rfc822;j\u00f6s\u00e9@example.org", True, None),     # rfc822 stays xtext
])
def test_utf8_orcpt(value, smtputf8, kept):
    result = dsn.check_rcpt_parameters({"ORCPT": value}, smtputf8)
    if kept is None:
        assert (result.code, result.enhanced) == (501, "5.5.4")
    else:
        assert result == {"orcpt": kept}
        # What is kept is again a valid ORCPT, for any peer, with or without SMTPUTF8.
        assert dsn.check_rcpt_parameters({"ORCPT": kept}, False) == {"orcpt": kept}


def test_utf8_orcpt_in_the_machine():
    """The unitext form on the command line (RFC 6531 3.3's esmtp-value) with SMTPUTF8."""
    m = _machine()
    m.handle("MAIL FROM:<x@remote.test> SMTPUTF8")
    assert m.handle("RCPT TO:<alice@example.org> ORCPT=utf-8;\u00e4li@example.org").code == 250
    assert m.envelope.rcpt_params["alice@example.org"] == {"orcpt": "utf-8;\\x{E4}li@example.org"}
    m = _machine()
    m.handle("MAIL FROM:<x@remote.test>")
    reply = m.handle("RCPT TO:<alice@example.org> ORCPT=utf-8;\u00e4li@example.org")
    assert (reply.code, reply.enhanced) == (501, "5.5.4")


def test_utf8_orcpt_echoed_and_passed_on():
    report = _report(FailedRecipient("alice@example.org", "5.1.1", None, None, "failed",
                                     "utf-8;\\x{E4}li@example.org"))
    assert b"Original-Recipient: utf-8; \\x{E4}li@example.org\r\n" in report
    channel = _Channel()
    result_of(defer.Deferred.fromCoroutine(_envelope(
        channel, "a@x", ["b@y"], None, None, False, True,
        {"orcpt": {"b@y": "utf-8;\\x{E4}li@example.org"}})))
    assert channel.sent[-1].endswith(b"RCPT TO:<b@y> ORCPT=utf-8;\\x{E4}li@example.org\r\n")
