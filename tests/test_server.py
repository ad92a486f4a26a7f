"""
Tests for L{pullmail.smtp.server}: the ESMTP state machine, driven by
command lines, without any I/O.
"""

from __future__ import annotations

import base64

import pytest

from pullmail.accounts.users import Accounts
from pullmail.smtp import replies
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import (
    HANDLERS,
    TRANSITIONS,
    Authenticate,
    BeginData,
    CheckPush,
    CheckSender,
    Close,
    Deliver,
    ServerMachine,
    ServerPolicy,
    StartTLS,
    State,
)

DOMAIN = "example.org"


def _accounts() -> Accounts:
    # The machine never checks passwords itself, so the hashes are dummies.
    return Accounts(
        frozenset({DOMAIN}),
        users={"alice@example.org": "$scrypt$x", "bob@example.org": "$scrypt$x"},
        aliases={
            "sales@example.org": ("alice@example.org", "bob@example.org"),
            "info@example.org": ("bob@example.org",),
        },
    )


def _policy(service: str = "smtp", **kw) -> ServerPolicy:
    defaults = dict(
        hostname="mx.example.org",
        domains=(DOMAIN,),
        accounts=_accounts(),
        service=service,
        max_size=10_000,
        max_recipients=3,
        tls_available=True,
    )
    defaults.update(kw)
    return ServerPolicy(**defaults)


def _machine(service: str = "smtp", tls: bool = False, **kw) -> ServerMachine:
    return ServerMachine(_policy(service, **kw), Session("192.0.2.1", service, tls=tls))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _authenticated(service: str = "submission", user: str = "alice@example.org"):
    """A submission machine after EHLO under TLS and a successful AUTH."""
    m = _machine(service, tls=True)
    m.handle("EHLO client.test")
    request = m.handle("AUTH PLAIN " + _b64(f"\0{user}\0secret"))
    assert isinstance(request, Authenticate)
    assert m.resolve(request, True).code == 235
    return m


def _to_state(m: ServerMachine, state: State) -> ServerMachine:
    """Drive C{m} (an MX machine) into C{state} with valid commands."""
    if state is State.CONNECTED:
        return m
    m.handle("EHLO client.test")
    if state is State.READY:
        return m
    assert m.handle("MAIL FROM:<x@remote.test>").code == 250
    if state is State.MAIL:
        return m
    assert m.handle("RCPT TO:<alice@example.org>").code == 250
    assert m.state is State.RCPT
    return m


def _code(action) -> tuple[int, str]:
    assert isinstance(action, Reply), action
    return action.code, action.enhanced


C, R, M, T = State.CONNECTED, State.READY, State.MAIL, State.RCPT
NEED_EHLO = (503, "5.5.1")
SEQUENCE = (503, "5.5.1")
# (state, command, (code, enhanced), state after), written by hand.
SEQUENCE_TABLE = [
    *[(s, "EHLO client.test", (250, ""), R) for s in (C, R, M, T)],
    *[(s, "HELO client.test", (250, ""), R) for s in (C, R, M, T)],
    (C, "MAIL FROM:<x@remote.test>", NEED_EHLO, C),
    (R, "MAIL FROM:<x@remote.test>", (250, "2.1.0"), M),
    (M, "MAIL FROM:<x@remote.test>", SEQUENCE, M),
    (T, "MAIL FROM:<x@remote.test>", SEQUENCE, T),
    (C, "RCPT TO:<bob@example.org>", NEED_EHLO, C),
    (R, "RCPT TO:<bob@example.org>", SEQUENCE, R),
    (M, "RCPT TO:<bob@example.org>", (250, "2.1.5"), T),
    (T, "RCPT TO:<bob@example.org>", (250, "2.1.5"), T),
    (C, "DATA", NEED_EHLO, C),
    (R, "DATA", SEQUENCE, R),
    (M, "DATA", SEQUENCE, M),
    (T, "DATA", (354, ""), State.DATA),
    (C, "RSET", (250, "2.0.0"), C),
    (R, "RSET", (250, "2.0.0"), R),
    (M, "RSET", (250, "2.0.0"), R),
    (T, "RSET", (250, "2.0.0"), R),
    *[(s, "NOOP", (250, "2.0.0"), s) for s in (C, R, M, T)],
    *[(s, "QUIT", (221, "2.0.0"), State.CLOSED) for s in (C, R, M, T)],
    *[(s, "VRFY alice", (252, "2.5.0"), s) for s in (C, R, M, T)],
    *[(s, "HELP", (214, "2.0.0"), s) for s in (C, R, M, T)],
    (C, "STARTTLS", NEED_EHLO, C),
    (R, "STARTTLS", (220, "2.0.0"), R),     # CONNECTED once TLS is up
    (M, "STARTTLS", SEQUENCE, M),
    (T, "STARTTLS", SEQUENCE, T),
    (C, "AUTH PLAIN", NEED_EHLO, C),
    (R, "AUTH PLAIN", (502, "5.5.1"), R),   # no AUTH on the MX service
    (M, "AUTH PLAIN", SEQUENCE, M),
    (T, "AUTH PLAIN", SEQUENCE, T),
]


