# -*- test-case-name: tests.test_dsn -*-
"""
Delivery Status Notification parameters (RFC 3461): their syntax, and what
they ask of the reports.  Pure.

``MAIL FROM`` may carry ``RET=FULL|HDRS`` and ``ENVID=<xtext>`` (at most 100
characters, 4.4); each ``RCPT TO`` ``NOTIFY=NEVER`` or a list of
``SUCCESS``, ``FAILURE``, ``DELAY`` (4.1), and ``ORCPT=<addr-type>;<xtext>``
(4.2).  ``ORCPT=utf-8;...`` (RFC 6533 3) holds a UTF-8 address as
utf-8-addr-xtext (``\\x{E9}`` for each character beyond printable ASCII)
or, in an SMTPUTF8 transaction, utf-8-addr-unitext (those characters as
they are); it is kept in the xtext form, which any peer may be given and
a report may echo.  They are kept with the message as one plain dict (it
goes into JSON records as is):

    {"ret": "HDRS", "envid": "<xtext>", "notify": {rcpt: "SUCCESS,FAILURE"},
     "orcpt": {rcpt: "rfc822;<xtext>"}}

and passed on as given to peers that offer DSN.  Without ``NOTIFY`` a
recipient gets failure and delay reports, never a success one (4.1).
"""

from __future__ import annotations

import re
from typing import Mapping

from pullmail.smtp import replies
from pullmail.smtp.address import AddressError, parse_mailbox
from pullmail.smtp.replies import Reply

__all__ = ["check_mail_parameter", "check_rcpt_parameters", "xtext_decode", "xtext_encode",
           "wants", "mail_parameters", "rcpt_parameters", "for_recipients", "MAX_ENVID",
           "utf8_addr_decode", "utf8_addr_xtext"]

MAX_ENVID = 100                       # RFC 3461 4.4
_NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
# xtext = *( xchar / hexchar ); xchar = "!".."~" but "+" and "="; hexchar =
# "+" 2(%x30-39 / %x41-46) (RFC 3461 4).
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# addr-type = atom (RFC 3461 4.2); rfc822 and utf-8 (RFC 6533) are the known ones.
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")


# RFC 6533 3: utf-8-addr-xtext = 1*(QCHAR / EmbeddedUnicodeChar), and
# utf-8-addr-unitext the same with UTF-8 characters (QUCHAR) too.  QCHAR is
# printable ASCII but "\", "+" and "="; EmbeddedUnicodeChar is "\x{" HEXPOINT "}".
_QCHAR = r"\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e"
_UTF8_ADDR = re.compile(
    rf"(?:[{_QCHAR}\u0080-\ud7ff\ue000-\U0010ffff]|\\x\{{[0-9A-F]{{2,6}}\}})+")
_EMBEDDED = re.compile(r"\\x\{([0-9A-F]{2,6})\}")


def _bad(text: str) -> Reply:
    return replies.S501_SYNTAX.with_text(text)


