"""
SMTP replies as values: ``Reply(code, enhanced, text)``.

Handlers return replies; one writer renders them.  Names read
``S<code>_<WHY>``; enhanced status codes are those of RFC 3463 and the IANA
registry of RFC 5248.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

__all__ = ["Reply", "storage_failure"]


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def positive(self) -> bool:
        return self.code < 400

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)

    def render(self, enhanced: bool = True) -> bytes:
        """
        The reply on the wire; a multi-line text becomes ``code-`` lines
        (RFC 5321 4.2.1).  Greeting-like replies have no enhanced code.
        """
        lines = self.text.split("\n")
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def wire(self) -> bytes:
        """
        L{render}ed once per reply: most are constants, sent again and
        again.  (Not functools.cached_property: its lock costs more than
        rendering a reply that is sent once.)
        """
        wire = self.__dict__.get("_wire")
        if wire is None:
            wire = self.render()
            object.__setattr__(self, "_wire", wire)
        return wire

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


# -- 2xx / 3xx
S250_OK = Reply(250, "2.0.0", "Ok")
S250_SENDER_OK = Reply(250, "2.1.0", "Ok")
S250_RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
S250_RESET = Reply(250, "2.0.0", "Ok")
S250_NOOP = Reply(250, "2.0.0", "Ok")
S221_BYE = Reply(221, "2.0.0", "Bye")
S252_CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message")
S354_START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
S220_READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
S235_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
S214_HELP = Reply(214, "2.0.0", "See RFC 5321 and https://pullmail.invalid/")

# -- 4xx
S421_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
S421_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
S421_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
S421_BLOCKED = Reply(421, "4.7.0", "Too many failures, try again later")
S421_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
S421_TOO_MANY_JUNK = Reply(421, "4.7.0", "Too many commands without progress, closing connection")
S421_COMMAND_TIMEOUT = Reply(421, "4.4.2", "Command timeout, closing connection")
S421_DATA_TIMEOUT = Reply(421, "4.4.2", "Data timeout, closing connection")
S451_LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
S451_IN_PROGRESS = Reply(451, "4.3.0", "Retrieval in progress, try again later")
S451_DNS_ERROR = Reply(451, "4.4.3", "DNS lookup failed, try again later")
S451_SPF_TEMPERROR = Reply(451, "4.7.24", "SPF temporary error, try again later")
S452_STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
S452_TOO_MANY_PENDING = Reply(452, "4.3.1", "Too many pending notifications from this origin")
S452_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
S454_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
S454_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")

# -- 5xx
S500_UNRECOGNIZED = Reply(500, "5.5.1", "Command unrecognized")
S500_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
S500_BARE_LINE_ENDING = Reply(
    500, "5.5.2", "Bare CR or LF in command line (RFC 5321 2.3.8)"
)
S501_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
S501_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
S501_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
S501_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
S501_AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
S501_BAD_ID = Reply(501, "5.5.4", "Invalid message id")
S502_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
S503_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
S503_NEED_EHLO = Reply(503, "5.5.1", "Send EHLO/HELO first")
S503_NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
S503_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
S503_NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
S503_ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
S503_ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
S504_AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
S530_NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
S530_NEED_AUTH = Reply(530, "5.7.0", "Authentication required")
S535_BAD_CREDENTIALS = Reply(535, "5.7.8", "Authentication credentials invalid")
S550_NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
S550_RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
S550_POLICY = Reply(550, "5.7.1", "Refused by policy")
S550_SPF_FAIL = Reply(550, "5.7.23", "SPF validation failed")
S550_SPF_PERMERROR = Reply(550, "5.7.24", "SPF validation error")
# RFC 7505 4.2 and 5: mail from a domain that publishes a null MX.
S550_NULL_MX_SENDER = Reply(550, "5.7.27", "Sender address has null MX")
S550_NO_SUCH_MESSAGE = Reply(550, "5.7.1", "no such message for you")
S550_BARE_LINE_ENDING = Reply(
    550, "5.6.0", "Message refused: bare CR or LF in data (RFC 5321 2.3.8)"
)
S550_DATA_LINE_TOO_LONG = Reply(
    550, "5.6.0", "Message refused: line longer than 1000 octets (RFC 5321 4.5.3.1.6)"
)
S552_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
S553_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")
# RFC 6531 3.4 and 3.7.4.2 (RFC 3463 5.6.7): a UTF-8 address without SMTPUTF8.
S553_NEED_SMTPUTF8 = Reply(553, "5.6.7", "UTF-8 address needs the SMTPUTF8 parameter")
S554_NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
S554_IMPROPER_PIPELINING = Reply(
    554, "5.5.0", "Improper use of SMTP command pipelining (RFC 2920 3.1)"
)
S554_PREGREET = Reply(554, "5.5.0", "Spoke before the greeting ended (RFC 5321 4.3.1)")
S554_NOT_SMTP = Reply(554, "5.5.0", "Not an SMTP command, closing connection")
S555_BAD_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter")
# RFC 5321 6.3, RFC 3463 5.4.6: a routing loop.
S554_TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail loop (RFC 5321 6.3)")
S554_DELIVERED_BEFORE = Reply(554, "5.4.6", "Mail loop: already delivered to this mailbox")


def storage_failure(error: OSError) -> Reply:
    """The reply for a failed write: a full disk is 452 4.3.1 (RFC 3463)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return S452_STORAGE_FULL
    return S451_LOCAL_ERROR
