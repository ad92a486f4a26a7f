"""
Peer-supplied text made safe to log.  Pure.

Verbs, arguments, EHLO names and addresses come from strangers.  Logged
raw, an ESC sequence or a backspace reaches the operator's terminal (log
injection); a CR or LF forges a log line.  L{printable} escapes them.
"""

from __future__ import annotations

__all__ = ["printable"]

# Long enough for any legitimate command line (RFC 5321 4.5.3.1.4).
MAX_LOGGED = 512


def _escape(ch: str) -> str:
    point = ord(ch)
    if 0xDC80 <= point <= 0xDCFF:        # a non-UTF-8 byte (surrogateescape)
        return f"\\x{point - 0xDC00:02x}"
    if point < 0x100:
        return f"\\x{point:02x}"
    return f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"


def printable(value: object, limit: int = MAX_LOGGED) -> str:
    """
    C{value} (text, bytes or anything with a C{str}) with what is not
    printable (controls, format characters such as bidi overrides, line and
    odd space separators), backslashes and bytes that are not UTF-8 escaped
    (``\\x1b``), cut to C{limit} characters.
    """
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "surrogateescape")
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(ch if ch.isprintable() and ch != "\\" else _escape(ch) for ch in text)
