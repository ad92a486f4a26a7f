"""
Tests for L{pullmail.node.sendmail} and L{pullmail.node.maildrop}: the
command line as Postfix takes it, the message as read, the drop file, who
may choose the sender, and the node taking a dropped message in.
"""

from __future__ import annotations

import io
import os

import email
import email.policy

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from pullmail.node import sendmail
from pullmail.node.maildrop import (
    Drop,
    Maildrop,
    drop_message,
    dsn_request,
    may_choose_sender,
    sender_for,
    with_from,
)
from pullmail.node.sendmail import SendmailError, header_recipients, parse_arguments, read_message
from pullmail.outbound.bounce import FailedRecipient
from pullmail.outbound.bouncer import Bouncer, Reports
from pullmail.smtp import replies
from pullmail.testing import result_of


def test_postfix_flags():
    args = parse_arguments(["-t", "-oi", "-f", "a@b.test", "-FCron", "-odi", "-oem", "-v",
                            "-N", "never", "-B8BITMIME", "x@y.test,z@y.test", "w@y.test"])
    assert (args.extract, args.dot_ends, args.sender, args.full_name) == (
        True, False, "a@b.test", "Cron")
    assert args.recipients == ["x@y.test", "z@y.test", "w@y.test"]
    assert args.dsn == {"notify": "never"}
    assert parse_arguments(["-Rhdrs", "-V", "id 1", "-N", "success,delay", "a@x.test"]).dsn == {
        "ret": "hdrs", "envid": "id 1", "notify": "success,delay"}
    assert parse_arguments(["-i", "--config", "f.toml", "-fme@x.test"]).config == "f.toml"
    assert parse_arguments(["-bi"]).mode == "i"


@pytest.mark.parametrize("argv, message", [
    (["-q"], "unknown option"), (["-bp"], "not supported"), (["-f"], "needs a value"),
])
def test_bad_flags(argv, message):
    with pytest.raises(SendmailError, match=message) as caught:
        parse_arguments(argv)
    assert caught.value.status == sendmail.EX_USAGE


def test_dsn_request_as_the_parameters_it_stands_for():
    """-N, -R, -V as NOTIFY, RET and ENVID (RFC 3461), the envelope id as xtext."""
    assert dsn_request("success,failure", "hdrs", "id=1 é") == {
        "notify": "SUCCESS,FAILURE", "ret": "HDRS", "envid": "id+3D1+20+C3+A9"}
    assert dsn_request() == {}
    for bad in ({"notify": "never,success"}, {"notify": "always"}, {"ret": "some"},
                {"envid": "x" * 101}):
        with pytest.raises(ValueError):
            dsn_request(**bad)


def _refused_for_alice(tmp_path, config_text: str, argv: list[str], match: str, status: int):
    """C{argv} refused for alice (uid 1000), nothing queued; the arguments."""
    config = tmp_path / "pullmail.toml"
    config.write_text('[node]\nhostname = "mx.example.org"\n' + config_text)
    args = parse_arguments(["--config", str(config), *argv])
    with pytest.raises(SendmailError, match=match) as caught:
        sendmail.send(args, io.BytesIO(b"x\n"), "alice", 1000)
    assert caught.value.status == status
    assert not (tmp_path / "var" / "maildrop").exists()
    return args


def test_a_bad_dsn_request_queues_nothing(tmp_path):
    _refused_for_alice(tmp_path, "", ["-N", "sometimes", "a@example.org"], "-N takes never",
                       sendmail.EX_USAGE)


def test_read_message():
    data = b"Subject: x\n\nline\r\n.\nafter\n"
    assert read_message(io.BytesIO(data), True, 1000) == b"Subject: x\r\n\r\nline\r\n"
    assert read_message(io.BytesIO(data), False, 1000).endswith(b".\r\nafter\r\n")
    with pytest.raises(SendmailError, match="too big") as caught:
        read_message(io.BytesIO(data), False, 10)
    assert caught.value.status == sendmail.EX_DATAERR
    with pytest.raises(SendmailError, match="no message") as caught:
        read_message(io.BytesIO(b""), True, 10)
    assert caught.value.status == sendmail.EX_NOINPUT


