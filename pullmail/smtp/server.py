"""
The ESMTP server as a state machine without I/O (the h11 pattern).

``ServerMachine.handle(line)`` takes one command line and returns an action:
a L{Reply} to send, or a request (L{CheckSender}, L{Deliver},
L{Authenticate}, L{StartTLS}, L{BeginData}, L{Close}, or an extension's
own) that the Twisted glue carries out before calling ``resolve``.  Which
command may come in which state, and the state it leads to, is one table,
L{TRANSITIONS}; each verb's handler is named in another, L{HANDLERS}.
Policy decisions come from L{ServerPolicy}, a value built from the config.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from pullmail.accounts.users import Accounts
from pullmail.smtp import replies
from pullmail.smtp.address import (
    AddressError,
    Forbidden,
    Local,
    ParameterError,
    Remote,
    classify,
    is_own_literal,
    parse_mail_argument,
    parse_rcpt_argument,
)
from pullmail.smtp.chunking import (
    S501_BAD_BDAT,
    S503_BDAT_NEEDS_EHLO,
    ChunkedMessage,
    ReadChunk,
    parse_bdat,
)
from pullmail.smtp.connection import MAX_COMMAND_LINE
from pullmail.smtp.dsn import check_mail_parameter, check_rcpt_parameters
from pullmail.smtp.envelope import Envelope, Session
from pullmail.smtp.loops import too_many_hops
from pullmail.smtp.replies import Reply

__all__ = [
    "State",
    "ServerPolicy",
    "ServerMachine",
    "CheckSender",
    "CheckPush",
    "Deliver",
    "Authenticate",
    "StartTLS",
    "BeginData",
    "Close",
    "Reverse",
    "EndTurn",
    "MAX_COMMAND_LINE",
    "MAX_SASL_LINE",
    "TRANSITIONS",
    "HANDLERS",
    "FORBIDDEN_VERBS",
]

# RFC 4954 4: a SASL response line may be up to 12288 octets.
MAX_SASL_LINE = 12288


class State(enum.Enum):
    CONNECTED = "connected"      # greeted; no EHLO/HELO yet
    READY = "ready"              # no transaction
    MAIL = "mail"                # sender given, no recipient accepted yet
    RCPT = "rcpt"                # at least one recipient accepted
    DATA = "data"                # the glue is reading the message
    BDAT = "bdat"                # chunks of the message are coming (RFC 3030)
    AUTH = "auth"                # inside a SASL exchange
    CLOSED = "closed"

    # Members are singletons: identity hashing, not Enum's hash of the
    # name in Python, for the (state, verb) lookups of every command.
    __hash__ = object.__hash__


# -- requests: points where the machine waits for the glue ------------------


@dataclass(frozen=True)
class CheckSender:
    """
    A sender claims one of our own domains from outside: its SPF must
    pass (SPEC 6), or the MAIL is refused.  Resolve with None or a refusal.
    """

    session: Session
    envelope: Envelope


@dataclass(frozen=True)
class CheckPush:
    """
    Classic push on the MX service, judged by ``[trust] push`` before the
    data is taken.  Resolve with None or a refusal.
    """

    session: Session
    envelope: Envelope


@dataclass(frozen=True)
class Deliver:
    """Store an accepted message; resolve with the reply to end-of-data."""

    session: Session
    envelope: Envelope
    chunks: list
    size: int


@dataclass(frozen=True)
class Authenticate:
    """Check a SASL identity; resolve with True or False."""

    user: str
    password: str


@dataclass(frozen=True)
class StartTLS:
    """Send C{reply}, drop buffered input (CVE-2011-0411), start TLS."""

    reply: Reply


@dataclass(frozen=True)
class BeginData:
    """Send C{reply} (354) and read the message with a DataReader."""

    reply: Reply
    max_size: int


@dataclass(frozen=True)
class Close:
    """Send C{reply} and close the connection."""

    reply: Reply


@dataclass(frozen=True)
class Reverse:
    """
    Send C{reply}, drop buffered input, and play the client: run C{turn}
    (a coroutine function taking a channel); then serve again (SPEC 4).
    """

    reply: Reply
    turn: object


@dataclass(frozen=True)
class EndTurn:
    """Send C{reply}, drop buffered input, give the client role back."""

    reply: Reply


# -- policy ------------------------------------------------------------------


@dataclass(frozen=True)
class ServerPolicy:
    """
    What a service allows.  C{service} is ``smtp`` (MX: local recipients,
    no AUTH), ``submission`` or ``submissions`` (AUTH required).
    """

    hostname: str
    domains: tuple[str, ...]    # in config order: the first is the main one
    accounts: Accounts
    service: str = "smtp"
    max_size: int = 25_000_000
    max_recipients: int = 100
    tls_available: bool = False
    push: str = "accept"           # [trust] push
    # The node's own IP addresses: their address literals are ours (issue 18).
    own_addresses: frozenset = frozenset()
    max_received: int = 100          # [limits] max_received (RFC 5321 6.3)

    @property
    def submission(self) -> bool:
        return self.service != "smtp"

    @functools.cached_property
    def greeting(self) -> Reply:
        """One value for every session (its L{Reply.wire} rendered once)."""
        return Reply(220, "", f"{self.hostname} ESMTP pullmail")

    @property
    def postmaster_domain(self) -> str:
        """Where a bare <Postmaster> goes (RFC 5321 4.1.1.3): the main domain."""
        return self.domains[0]


_ANY = (State.CONNECTED, State.READY, State.MAIL, State.RCPT)
# Between BDAT chunks (RFC 3030 2): ending the transaction, or BDAT again.
_ANY_BUT_DATA = _ANY + (State.BDAT,)


def _from(states, verb: str, to: State | None) -> dict[tuple[State, str], State]:
    """C{verb} allowed in C{states}, leading to C{to} (None: the same state)."""
    return {(state, verb): to or state for state in states}


# (state, verb) -> the state the command leads to when it succeeds.  A pair
# not listed is out of sequence (RFC 5321 4.1.4; 503, or 503 5.5.1 before
# EHLO).  The rules of RFC 5321 3.3 and 4.1.4: EHLO/HELO and RSET end any
# transaction; MAIL starts one, RCPT adds to it, DATA ends it; STARTTLS
# goes back to the start (RFC 3207 4.2); AUTH opens a SASL exchange.
# BDAT (RFC 3030) sends the message in chunks in place of DATA; DATA after
# BDAT is out of sequence.
TRANSITIONS: Mapping[tuple[State, str], State] = {
    **_from(_ANY_BUT_DATA, "EHLO", State.READY),
    **_from(_ANY_BUT_DATA, "HELO", State.READY),
    **_from([State.READY], "MAIL", State.MAIL),
    **_from([State.MAIL, State.RCPT], "RCPT", State.RCPT),
    **_from([State.RCPT], "DATA", State.DATA),
    **_from([State.RCPT, State.BDAT], "BDAT", State.BDAT),
    **_from([State.CONNECTED], "RSET", None),
    **_from([State.READY, State.MAIL, State.RCPT, State.BDAT], "RSET", State.READY),
    **_from(_ANY_BUT_DATA, "NOOP", None),
    **_from(_ANY_BUT_DATA, "QUIT", State.CLOSED),
    **_from(_ANY_BUT_DATA, "VRFY", None),
    **_from(_ANY_BUT_DATA, "HELP", None),
    **_from([State.READY], "STARTTLS", State.CONNECTED),
    **_from([State.READY], "AUTH", State.AUTH),
}

# Verbs of other protocols (HTTP, proxies, POP3): a cross-protocol attack,
# closed at once (Postfix's smtpd_forbidden_commands).
FORBIDDEN_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "USER"})


def _sequence_error(state: State, verb: str) -> Reply:
    if state is State.CONNECTED:
        return replies.S503_NEED_EHLO
    if verb == "MAIL":
        return replies.S503_NESTED_MAIL
    if verb == "RCPT":
        return replies.S503_NEED_MAIL
    if state is State.BDAT:
        return replies.S503_BAD_SEQUENCE.with_text(f"{verb} while sending BDAT chunks (RFC 3030 2)")
    if verb in ("DATA", "BDAT"):
        return replies.S503_NEED_MAIL if state is State.READY else replies.S503_NEED_RCPT
    return replies.S503_BAD_SEQUENCE


_HELO_ARGUMENT = re.compile(r"[\x21-\x7e]{1,255}")
_SASL_MECHANISMS = ("PLAIN", "LOGIN")
_LOGIN_USER_PROMPT = Reply(334, "", base64.b64encode(b"Username:").decode())
_LOGIN_PASSWORD_PROMPT = Reply(334, "", base64.b64encode(b"Password:").decode())
_PLAIN_PROMPT = Reply(334, "", "")


class _SASLError(Exception):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def _b64decode(text: str) -> str:
    try:
        return base64.b64decode(text.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise _SASLError(replies.S501_BAD_BASE64) from None


@dataclass(eq=False)
class Extension:
    """
    A set of extra verbs (e.g. General Delivery): their EHLO keywords,
    their rows of the state table ((state, verb) -> next state), and their
    handlers.  Compared (and hashed) by identity: a listener's extensions
    are made once.
    """

    keywords: Callable[[Session], list[str]]
    transitions: Mapping[tuple[State, str], State]
    handlers: Mapping[str, Callable[["ServerMachine", str], object]]
    resolvers: Mapping[type, Callable[["ServerMachine", object, object], object]] = field(
        default_factory=dict
    )


def _handlers(cls: type) -> dict[str, Callable[["ServerMachine", str], object]]:
    """
    Each verb's handler, as C{cls} defines it: a subclass (the reversed
    turn) changes a command by overriding its method.
    """
    return {
        "EHLO": cls._ehlo, "HELO": cls._helo, "MAIL": cls._mail, "RCPT": cls._rcpt,
        "DATA": cls._data, "RSET": cls._rset, "NOOP": cls._noop, "QUIT": cls._quit,
        "VRFY": cls._vrfy, "HELP": cls._help, "STARTTLS": cls._starttls, "AUTH": cls._auth,
        "BDAT": cls._bdat,
    }


@functools.lru_cache(maxsize=64)
def _verb_table(machine_class: type, extensions: tuple[Extension, ...]):
    """
    The verbs a machine of C{machine_class} answers: the state table, the
    handlers and the resolvers of its requests, as functions taking the
    machine.  Made once per class and set of extensions, not per
    connection.  Looked up on the class, so that a subclass (the reversed
    turn) can change its table and how a request's answer is taken.
    """
    transitions = {**TRANSITIONS, **machine_class.TRANSITION_CHANGES}
    handlers: dict[str, Callable] = _handlers(machine_class)
    resolvers: dict[type, Callable] = {
        CheckSender: machine_class._resolve_sender,
        CheckPush: machine_class._resolve_push,
        Deliver: machine_class._resolve_delivery,
        Authenticate: machine_class._resolve_authentication,
    }
    for extension in extensions:
        transitions.update(extension.transitions)
        handlers.update(extension.handlers)
        resolvers.update(extension.resolvers)
    return transitions, handlers, resolvers


class _SASL:
    """
    The machine's AUTH (RFC 4954; PLAIN RFC 4616; LOGIN): a SASL exchange
    in which every line is a response, ending in an L{Authenticate}.
    """

    policy: ServerPolicy
    session: Session
    state: State
    _sasl: Callable[[str], object] | None

    def _auth(self, argument: str) -> object:
        if not self.policy.submission:
            return replies.S502_NOT_IMPLEMENTED
        if not self.session.tls:
            return replies.S530_NEED_TLS
        if self.session.user:
            return replies.S503_ALREADY_AUTH
        mechanism, _, initial = argument.strip(" ").partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in _SASL_MECHANISMS:
            return replies.S504_AUTH_MECHANISM
        if mechanism == "PLAIN":
            if initial:
                return self._sasl_guard(self._plain, initial)
            return self._sasl_wait(self._plain, _PLAIN_PROMPT)
        if initial:
            return self._sasl_guard(self._login_user, initial)
        return self._sasl_wait(self._login_user, _LOGIN_USER_PROMPT)

    def _sasl_wait(self, step: Callable[[str], object], prompt: Reply) -> Reply:
        self._sasl = step
        self._advance("AUTH")  # a SASL exchange: every line is a response
        return prompt

    def _sasl_step(self, line: str) -> object:
        step, self._sasl = self._sasl, None
        self.state = State.READY
        if line.strip() == "*":
            return replies.S501_AUTH_CANCELLED
        return self._sasl_guard(step, line)

    def _sasl_guard(self, step: Callable[[str], object], line: str) -> object:
        try:
            return step(line)
        except _SASLError as e:
            self._sasl = None
            self.state = State.READY
            return e.reply

    def _plain(self, response: str) -> object:
        if response.strip() == "=":
            response = ""
        parts = _b64decode(response).split("\0")
        if len(parts) != 3:
            raise _SASLError(replies.S501_BAD_BASE64.with_text("Malformed PLAIN response"))
        authzid, user, password = parts
        if authzid and authzid.lower() != user.lower():
            raise _SASLError(replies.S535_BAD_CREDENTIALS)
        return Authenticate(user.lower(), password)

    def _login_user(self, response: str) -> object:
        user = _b64decode(response)

        def password_step(line: str) -> object:
            return Authenticate(user.lower(), _b64decode(line))

        return self._sasl_wait(password_step, _LOGIN_PASSWORD_PROMPT)

    def _resolve_authentication(self, request: Authenticate, ok: bool | Reply) -> object:
        if isinstance(ok, Reply):
            self.state = State.CLOSED
            return Close(ok)
        if not ok:
            return replies.S535_BAD_CREDENTIALS
        self.session = self.session.evolve(user=request.user)
        return replies.S235_AUTH_OK


class _Chunking:
    """
    The machine's BDAT (RFC 3030): each chunk is read by the glue as
    exactly its size (L{ReadChunk}) and handed back to L{chunk_received};
    a refused BDAT's chunk is read and dropped before its refusal.
    """

    policy: ServerPolicy
    session: Session
    state: State
    _chunked: ChunkedMessage | None
    _first_chunk: tuple[int, bool]
    _skipped: Reply | None

    def _bdat(self, argument: str) -> object:
        if not self.extensions_offered:
            # RFC 3030 2 / RFC 5321 2.2.1: CHUNKING is an extension EHLO
            # offers; a HELO session was offered none.
            return self._skip_chunk(argument, S503_BDAT_NEEDS_EHLO)
        parsed = self._bdat_argument(argument)
        if isinstance(parsed, Close):
            return parsed
        if self._chunked is None:
            self._chunked = ChunkedMessage(self.policy.max_size)
            self._advance("BDAT")
            if self._needs_push_check():
                self._first_chunk = parsed
                return CheckPush(self.session, self.envelope)
        return self._read_chunk(*parsed)

    def _bdat_argument(self, argument: str) -> tuple[int, bool] | Close:
        parsed = parse_bdat(argument)
        if parsed is None:
            # The chunk's length is unknown, so what follows cannot be
            # framed: read as commands it could smuggle some in.
            self.state = State.CLOSED
            return Close(S501_BAD_BDAT)
        return parsed

    def _skip_chunk(self, argument: str, refusal: Reply) -> object:
        """
        A refused BDAT: its chunk still follows (pipelined, RFC 3030 2),
        so it is read and thrown away, then C{refusal} answers it; read as
        commands, the chunk could smuggle some in.
        """
        parsed = self._bdat_argument(argument)
        if isinstance(parsed, Close):
            return parsed
        self._skipped = refusal
        return ReadChunk(parsed[0], parsed[1], keep=False)

    def _read_chunk(self, size: int, last: bool) -> ReadChunk:
        self._chunked.announce(size, last)
        return ReadChunk(size, last, keep=self._chunked.error is None)

    def chunk_received(self, data: bytes) -> object:
        """The glue read a whole BDAT chunk: its reply, or the end of data."""
        if self._skipped is not None:
            refusal, self._skipped = self._skipped, None
            return refusal
        chunked = self._chunked
        reply = chunked.add(data)
        if not chunked.last:
            return reply
        return self.data_received(chunked.message(), chunked.size, chunked.error)


class ServerMachine(_SASL, _Chunking):
    """One SMTP session's state, driven by lines; no I/O."""

    TRANSITION_CHANGES: Mapping[tuple[State, str], State] = {}  # a subclass's changes

    def __init__(
        self, policy: ServerPolicy, session: Session, extensions: tuple[Extension, ...] = ()
    ) -> None:
        self.policy = policy
        self.session = session
        self.state = State.CONNECTED
        self.envelope: Envelope | None = None
        self._extensions = extensions
        self._transitions, self._handlers, self._resolvers = _verb_table(type(self), extensions)
        self._sasl: Callable[[str], object] | None = None
        self._chunked: ChunkedMessage | None = None     # a BDAT transaction's
        self._first_chunk: tuple[int, bool] = (0, False)  # while its push check runs
        self._skipped: Reply | None = None    # the refusal of a BDAT whose chunk is read
        self.messages = 0       # messages this session handed over (250 to their data)

    # -- entry points -------------------------------------------------------

    @property
    def max_line(self) -> int:
        return MAX_SASL_LINE if self.state is State.AUTH else MAX_COMMAND_LINE

    def greeting(self) -> Reply:
        return self.policy.greeting

    def handle(self, line: str) -> object:
        """One command line (without CRLF) -> an action."""
        if self.state is State.AUTH:
            return self._sasl_step(line)
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if verb in FORBIDDEN_VERBS:
            self.state = State.CLOSED
            return Close(replies.S554_NOT_SMTP)
        handler = self._handlers.get(verb)
        if handler is None:
            return replies.S500_UNRECOGNIZED
        if (self.state, verb) not in self._transitions:
            if verb == "BDAT":
                return self._skip_chunk(argument.strip(" "), _sequence_error(self.state, verb))
            return _sequence_error(self.state, verb)
        return handler(self, argument.strip(" ") if verb != "AUTH" else argument)

    def _advance(self, verb: str) -> None:
        self.state = self._transitions[(self.state, verb)]  # C{verb} succeeded

    def resolve(self, request: object, result: object) -> object:
        """The glue's answer to a request -> the next action."""
        return self._resolvers[type(request)](self, request, result)

    def reset(self) -> None:
        self.envelope = None
        self._chunked = None
        if self.state in (State.MAIL, State.RCPT, State.DATA, State.BDAT):
            self.state = State.READY

    def tls_started(self) -> None:
        """RFC 3207 4.2: forget everything learnt before the handshake."""
        self.session = self.session.evolve(tls=True, helo="", esmtp=False, user=None)
        self.envelope = None
        self._advance("STARTTLS")

    def ehlo_keywords(self) -> list[str]:
        keywords = ["PIPELINING", f"SIZE {self.policy.max_size}", "8BITMIME",
                    "ENHANCEDSTATUSCODES", "CHUNKING", "SMTPUTF8", "DSN"]
        if self.policy.tls_available and not self.session.tls:
            keywords.append("STARTTLS")
        if self.policy.submission and self.session.tls and not self.session.user:
            keywords.append("AUTH " + " ".join(_SASL_MECHANISMS))
        for extension in self._extensions:
            keywords.extend(extension.keywords(self.session))
        return keywords

    # -- commands -----------------------------------------------------------

    def _ehlo(self, argument: str) -> Reply:
        return self._greet("EHLO", argument, esmtp=True)

    def _helo(self, argument: str) -> Reply:
        return self._greet("HELO", argument, esmtp=False)

    def _greet(self, verb: str, argument: str, esmtp: bool) -> Reply:
        # RFC 5321 4.1.1.1: a domain or an address literal; printable ASCII.
        if not _HELO_ARGUMENT.fullmatch(argument):
            return replies.S501_SYNTAX.with_text("Syntax: EHLO hostname")
        self.session = self.session.evolve(helo=argument, esmtp=esmtp)
        self.reset()
        self._advance(verb)
        first = f"{self.policy.hostname} Hello {argument} [{self.session.peer}]"
        if not esmtp:
            return Reply(250, "", first)
        return Reply(250, "", "\n".join([first] + self.ehlo_keywords()))

    def _mail(self, argument: str) -> object:
        if self.policy.submission and not self.session.user:
            return replies.S530_NEED_AUTH
        try:
            sender, params = parse_mail_argument(argument)
        except ParameterError as e:
            return replies.S501_SYNTAX.with_text(f"Syntax error in parameters: {e}")
        except AddressError as e:
            return replies.S501_BAD_SENDER.with_text(f"Bad sender address syntax: {e}")
        if refusal := self._parameters_refused(params):
            return refusal
        problem = self._check_mail_params(params)
        if isinstance(problem, Reply):
            return problem
        if sender is not None and sender.utf8 and "SMTPUTF8" not in params:
            return replies.S553_NEED_SMTPUTF8
        size, body = problem
        sender_text = str(sender) if sender is not None else ""
        if self.policy.submission and not self.policy.accounts.owns(
            self.session.user, sender_text
        ):
            return replies.S553_NOT_OWNED
        envelope = Envelope(sender_text, (), size, body, params)
        if (
            sender is not None
            and not self.policy.submission
            and (sender.domain in self.policy.domains
                 or is_own_literal(sender.domain, self.policy.own_addresses))
        ):
            return CheckSender(self.session, envelope)
        return self._accept_sender(envelope)

    def _check_mail_params(self, params) -> Reply | tuple[int | None, str | None]:
        size = body = None
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return replies.S501_SYNTAX.with_text("Bad SIZE parameter")
                size = int(value)
                if size > self.policy.max_size:
                    return replies.S552_TOO_BIG
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.S501_SYNTAX.with_text("Bad BODY parameter")
                body = value.upper()
            elif key == "AUTH" and value is not None:
                pass  # RFC 4954 5: may be ignored.
            elif key in ("RET", "ENVID"):     # DSN, RFC 3461 4.3, 4.4
                if refusal := check_mail_parameter(key, value):
                    return refusal
            elif key == "SMTPUTF8":
                if value is not None:   # RFC 6531 3.4: no value
                    return replies.S501_SYNTAX.with_text("SMTPUTF8 takes no value")
            else:
                return replies.S555_BAD_PARAMETER.with_text(f"Unsupported parameter {key}")
        return size, body

    @property
    def extensions_offered(self) -> bool:
        """RFC 5321 2.2.1: only the reply to EHLO offers extensions."""
        return self.session.esmtp

    def _parameters_refused(self, params) -> Reply | None:
        # RFC 5321 4.1.1.11: parameters need the extensions EHLO offered.
        if params and not self.extensions_offered:
            return replies.S555_BAD_PARAMETER.with_text("Parameters need EHLO")
        return None

    def _accept_sender(self, envelope: Envelope) -> Reply:
        self.envelope = envelope
        self._advance("MAIL")
        return replies.S250_SENDER_OK

    def _resolve_sender(self, request: CheckSender, verdict: Reply | None) -> Reply:
        if verdict is not None:
            return verdict
        return self._accept_sender(request.envelope)

    def _rcpt(self, argument: str) -> Reply:
        try:
            mailbox, params = parse_rcpt_argument(argument)
        except ParameterError as e:
            return replies.S501_SYNTAX.with_text(f"Syntax error in parameters: {e}")
        except AddressError as e:
            return replies.S501_BAD_RECIPIENT.with_text(f"Bad recipient address syntax: {e}")
        if refusal := self._parameters_refused(params):
            return refusal
        # NOTIFY, ORCPT (RFC 3461 4.1, 4.2; RFC 6533 3)
        kept = check_rcpt_parameters(params, "SMTPUTF8" in self.envelope.params)
        if isinstance(kept, Reply):
            return kept
        if mailbox.utf8 and "SMTPUTF8" not in self.envelope.params:
            return replies.S553_NEED_SMTPUTF8
        if len(self.envelope.recipients) >= self.policy.max_recipients:
            return replies.S452_TOO_MANY_RECIPIENTS
        verdict = classify(mailbox, self.policy.domains, self.policy.postmaster_domain,
                           self.policy.own_addresses)
        if isinstance(verdict, Forbidden):
            return replies.S550_RELAY_DENIED
        if isinstance(verdict, Remote):
            if not self.session.user:
                return replies.S550_RELAY_DENIED
            recipient = str(verdict.mailbox)
        else:
            assert isinstance(verdict, Local)
            if not self.policy.accounts.exists(verdict.address):
                return replies.S550_NO_SUCH_USER
            recipient = verdict.address
        if recipient not in self.envelope.recipients:
            self.envelope = self.envelope.add(recipient, kept)
        self._advance("RCPT")
        return replies.S250_RECIPIENT_OK

    def _needs_push_check(self) -> bool:
        return self.policy.push != "accept" and not self.session.user

    def _data(self, argument: str) -> object:
        if argument:
            return replies.S501_SYNTAX.with_text("DATA takes no arguments")
        if self._needs_push_check():
            return CheckPush(self.session, self.envelope)
        return self._begin_data()

    def _begin_data(self) -> BeginData:
        self._advance("DATA")
        return BeginData(replies.S354_START_DATA, self.policy.max_size)

    def _resolve_push(self, request: CheckPush, verdict: Reply | None) -> object:
        if self._chunked is not None:
            # The first BDAT: its chunk comes whatever the verdict.
            self._chunked.error = verdict
            return self._read_chunk(*self._first_chunk)
        if verdict is not None:
            self.reset()
            return verdict
        return self._begin_data()

    def data_received(self, chunks: list, size: int, error: Reply | None) -> object:
        """The glue read the whole message (or refused it with C{error})."""
        envelope = self.envelope
        self.reset()
        if error is not None:
            return error
        if too_many_hops(chunks, self.policy.max_received):
            return replies.S554_TOO_MANY_HOPS
        return Deliver(self.session, envelope, chunks, size)

    def _resolve_delivery(self, request: Deliver, reply: Reply) -> Reply:
        self.messages += reply.code < 300
        return reply

    def _rset(self, argument: str) -> Reply:
        self.reset()
        self._advance("RSET")
        return replies.S250_RESET

    def _noop(self, argument: str) -> Reply:
        return replies.S250_NOOP

    def _quit(self, argument: str) -> Close:
        self._advance("QUIT")
        return Close(replies.S221_BYE)

    def _vrfy(self, argument: str) -> Reply:
        # RFC 5321 3.5.3: 252 tells nothing about who exists.
        return replies.S252_CANNOT_VRFY

    def _help(self, argument: str) -> Reply:
        return replies.S214_HELP

    def _starttls(self, argument: str) -> object:
        if argument:
            return replies.S501_SYNTAX.with_text("STARTTLS takes no arguments")
        if self.session.tls:
            return replies.S503_ALREADY_TLS
        if not self.policy.tls_available:
            return replies.S454_TLS_UNAVAILABLE
        return StartTLS(replies.S220_READY_TLS)


# The core verbs' handlers (extensions add their own).
HANDLERS: Mapping[str, Callable[[ServerMachine, str], object]] = _handlers(ServerMachine)