class TestAllowedTable:
    """Every verb in every state gets its proper reply or a 503."""

    @pytest.mark.parametrize(
        "state, line, code, after", SEQUENCE_TABLE,
        ids=[f"{s.name}-{line.split()[0]}" for s, line, _, _ in SEQUENCE_TABLE],
    )
    def test_every_state_and_verb(self, state, line, code, after):
        """
        Each verb in each state gets the reply and leads to the state
        written down by hand above (RFC 5321 3.3, 4.1.4), not read from the
        table under test.
        """
        m = _to_state(_machine(), state)
        action = m.handle(line)
        reply = action if isinstance(action, Reply) else action.reply
        assert (reply.code, reply.enhanced) == code
        assert m.state is after

    def test_transitions_cover_every_core_verb(self):
        """Every verb with a handler is allowed somewhere, and nothing else is."""
        assert {verb for _, verb in TRANSITIONS} == set(HANDLERS)

    def test_forbidden_verbs_close(self):
        """HTTP and proxy verbs close at once (Postfix smtpd_forbidden_commands)."""
        for line in ("GET / HTTP/1.1", "POST /x HTTP/1.0", "CONNECT a:25 HTTP/1.1",
                     "HEAD /", "PUT /", "USER root"):
            m = _machine()
            action = m.handle(line)
            assert isinstance(action, Close)
            assert (action.reply.code, action.reply.enhanced) == (554, "5.5.0")
            assert m.state is State.CLOSED

    def test_connected_needs_ehlo(self):
        """Before EHLO/HELO, MAIL, RCPT and DATA are 503 5.5.1."""
        for line in ("MAIL FROM:<a@b.test>", "RCPT TO:<alice@example.org>", "DATA"):
            assert _code(_machine().handle(line)) == (503, "5.5.1")

    def test_nested_mail(self):
        """A second MAIL in a transaction is a 503."""
        m = _to_state(_machine(), State.MAIL)
        assert m.handle("MAIL FROM:<y@remote.test>").code == 503
        assert m.envelope.sender == "x@remote.test"

    def test_data_in_ready_is_503(self):
        """DATA with no MAIL is 503 5.5.1."""
        m = _to_state(_machine(), State.READY)
        assert _code(m.handle("DATA")) == (503, "5.5.1")

    def test_unknown_verb(self):
        """An unknown verb is 500 5.5.1 in any state, and changes nothing."""
        for state in (State.CONNECTED, State.READY, State.MAIL, State.RCPT):
            m = _to_state(_machine(), state)
            assert _code(m.handle("FOOBAR x")) == (500, "5.5.1")
            assert _code(m.handle("")) == (500, "5.5.1")
            assert m.state is state

    def test_after_quit(self):
        """QUIT closes with 221; anything after it is refused."""
        m = _to_state(_machine(), State.READY)
        action = m.handle("QUIT")
        assert isinstance(action, Close)
        assert action.reply.code == 221
        assert m.state is State.CLOSED
        assert m.handle("NOOP").code == 503

    def test_verbs_case_insensitive(self):
        """Verbs and the FROM:/TO: keywords are case-insensitive."""
        m = _machine()
        assert m.handle("ehlo client.test").code == 250
        assert m.handle("mail from:<x@remote.test>").code == 250
        assert m.handle("rcpt to:<alice@example.org>").code == 250

    def test_rset_ends_transaction(self):
        """RSET in a transaction answers 250 and forgets the envelope."""
        m = _to_state(_machine(), State.RCPT)
        assert m.handle("RSET").code == 250
        assert m.state is State.READY
        assert m.envelope is None
        assert m.handle("RCPT TO:<alice@example.org>").code == 503

    def test_rset_before_ehlo(self):
        """RSET before EHLO is 250 but does not count as a greeting."""
        m = _machine()
        assert m.handle("RSET").code == 250
        assert m.state is State.CONNECTED

    def test_ehlo_resets_transaction(self):
        """EHLO inside a transaction clears it (RFC 5321 4.1.4)."""
        m = _to_state(_machine(), State.RCPT)
        assert m.handle("EHLO again.test").code == 250
        assert m.state is State.READY
        assert m.envelope is None

    def test_noop_vrfy_help(self):
        """NOOP is 250, VRFY 252 (RFC 5321 3.5.3), HELP 214."""
        m = _machine()
        assert m.handle("NOOP").code == 250
        assert m.handle("VRFY alice").code == 252
        assert m.handle("HELP").code == 214


