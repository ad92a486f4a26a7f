"""
MTA-STS (RFC 8461) without I/O: the ``_mta-sts`` TXT record, the policy
file, MX host matching, and what a policy says about one candidate host.

Everything here is a pure function of its arguments, so the rules can be
read next to the RFC and tested as tables.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from pullmail.smtp.address import AddressError, a_label_domain

__all__ = [
    "MAX_AGE_LIMIT", "MAX_POLICY_SIZE", "Mode", "Policy", "PolicyError", "Verdict", "Decision",
    "parse_txt", "parse_policy", "mx_matches", "allowed",
]

# RFC 8461 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31_557_600
# RFC 8461 3.3 lets senders cap the body; 64 KiB is far above any real
# policy (a few hundred octets) and what other implementations use.
MAX_POLICY_SIZE = 64 * 1024


class PolicyError(ValueError):
    """A TXT record or policy file that RFC 8461 says to treat as absent."""


class Mode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class Policy:
    """A parsed policy file (RFC 8461 3.2), and the TXT id it was fetched for."""

    mode: Mode
    max_age: int
    mx: tuple[str, ...]
    id: str = ""


# -- the TXT record (RFC 8461 3.1) ----------------------------------------------
#   sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
#   sts-version     = %s"v=STSv1"
#   sts-id          = %s"id=" 1*32(ALPHA / DIGIT)
#   sts-ext-name    = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
#   sts-ext-value   = 1*(%x21-3A / %x3C / %x3E-7E)     ; VCHAR but ";" and "="
#   sts-field-delim = *WSP ";" *WSP
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")


def parse_txt(records: list[str]) -> str:
    """
    The policy id of a domain's ``_mta-sts`` TXT records.  Records that do
    not begin with ``v=STSv1;`` are discarded; unless exactly one is left,
    and it is valid, the domain has no policy (RFC 8461 3.1).

    @raise PolicyError: no usable record.
    """
    candidates = [r for r in records if r.startswith("v=STSv1;")]
    if len(candidates) != 1:
        raise PolicyError(f"{len(candidates)} TXT records begin with v=STSv1;")
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields[-1] == "":
        fields.pop()  # the optional trailing delimiter
    values: dict[str, str] = {}
    for text in fields[1:]:
        name, equals, value = text.partition("=")
        if not equals or not _EXT_NAME.fullmatch(name) or not _TXT_EXT_VALUE.fullmatch(value):
            raise PolicyError(f"malformed TXT field {text[:40]!r}")
        values.setdefault(name, value)  # RFC 8461 3.2: only the first instance counts
    if not fields[1:]:
        raise PolicyError("TXT record has no fields")
    record_id = values.get("id")
    if record_id is None or not _TXT_ID.fullmatch(record_id):
        raise PolicyError("TXT record has no valid id")
    return record_id


# -- the policy file (RFC 8461 3.2) ---------------------------------------------
#   sts-policy-field-delim = ":" *WSP
#   sts-policy-term        = LF / CRLF
#   sts-policy-mx-value    = ["*."] Domain
#   sts-policy-max-age-value = 1*10DIGIT
#   sts-policy-ext-value   = sts-policy-vchar *(*WSP sts-policy-vchar)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_POLICY_VALUE = re.compile(r"[^\x00-\x20\x7f]+(?:[ \t]*[^\x00-\x20\x7f]+)*")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


def _mx_pattern(value: str) -> str:
    """
    An ``mx`` value, lower case; U-labels (beyond RFC 8461 3.2's ASCII
    grammar, but the name is meant) as A-labels, as MX names come from DNS.
    """
    if not value.isascii():
        wildcard = "*." if value.startswith("*.") else ""
        try:
            value = wildcard + a_label_domain(value.removeprefix(wildcard))
        except AddressError:
            raise PolicyError(f"bad mx pattern {value[:60]!r}") from None
    if not _MX_PATTERN.fullmatch(value) or len(value) > 253:
        raise PolicyError(f"bad mx pattern {value[:60]!r}")
    return value.lower()


def parse_policy(body: bytes, policy_id: str = "") -> Policy:
    """
    Parse a policy file.  Unknown fields are ignored; a field other than
    ``mx`` given twice counts only the first time (RFC 8461 3.2); anything
    that is not the grammar, a missing field, or a value out of bounds makes
    the whole policy invalid.

    @raise PolicyError: not a valid policy.
    """
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyError(f"policy larger than {MAX_POLICY_SIZE} octets")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the optional last terminator
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        name, colon, value = line.partition(":")
        value = value.lstrip(" \t").rstrip(" \t")   # *WSP after the delimiter and the field
        if not colon or not _EXT_NAME.fullmatch(name) or not _POLICY_VALUE.fullmatch(value):
            raise PolicyError(f"line {number} is not a policy field")
        if name == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(name, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    try:
        mode = Mode(fields.get("mode"))
    except ValueError:
        raise PolicyError("mode is not enforce, testing or none") from None
    max_age = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(max_age) or int(max_age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age is not a number of seconds up to {MAX_AGE_LIMIT}")
    if not mx and mode is not Mode.NONE:
        raise PolicyError("no mx pattern")
    return Policy(mode, int(max_age), tuple(mx), policy_id)


# -- applying a policy (RFC 8461 4 and 5) ---------------------------------------


def mx_matches(pattern: str, host: str) -> bool:
    """
    RFC 8461 4.1: an exact, case-insensitive name, or ``*.`` standing for
    exactly the leftmost label: ``*.example.com`` matches
    ``mail.example.com`` but neither ``example.com`` nor
    ``foo.bar.example.com``.
    """
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, parent = host.partition(".")
        return bool(label) and bool(dot) and parent == pattern[2:]
    return host == pattern


class Verdict(enum.Enum):
    DELIVER = "deliver"        # the host passes, or no policy applies
    REFUSE = "refuse"          # enforce: this host gets nothing
    REPORT = "report"          # testing: deliver, but log what enforce would refuse


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""


def allowed(policy: Policy | None, host: str, verified: bool | None = None) -> Decision:
    """
    What C{policy} says about delivering to MX C{host}.  C{verified} is
    whether its certificate was validated for C{host} over STARTTLS (RFC
    8461 4.2), or None before the connection: then only the name is judged.
    Enforce refuses a host that fails either check, testing only reports
    it, and mode none (or no policy) lets everything through (RFC 8461 5).
    """
    if policy is None or policy.mode is Mode.NONE:
        return Decision(Verdict.DELIVER)
    if not any(mx_matches(pattern, host) for pattern in policy.mx):
        problem = f"MX {host} is not in the MTA-STS policy (mx: {', '.join(policy.mx)})"
    elif verified is False:
        problem = f"MX {host} has no STARTTLS with a certificate valid for its name (MTA-STS)"
    else:
        return Decision(Verdict.DELIVER)
    if policy.mode is Mode.ENFORCE:
        return Decision(Verdict.REFUSE, problem)
    return Decision(Verdict.REPORT, problem)
