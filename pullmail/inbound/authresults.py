"""
The ``Authentication-Results`` header field (RFC 8601): built from our
verdicts, and the copies claiming our authserv-id that arrive from outside
removed (RFC 8601 5), so a reader can trust the one at the top.  Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from pullmail.trust.message import header_end, header_fields

__all__ = ["Results", "authentication_results", "strip_ours"]

# RFC 8601 2.2: authserv-id is a value (a token or a quoted string);
# comments (CFWS) may come first.
_COMMENT = re.compile(rb"\((?:[^()\\]|\\.)*\)")
_UNSAFE = re.compile(r"[^!-~ ]|[()\\]")
_TOKEN = re.compile(r"[!#$%&'*+.0-9A-Z^_`a-z{|}~-]+\Z")


@dataclass(frozen=True)
class Results:
    """One message's verdicts, as method results (RFC 8601 2.7)."""

    spf: tuple[str, str, str] | None = None          # result, mailfrom|helo, identity
    dkim: tuple = ()                                  # DKIMResult per signature
    dmarc: object | None = None                       # DMARCVerdict
    arc: object | None = None                         # ARCResult
    auth_user: str | None = None                      # authenticated submission


def _comment(text: str) -> str:
    """Peer-supplied text, safe inside a comment: printable ASCII, no parens."""
    if not text:
        return ""
    cleaned = _UNSAFE.sub("", text)[:100].strip()
    return f" ({cleaned})" if cleaned else ""


def _value(text: str) -> str:
    """RFC 8601 2.3 pvalue: a token, an address, or a quoted string."""
    if _TOKEN.match(text.replace("@", "")) and text.count("@") <= 1:
        return text
    return '"' + _UNSAFE.sub("", text).replace('"', "") + '"'


def authentication_results(authserv_id: str, results: Results) -> bytes:
    """The whole field, folded one result a line, CRLF-terminated."""
    parts = []
    if results.auth_user is not None:
        parts.append(f"auth=pass smtp.auth={_value(results.auth_user)}")
    if results.spf is not None:
        result, kind, identity = results.spf
        parts.append(f"spf={result} smtp.{kind}={_value(identity)}")
    if results.spf is not None or results.dkim:
        for dkim in results.dkim or ():
            part = f"dkim={dkim.result}{_comment(dkim.reason)}"
            if dkim.domain:
                part += f" header.d={_value(dkim.domain)}"
            if dkim.selector:
                part += f" header.s={_value(dkim.selector)}"
            if dkim.signature:
                part += f" header.b={_value(dkim.signature)}"
            parts.append(part)
        if not results.dkim:
            parts.append("dkim=none")
    if results.arc is not None:
        parts.append(_arc(results.arc))
    verdict = results.dmarc
    if verdict is not None:
        part = f"dmarc={verdict.result}"
        if verdict.policy:
            part += f" (p={verdict.policy} dis={verdict.disposition})"
        elif verdict.reason:
            part += _comment(verdict.reason)
        if verdict.domain:
            part += f" header.from={_value(verdict.domain)}"
        parts.append(part)
    # RFC 8601 2.2: "none" when no method ran.
    body = ";\r\n\t".join(parts) if parts else "none"
    return f"Authentication-Results: {authserv_id};\r\n\t{body}\r\n".encode("utf-8", "replace")


def _arc(verdict) -> str:
    """
    RFC 8617 7.1: ``arc=`` and the chain's status; the comment names the
    last sealer and its instance.  (An ARC set we add copies this result
    into its cv=, RFC 8617 5.1.)
    """
    part = f"arc={verdict.result}"
    if verdict.instance:
        part += _comment(f"i={verdict.instance} d={verdict.domain} {verdict.reason}")
    return part


def _authserv_id(value: bytes) -> bytes:
    value = _COMMENT.sub(b"", value).strip()
    ident = value.split(b";", 1)[0].strip()
    return ident.strip(b'"').lower()


def strip_ours(message: bytes, authserv_id: str) -> bytes:
    """
    C{message} without the Authentication-Results fields that carry
    C{authserv_id} (RFC 8601 5: a forged verdict of ours).  The same
    object when there is none, as for nearly every message.
    """
    end = header_end(message)
    if b"authentication-results" not in message[:end].lower():
        return message
    ours = authserv_id.lower().encode("utf-8")
    cut: Sequence[tuple[int, int]] = [
        (start, stop) for name, value, start, stop in header_fields(message)
        if name == b"authentication-results" and _authserv_id(value) == ours
    ]
    if not cut:
        return message
    pieces, position = [], 0
    for start, stop in cut:
        pieces.append(message[position:start])
        position = stop
    pieces.append(message[position:])
    return b"".join(pieces)