class TestGreeting:
    """EHLO, HELO and the keywords each service advertises."""

    def keywords(self, m: ServerMachine) -> list[str]:
        reply = m.handle("EHLO client.test")
        assert reply.code == 250
        lines = reply.text.split("\n")
        assert "mx.example.org" in lines[0]
        return lines[1:]

    def test_greeting(self):
        """The greeting is 220 with the hostname."""
        reply = _machine().greeting()
        assert reply.code == 220
        assert reply.text.startswith("mx.example.org ")
        assert reply.render().startswith(b"220 mx.example.org")

    def test_mx_plain(self):
        """MX before TLS: STARTTLS, SIZE with the limit, no AUTH."""
        keywords = self.keywords(_machine("smtp"))
        assert "STARTTLS" in keywords
        assert "SIZE 10000" in keywords
        assert "PIPELINING" in keywords
        assert "8BITMIME" in keywords
        assert "ENHANCEDSTATUSCODES" in keywords
        assert not [k for k in keywords if k.startswith("AUTH")]

    def test_mx_tls(self):
        """MX under TLS: no STARTTLS and still no AUTH."""
        keywords = self.keywords(_machine("smtp", tls=True))
        assert "STARTTLS" not in keywords
        assert not [k for k in keywords if k.startswith("AUTH")]

    def test_mx_without_tls_available(self):
        """No STARTTLS is offered when no certificate is available."""
        assert "STARTTLS" not in self.keywords(_machine("smtp", tls_available=False))

    def test_submission_plain(self):
        """Submission before TLS: STARTTLS, AUTH not offered (SPEC 8)."""
        keywords = self.keywords(_machine("submission"))
        assert "STARTTLS" in keywords
        assert not [k for k in keywords if k.startswith("AUTH")]

    def test_submission_tls(self):
        """Submission under TLS: AUTH PLAIN LOGIN, no STARTTLS."""
        keywords = self.keywords(_machine("submission", tls=True))
        assert "STARTTLS" not in keywords
        assert "AUTH PLAIN LOGIN" in keywords

    def test_submissions_implicit_tls(self):
        """Submissions (implicit TLS): AUTH offered, STARTTLS not."""
        keywords = self.keywords(_machine("submissions", tls=True, tls_available=False))
        assert "STARTTLS" not in keywords
        assert "AUTH PLAIN LOGIN" in keywords

    def test_no_auth_after_auth(self):
        """Once authenticated, AUTH is no longer advertised."""
        m = _authenticated()
        assert not [k for k in self.keywords(m) if k.startswith("AUTH")]

    def test_helo(self):
        """HELO is a one-line 250 with no keywords and not ESMTP."""
        m = _machine()
        reply = m.handle("HELO client.test")
        assert reply.code == 250
        assert "\n" not in reply.text
        assert not m.session.esmtp
        assert m.session.helo == "client.test"

    def test_ehlo_needs_argument(self):
        """EHLO without a domain is 501."""
        m = _machine()
        assert m.handle("EHLO").code == 501
        assert m.handle("HELO").code == 501
        assert m.state is State.CONNECTED

    def test_ehlo_control_characters(self):
        """
        An EHLO argument holding a control character (a bare CR) is refused
        with 501: it would end up inside the Received header.
        """
        m = _machine()
        assert m.handle("EHLO evil\rX-Injected:yes").code == 501


