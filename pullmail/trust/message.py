"""
The few facts about a message's header that signing and verifying need:
its fields, and the RFC 5322 From domain; L{ParsedMessage}, the form
dkimpy parses a message into, shared by every signature of a message.
Pure; bytes in, values out.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import dkim
import dkim.util
from dkim.canonicalization import Relaxed, correct_empty_body, strip_trailing_lines

__all__ = ["header_end", "header_fields", "authors", "Authors", "loose_tags", "squeezed",
           "ParsedMessage", "hash_fields", "parse_header", "tag_list", "relaxed_field",
           "canonical_fields"]

# RFC 5322 2.2: field-name is printable US-ASCII but ":"; a line starting
# with WSP continues the field above (2.2.3).  A whole field, folded lines
# and all, in one match: a line is what comes before a CRLF (a lone CR or
# LF is part of it); the last continuation may end the header unterminated.
_LINE = rb"[^\r]*(?:\r(?!\n)[^\r]*)*"
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:(" + _LINE + rb"\r\n(?:[ \t]" + _LINE + rb"(?:\r\n|\Z))*)")


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
    return [(match.group(1).lower(), match.group(2).replace(b"\r\n", b"").strip(),
             match.start(), match.end()) for match in _field_matches(message)]


def _field_matches(message: bytes) -> Iterator[re.Match]:
    """A match of _FIELD per header field, in order, up to the first line that is none."""
    end_of_header = header_end(message)
    position = 0
    while (match := _FIELD.match(message, position, end_of_header)) is not None:
        yield match
        position = match.end()


# RFC 5322 3.4: the usual From, one mailbox: a dot-atom address, alone or
# in angle brackets after a display name of atoms.  Anything else (quotes,
# comments, groups, several mailboxes, obsolete forms) goes to the full
# parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ADDRESS = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_PLAIN_MAILBOX = re.compile(rf"(?:{_ADDRESS})|(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~ -]*<{_ADDRESS}>)")


@dataclass(frozen=True)
class Authors:
    """The RFC 5322 From field as DMARC reads it (RFC 7489 6.6.1)."""

    fields: int = 0                     # how many From fields the header has
    domains: tuple[str, ...] = ()       # their mailboxes' distinct domains, lower-case
    mailboxes: int = 0

    @property
    def single(self) -> str | None:
        """The domain of the one author: one From field, one mailbox, with a domain."""
        return self.domains[0] if self.fields == self.mailboxes == len(self.domains) == 1 else None


def authors(header: bytes) -> Authors:
    """
    The From fields of C{header} and the domains of their mailboxes, in
    order; a mailbox without a domain (a bare local part, a group such as
    ``undisclosed-recipients:;``) names none.
    """
    values = [match.group(2).replace(b"\r\n", b"").strip() for match in _field_matches(header)
              if match.group(1).lower() == b"from"]
    domains: dict[str, None] = {}
    mailboxes = 0
    for value in values:
        text = value.decode("utf-8", "replace")
        plain = _PLAIN_MAILBOX.fullmatch(text)
        if plain is not None:   # what the full parser makes of it, at a tenth of the cost
            mailboxes += 1
            domains[(plain.group(1) or plain.group(2)).lower()] = None
            continue
        for _name, address in email.utils.getaddresses([text]):
            mailboxes += bool(address)
            domain = address.rpartition("@")[2].strip().rstrip(".").lower()
            if "@" in address and domain:
                domains[domain] = None
    return Authors(len(values), tuple(domains), mailboxes)


_TAG = re.compile(rb"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)")


def loose_tags(value: bytes) -> dict[bytes, bytes]:
    """The tags of a signature field (d=, s=, i=...), even one dkimpy's parser refuses."""
    return {m.group(1): m.group(2) for m in _TAG.finditer(value)}


def tag_list(value: bytes) -> dict[bytes, bytes]:
    """
    An RFC 6376 3.2 tag-list as dkimpy's parse_tag_value reads it (a tag
    name starts with a letter; no tag twice; a final ";" allowed), with
    its exceptions, at a third of its cost.
    """
    tags: dict[bytes, bytes] = {}
    specs = value.strip().split(b";")
    if not specs[-1]:
        specs.pop()
    for spec in specs:
        name, equals, tag_value = spec.partition(b"=")
        name = name.strip()
        if not equals or not name[:1].isalpha():
            raise dkim.util.InvalidTagSpec(spec)
        if name in tags:
            raise dkim.util.DuplicateTag(name)
        tags[name] = tag_value.strip()
    return tags


def squeezed(value: bytes) -> bytes:
    """A tag value without its folding white space (RFC 6376 3.2)."""
    return b"".join(value.split())


# dkimpy's RE_BTAG (the b= value, to be hashed empty) without its nested
# optional groups, which cost 25 us on an RSA signature: its FWS matches
# exactly what \s* does, so "(FWS base64)*" is a white-space-or-base64 run
# ending in a base64 character (tests/test_dkim.py compares the two).
_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")
# dkimpy's rfc822_parse: a field name is the shortest printable run before ":".
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_WSP_RUN = re.compile(rb"[\x09\x20]+")


