"""
Tests for L{pullmail.pull.verbs}: the GDEL and RETR verbs on the server
machine (SPEC 1-4), and the L{TurnMachine} that serves the SMTA's reversed
turn.  Lines in, actions out; no I/O.
"""

from __future__ import annotations

from pullmail.accounts.users import Accounts
from pullmail.pull.verbs import Notify, Retrieve, TurnMachine, pull_extension
from pullmail.smtp import replies
from pullmail.smtp.envelope import Session
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import (
    BeginData,
    Close,
    Deliver,
    EndTurn,
    Reverse,
    ServerMachine,
    ServerPolicy,
    State,
)

DOMAIN = "example.org"
GOOD_ID = "Abc_-123456789xyz"  # 17 characters
PEER = "192.0.2.7"

# ServerMachine.__init__ maps Deliver to ServerMachine._resolve_delivery (the
# base-class function), so TurnMachine's override never runs: resolving the
# delivery gives a bare Reply, not EndTurn, and the turn never ends.


def _policy(service: str = "smtp", **kw) -> ServerPolicy:
    return ServerPolicy(**kw,
        hostname="mx.example.org",
        domains=(DOMAIN,),
        accounts=Accounts(
            frozenset({DOMAIN}),
            users={"alice@example.org": "h", "bob@example.org": "h", "carol@example.org": "h"},
        ),
        service=service,
        max_size=10_000,
        max_recipients=5,
        tls_available=True,
    )


def _machine(service: str = "smtp", bare_gdel: bool = True, ehlo: bool = True,
             tls: bool = False) -> ServerMachine:
    m = ServerMachine(_policy(service), Session(PEER, service, tls=tls),
                      (pull_extension(bare_gdel),))
    if ehlo:
        assert m.handle("EHLO sender.example").code == 250
    return m


def _code(action) -> tuple[int, str]:
    assert isinstance(action, Reply), action
    return action.code, action.enhanced


def _keywords(reply: Reply) -> list[str]:
    return [line.split(" ")[0] for line in reply.text.split("\n")[1:]]


class TestEHLOKeyword:
    def test_mx_offers_gdel_and_retr(self) -> None:
        """SPEC 1: GDEL and RETR in the EHLO reply on the MX service."""
        m = _machine(ehlo=False)
        keywords = _keywords(m.handle("EHLO sender.example"))
        assert "GDEL" in keywords
        assert "RETR" in keywords

    def test_submission_offers_neither(self) -> None:
        """SPEC 1: both are absent on the submission services."""
        for service in ("submission", "submissions"):
            m = _machine(service, ehlo=False, tls=True)
            keywords = _keywords(m.handle("EHLO client.example"))
            assert "GDEL" not in keywords, service
            assert "RETR" not in keywords, service