class TestMail:
    """MAIL FROM and its parameters (RFC 1870 SIZE, RFC 6152 BODY)."""

    def setup_method(self):
        self.m = _to_state(_machine(), State.READY)

    def test_accepted(self):
        """A plain MAIL is 250 2.1.0 and opens a transaction."""
        assert _code(self.m.handle("MAIL FROM:<x@remote.test>")) == (250, "2.1.0")
        assert self.m.state is State.MAIL
        assert self.m.envelope.sender == "x@remote.test"

    def test_null_sender(self):
        """The null reverse-path is accepted as an empty sender."""
        assert self.m.handle("MAIL FROM:<>").code == 250
        assert self.m.envelope.sender == ""

    def test_bad_syntax(self):
        """A malformed path is 501 5.1.7 and no transaction starts."""
        for line in ("MAIL FROM:x@remote.test", "MAIL FROM:<x@@remote.test>", "MAIL TO:<x@r.test>"):
            assert _code(self.m.handle(line)) == (501, "5.1.7"), line
            assert self.m.state is State.READY

    def test_size(self):
        """SIZE within the limit is kept in the envelope."""
        assert self.m.handle("MAIL FROM:<x@remote.test> SIZE=9999").code == 250
        assert self.m.envelope.size == 9999

    def test_size_too_big(self):
        """SIZE above the limit is 552 5.3.4 (RFC 1870 6)."""
        assert _code(self.m.handle("MAIL FROM:<x@remote.test> SIZE=10001")) == (552, "5.3.4")
        assert self.m.state is State.READY

    def test_size_bad(self):
        """A non-numeric SIZE is 501."""
        for value in ("abc", "-1", "1e3"):
            assert self.m.handle(f"MAIL FROM:<x@remote.test> SIZE={value}").code == 501, value
        assert self.m.handle("MAIL FROM:<x@remote.test> SIZE").code == 501

    def test_body(self):
        """BODY=7BIT and BODY=8BITMIME are accepted, any case."""
        assert self.m.handle("MAIL FROM:<x@remote.test> BODY=8bitmime").code == 250
        assert self.m.envelope.body == "8BITMIME"
        self.m.handle("RSET")
        assert self.m.handle("MAIL FROM:<x@remote.test> BODY=7BIT").code == 250

    def test_body_bad(self):
        """BODY=BINARYMIME is not offered: 501."""
        assert self.m.handle("MAIL FROM:<x@remote.test> BODY=BINARYMIME").code == 501

    def test_unknown_param(self):
        """An unknown MAIL parameter is 555 5.5.4 (RFC 5321 4.1.1.11)."""
        assert _code(self.m.handle("MAIL FROM:<x@remote.test> FOO=BAR")) == (555, "5.5.4")
        assert self.m.state is State.READY

    def test_params_need_ehlo(self):
        """After HELO (no extensions offered) a MAIL parameter is 555 (RFC 5321 4.1.1.11)."""
        m = _machine()
        m.handle("HELO client.test")
        assert m.handle("MAIL FROM:<x@remote.test> SIZE=10").code == 555
        assert m.handle("MAIL FROM:<x@remote.test>").code == 250

    def test_own_domain_sender_is_checked(self):
        """
        A sender in one of our own domains arriving on the MX service is
        checked before MAIL is accepted (SPEC 6, the seed paper's forgery);
        the verdict decides.
        """
        m = _to_state(_machine(), State.READY)
        request = m.handle("MAIL FROM:<secr@example.org>")
        assert isinstance(request, CheckSender)
        assert request.envelope.sender == "secr@example.org"
        assert m.state is State.READY
        assert _code(m.resolve(request, replies.S550_SPF_FAIL)) == (550, "5.7.23")
        assert m.state is State.READY
        request = m.handle("MAIL FROM:<secr@example.org>")
        assert m.resolve(request, None).code == 250
        assert m.state is State.MAIL

    def test_foreign_sender_not_checked(self):
        """Senders of other domains need no check at MAIL."""
        m = _to_state(_machine(), State.READY)
        assert m.handle("MAIL FROM:<x@remote.test>").code == 250

    def test_own_domain_sender_on_submission_not_checked(self):
        """On submission the login binds the sender instead of SPF."""
        m = _authenticated()
        assert m.handle("MAIL FROM:<alice@example.org>").code == 250

    def test_push_policy_checked_at_data(self):
        """
        With [trust] push other than accept, DATA asks the glue (not MAIL,
        which a GDEL transaction shares); a refusal ends the transaction.
        """
        m = _to_state(_machine(push="refuse"), State.READY)
        assert m.handle("MAIL FROM:<x@remote.test>").code == 250
        assert m.handle("RCPT TO:<alice@example.org>").code == 250
        request = m.handle("DATA")
        assert isinstance(request, CheckPush)
        refusal = replies.S550_POLICY.with_text("Push not accepted")
        assert m.resolve(request, refusal) == refusal
        assert m.state is State.READY
        m.handle("MAIL FROM:<x@remote.test>")
        m.handle("RCPT TO:<alice@example.org>")
        action = m.resolve(m.handle("DATA"), None)
        assert isinstance(action, BeginData)
        assert m.state is State.DATA