def test_header_recipients():
    message = (b"From: a@x.test\r\nTo: \"B\" <b@x.test>,\r\n c@x.test\r\n"
               b"Bcc: d@x.test,\r\n\te@x.test\r\nSubject: s\r\n\r\nTo: no@x.test\r\n")
    found, kept = header_recipients(message)
    assert found == ["b@x.test", "c@x.test", "d@x.test", "e@x.test"]
    assert b"Bcc" not in kept and b"e@x.test" not in kept and kept.endswith(b"no@x.test\r\n")


def test_who_chooses_the_sender():
    drop = Drop("boss@example.org", ("a@example.org",), b"")
    assert sender_for(drop, "alice", 1000, "mx.example.org", ["root"], 999) == \
        "alice@mx.example.org"
    assert sender_for(drop, "alice", 1000, "mx.example.org", ["alice"], 999) == \
        "boss@example.org"
    assert sender_for(drop, "root", 0, "mx.example.org", [], 999) == "boss@example.org"
    assert may_choose_sender("pullmail", 999, [], 999)
    own = Drop(None, ("a@example.org",), b"")
    assert sender_for(own, "root", 0, "mx.example.org", [], 999) == "root@mx.example.org"


def test_from_added_when_missing():
    assert with_from(b"Subject: s\r\n\r\nFrom: x\r\n", "u@h.test", 'Cron "D"\r\n') == \
        b'From: "Cron D" <u@h.test>\r\nSubject: s\r\n\r\nFrom: x\r\n'
    assert with_from(b"from: me@x.test\r\n\r\n", "u@h.test", None) == b"from: me@x.test\r\n\r\n"


def test_drop_file_round_trip(tmp_path):
    drop = Drop("", ("a@example.org",), b"Subject: s\r\n\r\nbody\r\n", "Name",
                {"notify": "NEVER", "envid": "E+2B1", "ret": "HDRS"})
    name = drop_message(tmp_path, drop)
    path = tmp_path / "maildrop" / "new" / name
    assert Drop.decode(path.read_bytes()) == drop
    assert oct(os.stat(tmp_path / "maildrop" / "new").st_mode & 0o7777) == "0o1733"
    assert not list((tmp_path / "maildrop" / "tmp").iterdir())
    with pytest.raises(ValueError):
        Drop.decode(b'{"version": 2}\nx')
    # Anyone may write a drop file: a DSN request the command would refuse is refused.
    for request in ('{"notify": "NEVER,SUCCESS"}', '{"ret": "ALL"}', '{"envid": "a b"}',
                    '{"orcpt": "x"}', '[]'):
        with pytest.raises(ValueError):
            Drop.decode(b'{"version": 1, "recipients": [], "dsn": %s}\nx' % request.encode())
    assert Drop.decode(b'{"version": 1, "recipients": ["a@x.test"]}\nx').dsn == {}


class _Accounts:
    def expand(self, address):
        return () if address.startswith("nobody@") else (address,)


class _Router:
    def __init__(self, reply):
        self.accounts = _Accounts()
        self.reply = reply
        self.accepted = []
        self.injected = []

    def accept(self, session, envelope, chunks, size):
        from twisted.internet.defer import succeed

        self.accepted.append((session, envelope, b"".join(chunks)))
        return succeed(self.reply)

    def inject(self, sender, recipients, chunks):
        from twisted.internet.defer import succeed

        self.injected.append((sender, recipients, b"".join(chunks)))
        return succeed("Q")


def _maildrop(tmp_path, router, max_size=1000, clock=None):
    """A Maildrop whose reports go, as in the node, through the router's inject."""
    clock = clock or Clock()
    reports = Reports("mx.example.org", clock,
                      lambda sender, report: router.inject("", [sender], [report]))
    return Maildrop(tmp_path / "maildrop", router, reports, clock,
                    lambda f, *a: maybeDeferred(f, *a), "mx.example.org", ["root"], max_size,
                    node_uid=-1)


