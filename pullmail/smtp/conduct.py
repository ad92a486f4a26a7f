"""
How much a peer may get wrong before the server stops listening.  Pure.

L{SessionLimits} holds the per-connection limits of ``[limits]`` that guard
against hostile peers; L{Conduct} keeps one session's score of error
replies and junk commands (Postfix's ``smtpd_soft_error_limit``,
``smtpd_hard_error_limit`` and ``smtpd_junk_command_limit``);
L{data_allowance} is the DATA deadline (RFC 5321 4.5.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from pullmail.smtp import replies
from pullmail.smtp.replies import Reply

__all__ = ["SessionLimits", "Conduct", "Judgement", "data_allowance", "ENDS_GROUP",
           "JUNK_VERBS"]

# RFC 2920 3.1: these end a pipelined group; nothing may follow them in the
# same group.  (DATA is checked at the 354: nothing may come before it.)
ENDS_GROUP = frozenset({"EHLO", "HELO"})

# Commands that cost nothing and move nothing (Postfix's junk commands).
JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "HELP"})


@dataclass(frozen=True)
class SessionLimits:
    """
    The ``[limits]`` that guard one connection; 0 switches a limit off.
    Times are seconds; C{min_data_rate} is octets per second.
    """

    tls_handshake_timeout: float = 30.0
    command_timeout: float = 300.0      # RFC 5321 4.5.3.2.7
    data_timeout: float = 300.0         # RFC 5321 4.5.3.2.5, .2.7
    min_data_rate: int = 1024
    improper_pipelining: str = "reject"  # RFC 2920 3.1
    pregreet_wait: float = 0.0
    max_errors: int = 20
    max_junk_commands: int = 100

    @property
    def reject_improper_pipelining(self) -> bool:
        return self.improper_pipelining == "reject"


def data_allowance(limits: SessionLimits, octets: int) -> float:
    """
    How long a DATA (or BDAT chunk) may have taken by the time C{octets}
    arrived: C{data_timeout}, plus a second for every C{min_data_rate}
    octets.  A peer sending at least that fast is never cut off; a trickle
    is cut off soon after C{data_timeout} (RFC 5321 4.5.3.2: the server
    may time out a silent or stalled client).
    """
    if limits.min_data_rate <= 0:
        return limits.data_timeout
    return limits.data_timeout + octets / limits.min_data_rate


@dataclass(frozen=True)
class Judgement:
    """Wait C{delay} seconds before the reply; then close with C{close}, if set."""

    delay: float = 0.0
    close: Reply | None = None


_FINE = Judgement()


class Conduct:
    """One session's error replies and junk commands."""

    def __init__(self, limits: SessionLimits) -> None:
        self._max_errors = limits.max_errors
        self._max_junk = limits.max_junk_commands
        self.errors = 0
        self.junk = 0

    def judge(self, verb: str, reply: Reply) -> Judgement:
        """C{reply} answers C{verb}: what the glue does besides sending it."""
        if verb in JUNK_VERBS:
            self.junk += 1
        elif reply.positive and verb not in ENDS_GROUP:
            self.junk = 0       # progress: a transaction moves on
        if reply.code >= 400 and reply.code != 421:
            self.errors += 1
        if self._max_errors and self.errors >= self._max_errors:
            return Judgement(close=replies.S421_TOO_MANY_ERRORS)
        if self._max_junk and self.junk > self._max_junk:
            return Judgement(close=replies.S421_TOO_MANY_JUNK)
        half = self._max_errors // 2
        if self._max_errors and reply.code >= 400 and self.errors > half:
            # The soft limit: each further error waits longer (a tarpit).
            return Judgement(delay=float(self.errors - half))
        return _FINE