class TestRcpt:
    """RCPT TO: local users, aliases, the relay rule and the limit."""

    def setup_method(self):
        self.m = _to_state(_machine(), State.MAIL)

    def test_local_user(self):
        """A known local user is 250 2.1.5, stored normalised."""
        assert _code(self.m.handle("RCPT TO:<Alice@Example.ORG>")) == (250, "2.1.5")
        assert self.m.envelope.recipients == ("alice@example.org",)
        assert self.m.state is State.RCPT

    def test_alias(self):
        """An alias is a valid recipient."""
        assert self.m.handle("RCPT TO:<sales@example.org>").code == 250

    def test_postmaster(self):
        """<postmaster> and postmaster@domain always exist (RFC 5321 4.5.1)."""
        assert self.m.handle("RCPT TO:<Postmaster>").code == 250
        assert self.m.handle("RCPT TO:<postmaster@example.org>").code == 250
        assert self.m.envelope.recipients == ("postmaster@example.org",)

    def test_unknown_user(self):
        """An unknown local user is 550 5.1.1."""
        assert _code(self.m.handle("RCPT TO:<nobody@example.org>")) == (550, "5.1.1")
        assert self.m.state is State.MAIL

    def test_bad_syntax(self):
        """A malformed path is 501 5.1.3."""
        assert _code(self.m.handle("RCPT TO:alice@example.org")) == (501, "5.1.3")

    def test_params_refused(self):
        """RCPT parameters other than DSN's are not supported: 555 5.5.4."""
        assert _code(self.m.handle("RCPT TO:<alice@example.org> XFOO=1")) == (555, "5.5.4")

    def test_duplicate_once(self):
        """The same recipient twice is stored once."""
        self.m.handle("RCPT TO:<alice@example.org>")
        self.m.handle("RCPT TO:<ALICE@example.org>")
        assert self.m.envelope.recipients == ("alice@example.org",)

    def test_limit(self):
        """Past the recipient limit: 452 4.5.3 (RFC 5321 4.5.3.1.10)."""
        self.m.handle("RCPT TO:<alice@example.org>")
        self.m.handle("RCPT TO:<bob@example.org>")
        self.m.handle("RCPT TO:<sales@example.org>")
        assert _code(self.m.handle("RCPT TO:<info@example.org>")) == (452, "4.5.3")
        assert len(self.m.envelope.recipients) == 3
        assert self.m.state is State.RCPT

    def test_relay_denied(self):
        """On the MX, tricks and remote domains are 550 5.7.1 Relaying denied."""
        for path in (
            "<x@remote.test>",
            "<@example.org:x@remote.test>",
            '<"x@remote.test"@example.org>',
            "<x%remote.test@example.org>",
            "<remote.test!x@example.org>",
            "<alice@[192.0.2.1]>",
            "<alice@sub.example.org>",
            "<postmaster@remote.test>",
        ):
            assert _code(self.m.handle(f"RCPT TO:{path}")) == (550, "5.7.1"), path
        assert self.m.state is State.MAIL
        assert self.m.envelope.recipients == ()

    def test_data(self):
        """DATA after a recipient asks the glue to read with the size limit."""
        self.m.handle("RCPT TO:<alice@example.org>")
        action = self.m.handle("DATA")
        assert isinstance(action, BeginData)
        assert action.reply.code == 354
        assert action.max_size == 10_000
        assert self.m.state is State.DATA
        assert self.m.handle("NOOP").code == 503

    def test_data_received(self):
        """The message read becomes a Deliver request; then back to READY."""
        self.m.handle("RCPT TO:<alice@example.org>")
        self.m.handle("DATA")
        request = self.m.data_received([b"Subject: x\r\n\r\nhi\r\n"], 17, None)
        assert isinstance(request, Deliver)
        assert request.envelope.recipients == ("alice@example.org",)
        assert request.envelope.sender == "x@remote.test"
        assert request.chunks == [b"Subject: x\r\n\r\nhi\r\n"]
        assert self.m.state is State.READY
        ok = Reply(250, "2.0.0", "Ok: queued as X")
        assert self.m.resolve(request, ok) == ok

    def test_data_refused(self):
        """A refused message (bare LF...) returns the refusal and ends the transaction."""
        self.m.handle("RCPT TO:<alice@example.org>")
        self.m.handle("DATA")
        action = self.m.data_received([], 0, replies.S550_BARE_LINE_ENDING)
        assert action == replies.S550_BARE_LINE_ENDING
        assert self.m.state is State.READY
        assert self.m.envelope is None