def parse_header(header: bytes) -> list[list[bytes]]:
    """
    The [name, value] fields of a CRLF-only header, exactly as dkimpy's
    rfc822_parse gives them (values keep their folding and final CRLF; a
    "From " line is skipped), at a third of its cost; its
    L{dkim.MessageFormatError} for a line that is no field.
    """
    fields: list[list[bytes]] = []
    for line in header.split(b"\r\n"):
        if not line:
            break
        if line[0] in (9, 32):
            fields[-1][1] += line + b"\r\n"       # IndexError first: as dkimpy
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            fields.append([match.group(1), line[match.end():] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return fields


def relaxed_field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """
    RFC 6376 3.4.2 relaxed header canonicalization of one field, as
    dkimpy's Relaxed.canonicalize_headers makes it (unfold, each run of
    tabs and spaces one space, strip), without its two regex passes: when
    tabs and spaces are the only white space left after unfolding,
    splitting on white space and joining with one space is the same.
    """
    value = value.replace(b"\r\n", b"")
    if b"\n" in value:
        value = value.replace(b"\n", b"")      # dkimpy unfolds "\r?\n"
    if b"\r" in value or b"\x0b" in value or b"\x0c" in value:
        return name.lower().rstrip(), _WSP_RUN.sub(b" ", value).strip() + b"\r\n"
    return name.lower().rstrip(), b" ".join(value.split()) + b"\r\n"


def canonical_fields(algorithm, fields: Sequence) -> list[tuple[bytes, bytes]]:
    """C{fields} canonical by C{algorithm} (dkimpy's Simple or Relaxed)."""
    if algorithm is Relaxed:
        return [relaxed_field(name, value) for name, value in fields]
    return algorithm.canonicalize_headers(fields)


class ParsedMessage:
    """
    A message's header fields and body as dkimpy's parser gives them,
    parsed once for every signature (DKIM and ARC) it carries; each
    canonical form is made once, on first use, with dkimpy's
    canonicalization.
    """

    def __init__(self, message: bytes) -> None:
        end = header_end(message)
        if message.count(b"\n") == message.count(b"\r\n"):
            # CRLF throughout (as SMTP delivers it): the header alone is
            # parsed, and the body is already what dkimpy would return.
            self.headers = parse_header(message[:end])
            self.body = message[end:]
        else:
            self.headers, self.body = dkim.rfc822_parse(message)
        self.names = [name.lower() for name, _ in self.headers]
        self._fields: dict = {}
        self._bodies: dict = {}
        self._body_hashes: dict = {}
        self._instances: dict[bytes, list[int]] | None = None
        self._signed: dict[tuple, bytes] = {}

    def canonical_body(self, algorithm) -> bytes:
        if algorithm not in self._bodies:
            body = self.body
            if (algorithm is Relaxed and b"\t" not in body and b"  " not in body
                    and b" \r\n" not in body):
                # RFC 6376 3.4.4: with no tab, no run of spaces and no space
                # before a line end, relaxed changes only the empty lines at
                # the end; dkimpy's two regex passes would find nothing.
                self._bodies[algorithm] = correct_empty_body(strip_trailing_lines(body))
            else:
                self._bodies[algorithm] = algorithm.canonicalize_body(body)
        return self._bodies[algorithm]

    def body_hash(self, algorithm, length: int | None = None) -> bytes:
        """
        The SHA-256 of the canonical body (its first C{length} octets), made
        once for every signature that asks it the same (ours: RSA and Ed25519).
        """
        key = (algorithm, length)
        found = self._body_hashes.get(key)
        if found is None:
            body = self.canonical_body(algorithm)
            found = self._body_hashes[key] = hashlib.sha256(
                body if length is None else body[:length]).digest()
        return found

    def signed_fields(self, algorithm, include: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        """
        The canonical fields an h= list names, in its order: for a name
        named again, the next instance up from the bottom (RFC 6376
        5.4.2); a name with no instance left adds nothing.
        """
        if self._instances is None:
            self._instances = {}
            for index, name in enumerate(self.names):
                self._instances.setdefault(name, []).append(index)
        left = {name: list(self._instances[name]) for name in set(include)
                if name in self._instances}
        chosen = [left[name].pop() for name in include if left.get(name)]
        fields = self._fields.setdefault(algorithm, {})
        missing = [i for i in chosen if i not in fields]
        if missing:
            made = canonical_fields(algorithm, [self.headers[i] for i in missing])
            fields.update(zip(missing, made))
        return [fields[i] for i in chosen]

    def hash_signed(self, digest, algorithm, include: Sequence[bytes],
                    signature: tuple[bytes, bytes]) -> None:
        """
        Feed C{digest} the fields C{include} names, then the (name, value)
        of the signature field with an empty b= and no final CRLF (RFC
        6376 3.7).  Signatures with the same h= (ours: RSA and Ed25519)
        share the first one's work.
        """
        memo = (algorithm, tuple(include))
        block = self._signed.get(memo)
        if block is None:
            block = self._signed[memo] = b"".join(
                name + b":" + value for name, value in self.signed_fields(algorithm, include))
        digest.update(block)
        _hash_signature(digest, algorithm, signature)


def hash_fields(digest, algorithm, canonical: Sequence[tuple[bytes, bytes]],
                signature: tuple[bytes, bytes]) -> None:
    """
    Feed C{digest} the C{canonical} fields, then the (name, value) of the
    signature field with an empty b= and no final CRLF (RFC 6376 3.7, RFC
    8617 5.1.1), canonical by C{algorithm}.
    """
    digest.update(b"".join(name + b":" + value for name, value in canonical))
    _hash_signature(digest, algorithm, signature)


def _tag_name(match) -> bytes:
    """The b= of a match of _BTAG, its value gone (a function: no template to expand)."""
    return match.group(1)


def _hash_signature(digest, algorithm, signature: tuple[bytes, bytes]) -> None:
    name, value = signature
    [(name, value)] = canonical_fields(algorithm, [(name, _BTAG.sub(_tag_name, value))])
    digest.update(name + b":" + value.rstrip())
