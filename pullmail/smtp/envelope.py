"""What a session knows about its peer, and what a transaction carries."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Session", "Envelope"]


@dataclass(frozen=True)
class Session:
    """
    The peer of one connection.  C{service} is ``"smtp"`` (the MX),
    ``"submission"`` or ``"submissions"``.
    """

    peer: str
    service: str = "smtp"
    helo: str = ""
    esmtp: bool = False
    tls: bool = False
    user: str | None = None

    def evolve(self, **changes) -> "Session":
        # Not dataclasses.replace: its checks cost more than the session.
        return Session(**{**self.__dict__, **changes})

    @property
    def protocol_name(self) -> str:
        """The ``with`` clause of a Received header (RFC 3848)."""
        name = "ESMTP" if self.esmtp else "SMTP"
        if self.tls:
            name += "S"
        if self.user:
            name += "A"
        return name


@dataclass(frozen=True)
class Envelope:
    """
    One mail transaction.  C{sender} is ``""`` for the null reverse-path;
    C{recipients} are normalised local addresses or remote mailboxes.
    """

    sender: str
    recipients: tuple[str, ...] = ()
    size: int | None = None
    body: str | None = None
    params: dict = field(default_factory=dict, compare=False)
    # Each recipient's kept RCPT parameters (DSN's notify, orcpt: RFC 3461).
    rcpt_params: dict = field(default_factory=dict, compare=False)

    def add(self, recipient: str, params: dict | None = None) -> "Envelope":
        kept = {**self.rcpt_params, recipient: params} if params else self.rcpt_params
        return Envelope(self.sender, self.recipients + (recipient,), self.size, self.body,
                        self.params, kept)