class TestSubmission:
    """Submission: TLS, then AUTH, then only one's own addresses (SPEC 8)."""

    def test_mail_before_tls(self):
        """MAIL on submission before TLS is 530 5.7.0."""
        m = _machine("submission")
        m.handle("EHLO client.test")
        assert _code(m.handle("MAIL FROM:<alice@example.org>")) == (530, "5.7.0")

    def test_mail_before_auth(self):
        """MAIL under TLS but before AUTH is 530 5.7.0 Authentication required."""
        m = _machine("submission", tls=True)
        m.handle("EHLO client.test")
        reply = m.handle("MAIL FROM:<alice@example.org>")
        assert _code(reply) == (530, "5.7.0")
        assert reply == replies.S530_NEED_AUTH
        assert m.state is State.READY

    def test_own_address(self):
        """The authenticated user may send as herself, any case."""
        m = _authenticated()
        assert m.handle("MAIL FROM:<Alice@EXAMPLE.org>").code == 250

    def test_alias_owned(self):
        """...and as an alias that expands to her."""
        m = _authenticated()
        assert m.handle("MAIL FROM:<sales@example.org>").code == 250

    def test_not_owned(self):
        """Anyone else's address: 553 5.7.1 not owned."""
        m = _authenticated()
        for sender in ("bob@example.org", "info@example.org", "alice@remote.test", ""):
            reply = m.handle(f"MAIL FROM:<{sender}>")
            assert _code(reply) == (553, "5.7.1"), sender
            assert "not owned" in reply.text
            assert m.state is State.READY

    def test_relay_after_auth(self):
        """An authenticated user may send to other domains."""
        m = _authenticated()
        m.handle("MAIL FROM:<alice@example.org>")
        assert m.handle("RCPT TO:<friend@remote.test>").code == 250
        assert m.envelope.recipients == ("friend@remote.test",)

    def test_tricks_after_auth(self):
        """Even after AUTH, routing tricks in a local domain are refused."""
        m = _authenticated()
        m.handle("MAIL FROM:<alice@example.org>")
        for path in ('<"x@remote.test"@example.org>', "<x%remote.test@example.org>",
                     "<a@[192.0.2.9]>"):
            assert m.handle(f"RCPT TO:{path}").code == 550, path