def test_node_takes_a_dropped_message_in(tmp_path):
    router = _Router(replies.Reply(250, "2.0.0", "Ok"))
    drop_message(tmp_path, Drop(None, ("a@example.org", "nobody@example.org"),
                                b"Subject: s\r\n\r\nbody\r\n"))
    maildrop = _maildrop(tmp_path, router)
    result_of(maildrop.drain())
    [(session, envelope, data)] = router.accepted
    user = sendmail.user_name(os.getuid())
    assert (session.service, session.user) == ("sendmail", user)
    assert envelope.sender == f"{user}@mx.example.org"
    assert envelope.recipients == ("a@example.org",)
    assert data.startswith(f"From: <{user}@mx.example.org>\r\n".encode())
    [(bounce_sender, to, report)] = router.injected
    assert (bounce_sender, to) == ("", [f"{user}@mx.example.org"])
    assert b"nobody@example.org" in report and b"5.1.1" in report
    assert not list((tmp_path / "maildrop" / "new").iterdir())


def _shape(report: bytes) -> list[tuple[str, list[str]]]:
    """Each MIME part's content type and its field names (RFC 3464 2.2, 2.3)."""
    shape = []
    for part in email.message_from_bytes(report, policy=email.policy.default).walk():
        shape.append((part.get_content_type(), sorted(part.keys())))
        if part.get_content_type() == "message/delivery-status":
            shape += [("status-block", sorted(block.keys())) for block in part.get_payload()]
    return shape


class _Owner:
    """What L{Bouncer} reads of the Outbound: the stored original."""

    def __init__(self, message):
        self.outbox = self
        self.message = message

    def run_blocking(self, f, *args):
        return maybeDeferred(f, *args)

    def read_message(self, entry_id):
        return self.message


def _outbox_bounce(sender: str, recipient: str, original: bytes) -> bytes:
    """The DSN the outbox sends for a recipient a peer refused with 5.1.1."""
    from pullmail.storage.outbox import OutboxEntry

    sent = []
    reports = Reports("mx.example.org", Clock(), lambda to, report: sent.append(report))
    entry = OutboxEntry("E1", "Q1", sender, "example.org", [recipient], 0.0, len(original))
    result_of(Bouncer(_Owner(original), reports).send(
        entry, [FailedRecipient(recipient, "5.1.1", None, None)], "failed"))
    [report] = sent
    return report


def test_maildrop_bounce_is_the_one_every_dsn_is(tmp_path, logged_events):
    """
    Stop 12: the maildrop's report comes from L{Reports}, like the outbox's:
    the same parts and fields, the drop file's time as Arrival-Date, and
    the ``bounced`` event the metrics count.
    """
    router = _Router(replies.Reply(250, "2.0.0", "Ok"))
    name = drop_message(tmp_path, Drop(None, ("a@example.org", "nobody@example.org"),
                                       b"Subject: s\r\n\r\nbody\r\n"))
    os.utime(tmp_path / "maildrop" / "new" / name, (86400.0, 86400.0))
    clock = Clock()
    clock.advance(2 * 86400)
    result_of(_maildrop(tmp_path, router, clock=clock).drain())
    [(_, _, original)] = router.accepted
    [(_, [to], report)] = router.injected
    [bounced] = [e for e in logged_events if e.get("event") == "bounced"]
    assert (bounced["action"], bounced["sender"], bounced["recipients"]) == (
        "failed", to, ["nobody@example.org"])
    assert _shape(report) == _shape(_outbox_bounce(to, "nobody@example.org", original))
    parsed = email.message_from_bytes(report, policy=email.policy.default)
    [per_message, per_recipient] = next(
        p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"
    ).get_payload()
    assert per_message["Arrival-Date"] == "Fri, 02 Jan 1970 00:00:00 +0000"
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert (per_recipient["Final-Recipient"], per_recipient["Action"],
            per_recipient["Status"]) == ("rfc822; nobody@example.org", "failed", "5.1.1")


def test_maildrop_bounce_as_the_command_asked(tmp_path):
    """
    -R hdrs -V: the report returns the header only and names the envelope
    id; the recipients it knows get the request with the message.
    """
    router = _Router(replies.Reply(250, "2.0.0", "Ok"))
    request = dsn_request(notify="failure,delay", ret="hdrs", envid="job 7")
    drop_message(tmp_path, Drop(None, ("a@example.org", "nobody@example.org"),
                                b"Subject: s\r\n\r\nTHE BODY\r\n", None, request))
    result_of(_maildrop(tmp_path, router).drain())
    [(_, envelope, _)] = router.accepted
    assert envelope.params == {"RET": "HDRS", "ENVID": "job+207"}
    assert envelope.rcpt_params == {"a@example.org": {"notify": "FAILURE,DELAY"}}
    [(_, _, report)] = router.injected
    assert b"Original-Envelope-Id: job 7" in report
    assert b"Subject: s" in report and b"THE BODY" not in report


