"""
General Delivery on the server machine (SPEC 1-4): the ``GDEL`` and
``RETR`` verbs, their EHLO keywords, and the machine that serves the RMTA's
side of a reversed turn.  Pure: the checks behind the verbs are requests
(L{Notify}, L{Retrieve}) carried out by the glue.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pullmail.ids import is_gdel_id
from pullmail.smtp import replies
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import (
    Close,
    EndTurn,
    Extension,
    ServerMachine,
    ServerPolicy,
    State,
)

__all__ = ["Notify", "Retrieve", "pull_extension", "TurnMachine"]


@dataclass(frozen=True)
class Notify:
    """
    A notification to check and store.  C{envelope} is None for the bare
    form (SPEC 3), whose trust identity is the EHLO domain.
    """

    session: Session
    envelope: Envelope | None
    gdel_id: str


@dataclass(frozen=True)
class Retrieve:
    """A RETR to answer: a L{Reply}, or a Reverse into the SMTA's turn."""

    session: Session
    gdel_id: str


def pull_extension(bare_gdel: bool = True, enabled: bool = True) -> Extension:
    """
    The GDEL/RETR verbs, offered on the MX service only (SPEC 1).  With
    General Delivery switched off they are known but refused (``502``).
    """

    def keywords(session: Session) -> list[str]:
        return ["GDEL", "RETR"] if enabled and session.service == "smtp" else []

    def gdel(machine: ServerMachine, argument: str) -> object:
        if not enabled or machine.session.service != "smtp":
            return replies.S502_NOT_IMPLEMENTED
        if machine.state is State.MAIL:
            return replies.S503_NEED_RCPT
        if not is_gdel_id(argument):
            return replies.S501_BAD_ID
        if machine.state is State.READY:
            if not bare_gdel:
                return replies.S502_NOT_IMPLEMENTED.with_text("Bare GDEL not accepted")
            return Notify(machine.session, None, argument)
        return Notify(machine.session, machine.envelope, argument)

    def notified(machine: ServerMachine, request: Notify, reply: Reply) -> Reply:
        # GDEL ends the transaction in place of DATA, whatever the verdict.
        machine.reset()
        return reply

    def retr(machine: ServerMachine, argument: str) -> object:
        if not enabled or machine.session.service != "smtp":
            return replies.S502_NOT_IMPLEMENTED
        if not is_gdel_id(argument):
            return replies.S501_BAD_ID
        return Retrieve(machine.session, argument)

    def retrieved(machine: ServerMachine, request: Retrieve, action: object) -> object:
        return action

    return Extension(
        keywords=keywords,
        # GDEL is allowed where DATA would be refused in sequence, to say why
        # (503 Need RCPT); it ends the transaction like DATA (SPEC 3).
        transitions={
            (State.READY, "GDEL"): State.READY,
            (State.MAIL, "GDEL"): State.MAIL,
            (State.RCPT, "GDEL"): State.RCPT,
            (State.READY, "RETR"): State.READY,
        },
        handlers={"GDEL": gdel, "RETR": retr},
        resolvers={Notify: notified, Retrieve: retrieved},
    )


class TurnMachine(ServerMachine):
    """
    The RMTA's server side during the SMTA's turn after ``RETR`` (SPEC 4):
    no greeting, no EHLO; one transaction; the turn ends with the reply to
    end-of-data, or to RSET.  C{offered}: the notification came after
    EHLO, so the SMTA saw our extensions.  C{sender} and C{recipients}, when known from
    the notification, bind what the SMTA may send.
    """

    # SPEC 4: RSET ends the turn.
    TRANSITION_CHANGES = {
        (state, "RSET"): State.CLOSED
        for state in (State.READY, State.MAIL, State.RCPT, State.BDAT)
    }

    def __init__(
        self, policy: ServerPolicy, session: Session, sender: str | None = None,
        recipients: tuple[str, ...] | None = None, offered: bool = True,
    ) -> None:
        super().__init__(policy, session)
        self.state = State.READY
        self._offered = offered
        self._expected_sender = sender
        self._expected_recipients = recipients
        self.outcome: Reply | None = None

    def _mail(self, argument: str) -> object:
        action = super()._mail(argument)
        if (
            action is replies.S250_SENDER_OK
            and self._expected_sender is not None
            and self.envelope.sender.lower() != self._expected_sender.lower()
        ):
            self.reset()
            return replies.S550_POLICY.with_text("Sender differs from the notification")
        return action

    def _rcpt(self, argument: str) -> Reply:
        reply = super()._rcpt(argument)
        if reply.positive and self._expected_recipients is not None:
            added = self.envelope.recipients[-1]
            if added not in self._expected_recipients:
                self.envelope = replace(self.envelope, recipients=self.envelope.recipients[:-1])
                if not self.envelope.recipients:
                    self.state = State.MAIL
                return replies.S550_POLICY.with_text("Recipient not in the notification")
        return reply

    @property
    def extensions_offered(self) -> bool:
        """
        SPEC 4: the SMTA may use what the RMTA offered when it accepted the
        notification -- nothing when that session began with HELO.
        """
        return self._offered

    def _parameters_refused(self, params) -> Reply | None:
        # SPEC 4: SIZE and BODY=8BITMIME in every turn; the rest as offered.
        if set(params) - {"SIZE", "BODY"}:
            return super()._parameters_refused(params)
        return None

    def _needs_push_check(self) -> bool:
        # The push policy judges pushes; this message was pulled, trusted.
        return False

    def _rset(self, argument: str) -> object:
        self.reset()
        self._advance("RSET")
        return EndTurn(replies.S250_RESET)

    def _quit(self, argument: str) -> Close:
        return Close(replies.S221_BYE)

    def data_received(self, chunks: list, size: int, error: Reply | None) -> object:
        action = super().data_received(chunks, size, error)
        if isinstance(action, Reply):
            self.outcome = action
            self.state = State.CLOSED
            return EndTurn(action)
        return action

    def _resolve_delivery(self, request, reply: Reply) -> object:
        self.outcome = reply
        self.state = State.CLOSED
        return EndTurn(reply)