class TestAuth:
    """AUTH PLAIN (RFC 4616) and LOGIN, under RFC 4954."""

    def setup_method(self):
        self.m = _machine("submission", tls=True)
        self.m.handle("EHLO client.test")

    def test_plain_initial_response(self):
        """AUTH PLAIN with an initial response asks to check the identity."""
        request = self.m.handle("AUTH PLAIN " + _b64("\0Alice@example.org\0s3cret"))
        assert request == Authenticate("alice@example.org", "s3cret")
        assert _code(self.m.resolve(request, True)) == (235, "2.7.0")
        assert self.m.session.user == "alice@example.org"

    def test_plain_with_matching_authzid(self):
        """An authzid equal to the user is fine."""
        request = self.m.handle("AUTH PLAIN " + _b64("alice@example.org\0alice@example.org\0pw"))
        assert isinstance(request, Authenticate)

    def test_plain_authzid_mismatch(self):
        """An authzid naming someone else is 535 5.7.8."""
        reply = self.m.handle("AUTH PLAIN " + _b64("bob@example.org\0alice@example.org\0pw"))
        assert _code(reply) == (535, "5.7.8")
        assert self.m.state is State.READY
        assert self.m.session.user is None

    def test_plain_challenge(self):
        """AUTH PLAIN alone gets an empty 334, then takes the response."""
        reply = self.m.handle("AUTH PLAIN")
        assert reply.code == 334
        assert reply.render(enhanced=False) == b"334 \r\n"
        assert self.m.state is State.AUTH
        request = self.m.handle(_b64("\0alice@example.org\0pw"))
        assert request == Authenticate("alice@example.org", "pw")
        assert self.m.state is State.READY

    def test_bad_credentials(self):
        """A refused identity is 535 5.7.8 and the session stays anonymous."""
        request = self.m.handle("AUTH PLAIN " + _b64("\0alice@example.org\0wrong"))
        assert _code(self.m.resolve(request, False)) == (535, "5.7.8")
        assert self.m.session.user is None
        assert self.m.handle("MAIL FROM:<alice@example.org>").code == 530

    def test_bad_base64(self):
        """Undecodable base64 is 501 5.5.2, in both forms."""
        assert _code(self.m.handle("AUTH PLAIN !!!notbase64")) == (501, "5.5.2")
        assert self.m.state is State.READY
        self.m.handle("AUTH PLAIN")
        assert _code(self.m.handle("%%%")) == (501, "5.5.2")
        assert self.m.state is State.READY
        self.m.handle("AUTH LOGIN")
        assert _code(self.m.handle("%%%")) == (501, "5.5.2")
        assert self.m.state is State.READY

    def test_plain_malformed(self):
        """A PLAIN message without two NULs is 501."""
        assert self.m.handle("AUTH PLAIN " + _b64("alice@example.org")).code == 501

    def test_cancel(self):
        """A '*' response cancels the exchange with 501 (RFC 4954 4)."""
        self.m.handle("AUTH PLAIN")
        assert self.m.handle("*").code == 501
        assert self.m.state is State.READY
        self.m.handle("AUTH LOGIN")
        self.m.handle(_b64("alice@example.org"))
        assert self.m.handle("*").code == 501
        assert self.m.state is State.READY
        assert self.m.handle("NOOP").code == 250

    def test_login(self):
        """AUTH LOGIN prompts for user then password, base64-encoded."""
        reply = self.m.handle("AUTH LOGIN")
        assert (reply.code, base64.b64decode(reply.text)) == (334, b"Username:")
        reply = self.m.handle(_b64("alice@example.org"))
        assert (reply.code, base64.b64decode(reply.text)) == (334, b"Password:")
        request = self.m.handle(_b64("pw"))
        assert request == Authenticate("alice@example.org", "pw")
        assert self.m.resolve(request, True).code == 235

    def test_login_initial_response(self):
        """AUTH LOGIN with the user name inline goes straight to the password."""
        reply = self.m.handle("AUTH LOGIN " + _b64("alice@example.org"))
        assert base64.b64decode(reply.text) == b"Password:"
        assert self.m.handle(_b64("pw")) == Authenticate("alice@example.org", "pw")

    def test_unknown_mechanism(self):
        """An unknown mechanism is 504 5.5.4."""
        assert _code(self.m.handle("AUTH CRAM-MD5")) == (504, "5.5.4")

    def test_already_authenticated(self):
        """A second AUTH is 503."""
        m = _authenticated()
        assert m.handle("AUTH PLAIN " + _b64("\0alice@example.org\0pw")).code == 503

    def test_auth_in_transaction(self):
        """AUTH during a transaction is 503 (RFC 4954 4)."""
        m = _authenticated()
        m.handle("MAIL FROM:<alice@example.org>")
        assert m.handle("AUTH PLAIN").code == 503

    def test_before_tls(self):
        """AUTH on submission before TLS is 530 5.7.0, and no exchange starts."""
        m = _machine("submission")
        m.handle("EHLO client.test")
        assert _code(m.handle("AUTH PLAIN " + _b64("\0alice@example.org\0pw"))) == (530, "5.7.0")
        assert m.state is State.READY

    def test_on_mx(self):
        """AUTH on the MX service is 502, even under TLS."""
        for tls in (False, True):
            m = _machine("smtp", tls=tls)
            m.handle("EHLO client.test")
            auth = m.handle("AUTH PLAIN " + _b64("\0alice@example.org\0pw"))
            assert _code(auth) == (502, "5.5.1")