def test_maildrop_no_bounce_for_notify_never(tmp_path):
    router = _Router(replies.Reply(250, "2.0.0", "Ok"))
    drop_message(tmp_path, Drop(None, ("nobody@example.org",), b"Subject: s\r\n\r\nb\r\n",
                                None, dsn_request(notify="never")))
    result_of(_maildrop(tmp_path, router).drain())
    assert router.injected == []
    assert not list((tmp_path / "maildrop" / "new").iterdir())


def test_maildrop_never_bounces_to_the_null_sender(tmp_path, logged_events):
    """RFC 5321 4.5.5 through L{Reports}: root's ``-f ''`` gets no report, and says so."""
    router = _Router(replies.Reply(250, "2.0.0", "Ok"))
    drop_message(tmp_path, Drop("", ("nobody@example.org",), b"Subject: s\r\n\r\nb\r\n"))
    maildrop = _maildrop(tmp_path, router)
    maildrop.node_uid = os.getuid()       # the node's own user may choose the sender
    result_of(maildrop.drain())
    assert router.injected == []
    assert [e for e in logged_events if e.get("event") == "bounce-of-bounce-dropped"]
    assert not list((tmp_path / "maildrop" / "new").iterdir())


def test_node_keeps_a_message_it_could_not_store(tmp_path):
    router = _Router(replies.S451_LOCAL_ERROR)
    drop_message(tmp_path, Drop(None, ("a@example.org",), b"x\r\n"))
    maildrop = _maildrop(tmp_path, router)
    result_of(maildrop.drain())
    assert len(list((tmp_path / "maildrop" / "new").iterdir())) == 1
    assert maildrop.waiting == 0 and len(router.accepted) == 1


def test_node_sets_aside_what_it_cannot_take(tmp_path):
    router = _Router(replies.Reply(250, "2.0.0", "Ok"))
    drop_message(tmp_path, Drop(None, ("a@example.org",), b"x" * 2000))
    (tmp_path / "maildrop" / "new" / "junk").write_bytes(b"not json\n")
    result_of(_maildrop(tmp_path, router).drain())
    assert router.accepted == []
    assert len(list((tmp_path / "maildrop" / "bad").iterdir())) == 2


def test_stale_temporary_files_removed_at_start(tmp_path):
    maildrop = _maildrop(tmp_path, _Router(replies.S451_LOCAL_ERROR))
    maildrop.clock = Clock()
    maildrop.clock.advance(10 * 86400)
    (tmp_path / "maildrop" / "tmp").mkdir(parents=True)
    old, fresh = tmp_path / "maildrop" / "tmp" / "old", tmp_path / "maildrop" / "tmp" / "fresh"
    old.write_bytes(b"half")
    os.utime(old, (86400, 86400))
    fresh.write_bytes(b"half")
    os.utime(fresh, (9.5 * 86400, 9.5 * 86400))
    maildrop.start()
    maildrop.stop()
    assert sorted(p.name for p in (tmp_path / "maildrop" / "tmp").iterdir()) == ["fresh"]


def test_closed_standard_input(monkeypatch, tmp_path):
    config = tmp_path / "pullmail.toml"
    config.write_text('[node]\nhostname = "mx.example.org"\n')
    monkeypatch.setattr("sys.stdin", None)
    err = io.StringIO()
    assert sendmail.main(["--config", str(config), "a@example.org"], err=err) == \
        sendmail.EX_NOINPUT
    assert "standard input is closed" in err.getvalue()
    assert not (tmp_path / "var" / "maildrop").exists()


def test_untrusted_user_may_not_choose_the_sender(tmp_path):
    args = _refused_for_alice(tmp_path, '[sendmail]\ntrusted_users = ["ops"]\n',
                              ["-f", "boss@example.org", "a@example.org"],
                              "-f is not allowed for alice", sendmail.EX_NOPERM)
    sendmail.send(args, io.BytesIO(b"x\n"), "ops", 1001)
    [name] = (tmp_path / "var" / "maildrop" / "new").iterdir()
    assert Drop.decode(name.read_bytes()).sender == "boss@example.org"