class TestGDEL:
    def _in_transaction(self, m: ServerMachine) -> ServerMachine:
        assert m.handle("MAIL FROM:<alice@sender.example> SIZE=500").code == 250
        assert m.handle("RCPT TO:<bob@example.org>").code == 250
        return m

    def test_transaction_form(self) -> None:
        """GDEL after an accepted RCPT asks to check the notification with its envelope."""
        m = self._in_transaction(_machine())
        request = m.handle(f"GDEL {GOOD_ID}")
        assert isinstance(request, Notify)
        assert request.gdel_id == GOOD_ID
        assert request.envelope.sender == "alice@sender.example"
        assert request.envelope.recipients == ("bob@example.org",)
        assert request.envelope.size == 500
        assert request.session.helo == "sender.example"

    def test_resolution_ends_transaction(self) -> None:
        """GDEL ends the transaction in place of DATA, whatever the verdict."""
        for verdict in (Reply(250, "2.0.0", f"{GOOD_ID} notification accepted"),
                        replies.S550_SPF_FAIL, replies.S451_SPF_TEMPERROR):
            m = self._in_transaction(_machine())
            request = m.handle(f"GDEL {GOOD_ID}")
            assert m.resolve(request, verdict) == verdict
            assert m.state is State.READY
            assert m.envelope is None
            assert m.handle("MAIL FROM:<a@sender.example>").code == 250

    def test_bad_id(self) -> None:
        """SPEC 2: anything but 16-128 of ALPHA / DIGIT / - / _ gets 501 5.5.4."""
        for bad in ["", "short", "x" * 15, "x" * 129, "abc.defghijklmnopq", "a/b" * 8,
                    "../../../etc/passwd", "abcdefghijklmnop extra", "ábcdefghijklmnopq"]:
            m = self._in_transaction(_machine())
            assert _code(m.handle(f"GDEL {bad}")) == (501, "5.5.4"), bad
            m = _machine()
            assert _code(m.handle(f"GDEL {bad}")) == (501, "5.5.4"), bad

    def test_id_lengths(self) -> None:
        """Ids of 16 and of 128 characters are valid."""
        for good in ["x" * 16, "Y" * 128]:
            m = self._in_transaction(_machine())
            assert isinstance(m.handle(f"GDEL {good}"), Notify)

    def test_after_mail_without_rcpt(self) -> None:
        """MAIL without an accepted RCPT: 503 5.5.1."""
        m = _machine()
        m.handle("MAIL FROM:<alice@sender.example>")
        assert m.handle("RCPT TO:<nobody@example.org>").code == 550
        assert _code(m.handle(f"GDEL {GOOD_ID}")) == (503, "5.5.1")

    def test_before_ehlo(self) -> None:
        """No EHLO: 503 5.5.1."""
        m = _machine(ehlo=False)
        assert _code(m.handle(f"GDEL {GOOD_ID}")) == (503, "5.5.1")

    def test_bare_form_allowed(self) -> None:
        """The bare form asks for a check without an envelope."""
        m = _machine(bare_gdel=True)
        request = m.handle(f"GDEL {GOOD_ID}")
        assert request == Notify(m.session, None, GOOD_ID)
        ok = Reply(250, "2.0.0", f"{GOOD_ID} notification accepted")
        assert m.resolve(request, ok) == ok
        assert m.state is State.READY

    def test_bare_form_refused(self) -> None:
        """SPEC 3: a node may refuse the bare form by configuration: 502 5.5.1."""
        m = _machine(bare_gdel=False)
        assert _code(m.handle(f"GDEL {GOOD_ID}")) == (502, "5.5.1")
        # The transaction form still works.
        assert isinstance(self._in_transaction(m).handle(f"GDEL {GOOD_ID}"), Notify)

    def test_submission(self) -> None:
        """GDEL on a submission service: 502."""
        m = _machine("submission", tls=True)
        assert m.handle(f"GDEL {GOOD_ID}").code == 502

    def test_lower_case_verb(self) -> None:
        assert isinstance(_machine().handle(f"gdel {GOOD_ID}"), Notify)

    def test_id_is_case_sensitive(self) -> None:
        """SPEC 2: ids compare case-sensitively: the id is passed on as written."""
        mixed = "AbCdEfGhIjKlMnOpQ"
        assert _machine().handle(f"GDEL {mixed}").gdel_id == mixed


class TestRETR:
    def test_retrieve(self) -> None:
        """RETR <id> after EHLO asks the pickup counter."""
        m = _machine()
        request = m.handle(f"RETR {GOOD_ID}")
        assert request == Retrieve(m.session, GOOD_ID)

    def test_resolution_passes_through(self) -> None:
        """The counter's answer (a Reply or a Reverse) is the action."""
        m = _machine()
        request = m.handle(f"RETR {GOOD_ID}")
        assert m.resolve(request, replies.S550_NO_SUCH_MESSAGE) == \
                         replies.S550_NO_SUCH_MESSAGE
        reverse = Reverse(Reply(250, "2.0.0", f"{GOOD_ID} follows"), object())
        assert m.resolve(m.handle(f"RETR {GOOD_ID}"), reverse) is reverse

    def test_before_ehlo(self) -> None:
        """SPEC 4: RETR before EHLO: 503 5.5.1."""
        assert _code(_machine(ehlo=False).handle(f"RETR {GOOD_ID}")) == (503, "5.5.1")

    def test_inside_transaction(self) -> None:
        """SPEC 4: RETR inside a transaction: 503 5.5.1."""
        m = _machine()
        m.handle("MAIL FROM:<alice@sender.example>")
        assert _code(m.handle(f"RETR {GOOD_ID}")) == (503, "5.5.1")
        m.handle("RCPT TO:<bob@example.org>")
        assert m.state is State.RCPT
        assert _code(m.handle(f"RETR {GOOD_ID}")) == (503, "5.5.1")

    def test_bad_id(self) -> None:
        for bad in ["", "x" * 15, "x" * 129, "abc.defghijklmnopq", "../" * 6]:
            assert _code(_machine().handle(f"RETR {bad}")) == (501, "5.5.4"), bad

    def test_submission(self) -> None:
        m = _machine("submission", tls=True)
        assert m.handle(f"RETR {GOOD_ID}").code == 502


# -- TurnMachine ------------------------------------------------------------------------

SENDER = "alice@sender.example"


def _turn(sender: str | None = SENDER, recipients=("bob@example.org",)) -> TurnMachine:
    return TurnMachine(_policy(), Session(PEER, "smtp", helo="sender.example", esmtp=True),
                       sender=sender, recipients=recipients)


