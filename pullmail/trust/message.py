"""
The few facts about a message's header that signing and verifying need:
its fields, and the RFC 5322 From domain.  Pure; bytes in, values out.
"""

from __future__ import annotations

import email.utils
import re

__all__ = ["header_end", "header_fields", "from_domains"]

# RFC 5322 2.2: field-name is printable US-ASCII but ":"; a line starting
# with WSP continues the field above (2.2.3).
_FIELD_START = re.compile(rb"([!-9;-~]+)[ \t]*:")


def header_end(message: bytes) -> int:
    """The offset just past the header's blank line (len when there is none)."""
    if message.startswith(b"\r\n"):
        return 2
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end + 4


def header_fields(message: bytes) -> list[tuple[bytes, bytes, int, int]]:
    """
    Every header field: (lower-case name, unfolded value, start, end), the
    offsets covering the whole field with its continuation lines and CRLF.
    A line that is not a field (and not a continuation) ends the header.
    """
    fields: list[tuple[bytes, bytes, int, int]] = []
    end_of_header = header_end(message)
    position = 0
    while position < end_of_header:
        line_end = message.find(b"\r\n", position, end_of_header)
        if line_end < 0 or line_end == position:
            break
        match = _FIELD_START.match(message, position, line_end)
        if match is None:
            break
        end = line_end + 2
        while end < end_of_header and message[end:end + 1] in (b" ", b"\t"):
            next_end = message.find(b"\r\n", end, end_of_header)
            end = end_of_header if next_end < 0 else next_end + 2
        value = message[match.end():end].replace(b"\r\n", b"").strip()
        fields.append((match.group(1).lower(), value, position, end))
        position = end
    return fields


# RFC 5322 3.4: the usual From, one mailbox: a dot-atom address, alone or
# in angle brackets after a display name of atoms.  Anything else (quotes,
# comments, groups, several mailboxes, obsolete forms) goes to the full
# parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ADDRESS = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_PLAIN_MAILBOX = re.compile(rf"(?:{_ADDRESS})|(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~ -]*<{_ADDRESS}>)")


def from_domains(message: bytes) -> list[str]:
    """
    The domains of the RFC 5322 From field's mailboxes, lower-case: one for
    an ordinary message.  RFC 7489 6.6.1: several From fields, several
    mailboxes, or none leave no single identity ([] or more than one).
    """
    values = [value for name, value, _, _ in header_fields(message) if name == b"from"]
    domains = []
    for value in values:
        text = value.decode("utf-8", "replace")
        plain = _PLAIN_MAILBOX.fullmatch(text)
        if plain is not None:   # what the full parser makes of it, at a tenth of the cost
            domains.append((plain.group(1) or plain.group(2)).lower())
            continue
        for _name, address in email.utils.getaddresses([text]):
            domain = address.rpartition("@")[2].strip().rstrip(".").lower()
            if "@" in address and domain:
                domains.append(domain)
            else:
                return []
    return domains
