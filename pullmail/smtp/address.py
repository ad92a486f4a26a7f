"""
Reverse-path and forward-path parsing (RFC 5321 4.1.2), and the relay rule
for recipients.  Pure functions; no DNS, no accounts.

The parser is strict where strictness closes a relay (source routes are
parsed and dropped, quoted local parts are unquoted and then judged, address
literals are never local) and lenient only where clients commonly differ
(``MAIL FROM: <a@b>`` with a space, keyword case).

Internationalised addresses (RFC 6531 3.3, RFC 6532 3.2) are parsed too:
UTF-8 local parts, NFC-normalised (RFC 6532 3.1), and U-label domains,
held as A-labels (IDNA 2008, the C{idna} package) so that they compare and
resolve as the DNS knows them.  A L{Mailbox} says whether it was written in
UTF-8 (C{utf8}); the machine allows that only with ``SMTPUTF8``.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

__all__ = [
    "Mailbox",
    "AddressError",
    "ParameterError",
    "parse_mail_argument",
    "parse_rcpt_argument",
    "parse_mailbox",
    "is_dot_atom",
    "Local",
    "Remote",
    "Forbidden",
    "classify",
    "literal_address",
    "is_own_literal",
    "a_label_domain",
]


class AddressError(ValueError):
    """The text is not a valid path."""


class ParameterError(AddressError):
    """The path is fine; its parameters are not (RFC 5321 4.1.2: 501 5.5.4)."""


# atext = ALPHA / DIGIT / "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-"
#       / "/" / "=" / "?" / "^" / "_" / "`" / "{" / "|" / "}" / "~"  (RFC 5322 3.2.3)
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# RFC 6532 3.2: atext =/ UTF8-non-ascii (judged printable separately).
_UTEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"
_UTF8_DOT_STRING = re.compile(rf"{_UTEXT}+(?:\.{_UTEXT}+)*")
# Quoted-string = DQUOTE *QcontentSMTP DQUOTE; qtextSMTP = %d32-33 / %d35-91 /
# %d93-126 (=/ UTF8-non-ascii, RFC 6531 3.3); quoted-pairSMTP = %d92 %d32-126
_QUOTED_STRING = re.compile(
    r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
)
# sub-domain = Let-dig [Ldh-str]; Domain = sub-domain *("." sub-domain);
# a label is at most 63 octets (RFC 1035 2.3.4)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# address-literal = "[" ( IPv4 / IPv6 / General-address-literal ) "]"
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-");
# esmtp-value = 1*(%d33-60 / %d62-126) (=/ UTF8-non-ascii, RFC 6531 3.3:
# e.g. ORCPT=utf-8;<unitext>, RFC 6533 3; never the surrogates that stand
# for octets that were not UTF-8)
_PARAM = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\ud7ff\ue000-\U0010ffff]+))?")

# RFC 5321 4.5.3.1.1-3
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


@dataclass(frozen=True)
class Mailbox:
    """
    A parsed mailbox.  C{local} is unquoted; C{quoted} records that it came
    quoted; C{literal} that the domain is an address literal.
    """

    local: str
    domain: str
    quoted: bool = False
    literal: bool = False
    utf8: bool = False      # written with UTF-8 (RFC 6531): needs SMTPUTF8

    def __str__(self) -> str:
        local = self.local
        if self.quoted and not is_dot_atom(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}" if self.domain else local


def is_dot_atom(text: str) -> bool:
    """A dot-atom, of RFC 5321 or (with UTF-8 in it) of RFC 6532 3.2."""
    if text.isascii():
        return _DOT_STRING.fullmatch(text) is not None
    return _UTF8_DOT_STRING.fullmatch(text) is not None and text.isprintable()


def a_label_domain(domain: str) -> str:
    """
    C{domain} as the DNS knows it: lower case, U-labels turned into
    A-labels and A-labels checked, by IDNA 2008 (RFC 5891; UTS 46 mapping,
    so that case differences do not matter).
    @raise AddressError: not a valid IDNA 2008 name, or a label too long.
    """
    if domain.isascii() and "xn--" not in domain.lower():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise AddressError(f"bad internationalised domain: {e}") from None


def _unquote(quoted: str) -> str:
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


def parse_mailbox(text: str, allow_no_domain: bool = False) -> Mailbox:
    """
    ``Mailbox = Local-part "@" ( Domain / address-literal )``.
    With C{allow_no_domain}, a bare ``Postmaster`` is accepted (RFC 5321 4.1.1.3).
    """
    if text.startswith('"'):
        match = _QUOTED_STRING.match(text)
        if match is None:
            raise AddressError("bad quoted local part")
        local_raw, rest = match.group(), text[match.end():]
        local, quoted = _unquote(local_raw), True
    else:
        local_raw, at, domain_part = text.rpartition("@")
        if not at:
            if allow_no_domain and text.lower() == "postmaster":
                return Mailbox("postmaster", "")
            raise AddressError("address has no domain")
        if not is_dot_atom(local_raw):
            raise AddressError("bad local part")
        local, quoted, rest = local_raw, False, "@" + domain_part
    if not rest.startswith("@"):
        raise AddressError("address has no domain")
    domain = rest[1:]
    utf8 = not text.isascii()
    if utf8 and not _is_utf8(text):
        # RFC 6532 3.2: UTF-8 only; the octets that were not (the command
        # line is decoded with surrogateescape) make no address.
        raise AddressError("address is not valid UTF-8")
    if utf8:
        if not local.isprintable():
            raise AddressError("control characters in local part")
        # RFC 6532 3.1: one form per mailbox name.
        local = unicodedata.normalize("NFC", local)
    # RFC 5321 4.5.3.1.1 and RFC 6531 3.3: octets, not characters.
    if len(local_raw.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if _ADDRESS_LITERAL.fullmatch(domain):
        return Mailbox(local, domain, quoted, literal=True, utf8=utf8)
    domain = a_label_domain(domain)
    if not _DOMAIN.fullmatch(domain) or len(domain) > MAX_DOMAIN:
        raise AddressError("bad domain")
    return Mailbox(local, domain, quoted, utf8=utf8)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split_path(argument: str, keyword: str) -> tuple[str, str]:
    """``FROM:<path> params`` -> (path inside brackets, params text)."""
    head = argument[: len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise AddressError(f"expected {keyword}:")
    rest = argument[len(keyword) + 1:].lstrip(" ")
    if not rest.startswith("<"):
        raise AddressError("path must be in angle brackets")
    end = _path_end(rest)
    path, params = rest[1:end], rest[end + 1:]
    if len(rest[: end + 1]) > MAX_PATH:
        raise AddressError("path too long")
    if params and not params.startswith(" "):
        raise AddressError("junk after path")
    return path, params.strip(" ")


def _path_end(text: str) -> int:
    """Index of the ``>`` closing the path, skipping quoted strings."""
    in_quotes = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return i
    raise AddressError("unterminated path")


def _strip_route(path: str) -> str:
    """``@a,@b:user@c`` -> ``user@c``; RFC 5321 4.1.1.3 lets us ignore routes."""
    if not path.startswith("@"):
        return path
    route, colon, mailbox = path.partition(":")
    if not colon:
        raise AddressError("bad source route")
    for hop in route.split(","):
        if not hop.startswith("@") or not _DOMAIN.fullmatch(hop[1:]):
            raise AddressError("bad source route")
    return mailbox


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split():
        match = _PARAM.fullmatch(word)
        if match is None:
            raise ParameterError(f"bad parameter {word!r}")
        key = match.group(1).upper()
        if key in params:
            raise ParameterError(f"duplicate parameter {key}")
        params[key] = match.group(2)
    return params


def parse_mail_argument(argument: str) -> tuple[Mailbox | None, dict[str, str | None]]:
    """``FROM:<reverse-path> [params]``; the null path gives C{None}."""
    path, params = _split_path(argument, "FROM")
    parsed = parse_params(params)
    if path == "":
        return None, parsed
    return parse_mailbox(_strip_route(path)), parsed


def parse_rcpt_argument(argument: str) -> tuple[Mailbox, dict[str, str | None]]:
    """``TO:<forward-path> [params]``; ``<Postmaster>`` is allowed."""
    path, params = _split_path(argument, "TO")
    return parse_mailbox(_strip_route(path), allow_no_domain=True), parse_params(params)


# -- the relay rule ----------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """A recipient in a local domain, normalised: lowercase, unquoted."""

    address: str


@dataclass(frozen=True)
class Remote:
    """A recipient elsewhere: a relay, allowed only after AUTH."""

    mailbox: Mailbox


@dataclass(frozen=True)
class Forbidden:
    """An address shape that must never be delivered or relayed."""

    reason: str


# Characters that some MTA, somewhere, reads as a routing instruction:
# the percent hack, UUCP bang paths, a second "@" inside quotes.
_ROUTING_CHARACTERS = set("%!@")


def literal_address(domain: str):
    """
    The IP address an address literal names (RFC 5321 4.1.3:
    ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), or None for anything else.
    """
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    tag, colon, rest = text.partition(":")
    if colon and tag.lower() == "ipv6":
        text, version = rest, 6
    else:
        version = 4
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip if ip.version == version else None


def is_own_literal(domain: str, own_addresses) -> bool:
    """Whether C{domain} is an address literal of one of the node's own addresses."""
    ip = literal_address(domain)
    return ip is not None and ip in own_addresses


def classify(mailbox: Mailbox, local_domains, postmaster_domain: str,
             own_addresses=frozenset()):
    """
    Decide where a recipient belongs.  Local names are matched without
    case; anything that could be re-routed by a later hop is forbidden.
    An address literal of the node's own (C{own_addresses}) names this
    host (RFC 5321 4.1.3), so its mailboxes are those of the main domain
    C{postmaster_domain}; any other literal is forbidden.
    """
    if not mailbox.domain:
        return Local(f"postmaster@{postmaster_domain}")
    domain = mailbox.domain
    if mailbox.literal:
        if not is_own_literal(domain, own_addresses):
            return Forbidden("address literal")
        domain = postmaster_domain
    if domain in local_domains:
        if _ROUTING_CHARACTERS & set(mailbox.local):
            return Forbidden("routing characters in local part")
        if not is_dot_atom(mailbox.local):
            return Forbidden("quoted local part")
        return Local(f"{mailbox.local.lower()}@{domain}")
    return Remote(mailbox)