def xtext_decode(text: str) -> str | None:
    """The text an xtext stands for; None when it is not xtext."""
    if _XTEXT.fullmatch(text) is None:
        return None
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """RFC 3461 4: "+", "=" and anything outside "!".."~" as +XX (UTF-8 octets)."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else
        "".join(f"+{octet:02X}" for octet in ch.encode("utf-8"))
        for ch in text
    )


def _hexpoint(digits: str) -> str | None:
    """
    The character a HEXPOINT (RFC 6533 3) stands for: its shortest upper-case
    hex (at least two digits), a Unicode scalar value that QCHAR cannot
    carry (a control, space, "+", "=", "\\", DEL, or beyond ASCII).
    """
    code = int(digits, 16)
    if f"{code:02X}" != digits or code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return None
    char = chr(code)
    if code < 0x80 and code > 0x20 and char not in "+=\\\x7f":
        return None
    return char


def utf8_addr_decode(text: str) -> str | None:
    """The address a utf-8-addr-xtext or -unitext stands for; None when it is neither."""
    if _UTF8_ADDR.fullmatch(text) is None:
        return None
    chars = [_hexpoint(digits) for digits in _EMBEDDED.findall(text)]
    if None in chars:
        return None
    it = iter(chars)
    return _EMBEDDED.sub(lambda m: next(it), text)


def utf8_addr_xtext(address: str) -> str:
    """RFC 6533 3: C{address} as utf-8-addr-xtext (7-bit, fit for any ORCPT)."""
    return "".join(ch if re.fullmatch(f"[{_QCHAR}]", ch) else f"\\x{{{ord(ch):02X}}}"
                   for ch in address)


def _orcpt(value: str, smtputf8: bool) -> Reply | str:
    """An ORCPT value (RFC 3461 4.2, RFC 6533 3) -> its kept form, or a refusal."""
    addr_type, semicolon, address = value.partition(";")
    if not (semicolon and _ADDR_TYPE.fullmatch(addr_type) and address):
        return _bad("ORCPT is addr-type;xtext (RFC 3461 4.2)")
    addr_type = addr_type.lower()
    if addr_type != "utf-8":
        if xtext_decode(address) is None:
            return _bad("ORCPT is addr-type;xtext (RFC 3461 4.2)")
        return f"{addr_type};{address}"
    if not address.isascii() and not smtputf8:
        return _bad("ORCPT=utf-8 with UTF-8 in it needs SMTPUTF8 (RFC 6533 3)")
    decoded = utf8_addr_decode(address)
    if decoded is None:
        return _bad("ORCPT=utf-8 is not utf-8-addr-xtext or -unitext (RFC 6533 3)")
    try:
        parse_mailbox(decoded)
    except AddressError:
        return _bad("ORCPT=utf-8 does not hold a mailbox (RFC 6533 3)")
    return "utf-8;" + utf8_addr_xtext(decoded)


def check_mail_parameter(key: str, value: str | None) -> Reply | None:
    """A refusal for a bad ``RET`` or ``ENVID``, else None."""
    if key == "RET":
        if value is None or value.upper() not in ("FULL", "HDRS"):
            return _bad("RET takes FULL or HDRS")
    elif key == "ENVID":
        if value is None or xtext_decode(value) is None:
            return _bad("ENVID is not xtext (RFC 3461 4)")
        if len(value) > MAX_ENVID:
            return _bad(f"ENVID is longer than {MAX_ENVID} characters (RFC 3461 4.4)")
    return None


def check_rcpt_parameters(params: Mapping[str, str | None],
                          smtputf8: bool = False) -> Reply | dict:
    """
    The RCPT parameters, checked: a refusal, or the DSN ones to keep.
    C{smtputf8}: the transaction has SMTPUTF8, so ORCPT may be unitext.
    """
    kept: dict[str, str] = {}
    for key, value in params.items():
        if key == "NOTIFY":
            words = (value or "").upper().split(",")
            if "NEVER" in words and words != ["NEVER"]:
                return _bad("NOTIFY=NEVER stands alone (RFC 3461 4.1)")
            if words != ["NEVER"] and (
                    not set(words) <= set(_NOTIFY_WORDS) or len(set(words)) != len(words)):
                return _bad("NOTIFY takes NEVER, or SUCCESS, FAILURE, DELAY")
            kept["notify"] = ",".join(words)
        elif key == "ORCPT":
            orcpt = _orcpt(value or "", smtputf8)
            if isinstance(orcpt, Reply):
                return orcpt
            kept["orcpt"] = orcpt
        else:
            return replies.S555_BAD_PARAMETER.with_text(f"Unsupported parameter {key}")
    return kept


def for_recipients(mail_params: Mapping[str, str | None],
                   by_recipient: Mapping[str, Mapping[str, str]]) -> dict:
    """The dict kept with a message (see the module): from MAIL's and each RCPT's."""
    dsn: dict = {}
    if mail_params.get("RET"):
        dsn["ret"] = mail_params["RET"].upper()
    if mail_params.get("ENVID"):
        dsn["envid"] = mail_params["ENVID"]
    for name in ("notify", "orcpt"):
        values = {r: p[name] for r, p in by_recipient.items() if p.get(name)}
        if values:
            dsn[name] = values
    return dsn


def wants(dsn: Mapping, recipient: str, what: str) -> bool:
    """Whether C{recipient} asked for a C{what} (SUCCESS, FAILURE, DELAY) report."""
    notify = dsn.get("notify", {}).get(recipient)
    if notify is None:
        return what != "SUCCESS"
    return what in notify.split(",")


def mail_parameters(dsn: Mapping) -> str:
    """``RET`` and ``ENVID`` for MAIL FROM, with their leading spaces."""
    text = f" RET={dsn['ret']}" if dsn.get("ret") else ""
    return text + (f" ENVID={dsn['envid']}" if dsn.get("envid") else "")


def rcpt_parameters(dsn: Mapping, recipient: str) -> str:
    """``NOTIFY`` and ``ORCPT`` for one RCPT TO, with their leading spaces."""
    text = ""
    if notify := dsn.get("notify", {}).get(recipient):
        text += f" NOTIFY={notify}"
    if orcpt := dsn.get("orcpt", {}).get(recipient):
        text += f" ORCPT={orcpt}"
    return text