class TestStartTLS:
    """STARTTLS and what the handshake forgets (RFC 3207 4.2)."""

    def test_request(self):
        """STARTTLS after EHLO asks the glue to start TLS with a 220."""
        m = _to_state(_machine(), State.READY)
        action = m.handle("STARTTLS")
        assert isinstance(action, StartTLS)
        assert action.reply.code == 220

    def test_unavailable(self):
        """Without a certificate: 454 4.7.0."""
        m = _to_state(_machine(tls_available=False), State.READY)
        assert _code(m.handle("STARTTLS")) == (454, "4.7.0")

    def test_twice(self):
        """Under TLS already: 503."""
        m = _to_state(_machine(tls=True), State.READY)
        assert m.handle("STARTTLS").code == 503

    def test_argument(self):
        """STARTTLS takes no argument: 501."""
        m = _to_state(_machine(), State.READY)
        assert m.handle("STARTTLS now").code == 501

    def test_tls_started_resets(self):
        """After the handshake the session needs EHLO again and knows nothing."""
        m = _to_state(_machine("submission"), State.READY)
        m.session = m.session.evolve(user="mallory@example.org")
        m.envelope = Envelope("x@remote.test")
        m.tls_started()
        assert m.state is State.CONNECTED
        assert m.session.tls
        assert m.session.helo == ""
        assert m.session.user is None
        assert m.envelope is None
        assert m.handle("MAIL FROM:<alice@example.org>").code == 503
        assert m.handle("EHLO client.test").code == 250


class TestBlockedAuth:
    def test_blocked_address_is_disconnected(self):
        """An AUTH answered with a refusal reply (the address is blocked) closes."""
        m = _machine("submission", tls=True)
        m.handle("EHLO client.test")
        request = m.handle("AUTH PLAIN " + _b64("\0alice@example.org\0secret"))
        action = m.resolve(request, replies.S421_BLOCKED)
        assert isinstance(action, Close)
        assert action.reply == replies.S421_BLOCKED
        assert m.session.user is None