class TestTurnMachine:
    def _deliver(self, m: TurnMachine) -> Deliver:
        assert isinstance(m.handle("DATA"), BeginData)
        request = m.data_received([b"Subject: x\r\n\r\nhi\r\n"], 20, None)
        assert isinstance(request, Deliver)
        return request

    def test_starts_ready(self) -> None:
        """No greeting, no EHLO: MAIL is the first command."""
        m = _turn()
        assert m.state is State.READY
        assert _code(m.handle(f"MAIL FROM:<{SENDER}> SIZE=20 BODY=8BITMIME")) == \
                         (250, "2.1.0")

    def test_sender_must_match(self) -> None:
        """A sender other than the notified one is refused; the sender may try again."""
        m = _turn()
        assert _code(m.handle("MAIL FROM:<mallory@sender.example>")) == (550, "5.7.1")
        assert m.state is State.READY
        assert m.envelope is None
        assert m.handle("MAIL FROM:<ALICE@sender.example>").code == 250

    def test_null_sender_mismatch(self) -> None:
        m = _turn()
        assert m.handle("MAIL FROM:<>").code == 550

    def test_any_sender_for_bare_form(self) -> None:
        """Bare notification (sender unknown): any sender goes."""
        m = _turn(sender=None, recipients=None)
        assert m.handle("MAIL FROM:<x@elsewhere.example>").code == 250
        assert m.handle("RCPT TO:<carol@example.org>").code == 250

    def test_recipients_limited(self) -> None:
        """Only recipients of the notification are accepted."""
        m = _turn()
        m.handle(f"MAIL FROM:<{SENDER}>")
        assert _code(m.handle("RCPT TO:<carol@example.org>")) == (550, "5.7.1")
        assert m.state is State.MAIL
        assert m.envelope.recipients == ()
        assert m.handle("RCPT TO:<bob@example.org>").code == 250
        assert m.handle("RCPT TO:<carol@example.org>").code == 550
        assert m.state is State.RCPT
        assert m.envelope.recipients == ("bob@example.org",)
        assert self._deliver(m).envelope.recipients == ("bob@example.org",)

    def test_unknown_user_still_refused(self) -> None:
        m = _turn(recipients=("nobody@example.org",))
        m.handle(f"MAIL FROM:<{SENDER}>")
        assert _code(m.handle("RCPT TO:<nobody@example.org>")) == (550, "5.1.1")

    def test_rset_ends_turn(self) -> None:
        """SPEC 4: RSET ends the SMTA's turn after its reply."""
        m = _turn()
        m.handle(f"MAIL FROM:<{SENDER}>")
        action = m.handle("RSET")
        assert isinstance(action, EndTurn)
        assert action.reply.code == 250
        assert m.state is State.CLOSED
        assert m.envelope is None

    def test_end_of_data_ends_turn(self) -> None:
        """The reply to end-of-data ends the turn and is the outcome."""
        m = _turn()
        m.handle(f"MAIL FROM:<{SENDER}>")
        m.handle("RCPT TO:<bob@example.org>")
        request = self._deliver(m)
        assert request.envelope.sender == SENDER
        stored = Reply(250, "2.0.0", "Ok: stored")
        assert m.resolve(request, stored) == EndTurn(stored)
        assert m.outcome == stored
        assert m.state is State.CLOSED

    def test_deferred_delivery_ends_turn(self) -> None:
        m = _turn()
        m.handle(f"MAIL FROM:<{SENDER}>")
        m.handle("RCPT TO:<bob@example.org>")
        request = self._deliver(m)
        assert m.resolve(request, replies.S451_LOCAL_ERROR) == \
                         EndTurn(replies.S451_LOCAL_ERROR)
        assert m.outcome == replies.S451_LOCAL_ERROR

    def test_refused_data_ends_turn(self) -> None:
        """Data refused by the reader (bare LF, too big) ends the turn with that refusal."""
        m = _turn()
        m.handle(f"MAIL FROM:<{SENDER}>")
        m.handle("RCPT TO:<bob@example.org>")
        m.handle("DATA")
        action = m.data_received([], 0, replies.S550_BARE_LINE_ENDING)
        assert action == EndTurn(replies.S550_BARE_LINE_ENDING)
        assert m.outcome == replies.S550_BARE_LINE_ENDING
        assert m.state is State.CLOSED

    def test_quit(self) -> None:
        assert isinstance(_turn().handle("QUIT"), Close)

    def test_push_policy_does_not_apply(self) -> None:
        """
        A retrieval is pull, not push: even with [trust] push = "refuse" (pull
        only), DATA in the SMTA's turn goes straight to 354.
        """
        for push in ("refuse", "allow-only", "spf-pass"):
            m = TurnMachine(_policy(push=push), Session(PEER, "smtp", helo="sender.example"),
                            sender=SENDER, recipients=("bob@example.org",))
            m.handle(f"MAIL FROM:<{SENDER}>")
            m.handle("RCPT TO:<bob@example.org>")
            assert isinstance(m.handle("DATA"), BeginData), push

    def test_commands_after_turn_refused(self) -> None:
        """Once the turn is over the machine takes no more mail."""
        m = _turn()
        m.handle("RSET")
        assert m.handle(f"MAIL FROM:<{SENDER}>").code == 503
