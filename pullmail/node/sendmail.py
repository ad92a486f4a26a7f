"""
``pullmail sendmail`` (and ``pullmail-sendmail``, to install as
/usr/sbin/sendmail): Postfix's sendmail(1) command line over the drop folder.

    sendmail [--config FILE] [-t] [-i|-oi] [-f SENDER] [-F NAME]
             [-N DSN] [-R RETURN] [-V ENVID] [RECIPIENT...]

The message is read whole from standard input and checked before anything
is written, then queued in one durable write (L{maildrop.drop_message}):
on any error nothing is queued.  Exit codes are sysexits(3), as Postfix's.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence, TextIO

from pullmail import config as configuration
from pullmail.node.control import SOCKET_NAME
from pullmail.node.maildrop import Drop, drop_message, dsn_request, may_choose_sender, user_name
from pullmail.smtp.address import AddressError, parse_mailbox

__all__ = ["main", "parse_arguments", "read_message", "SendmailError"]

EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT = 0, 64, 65, 66
EX_SOFTWARE, EX_CANTCREAT, EX_IOERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 70, 73, 74, 75, 77, 78

# Flags Postfix's sendmail accepts and ignores, with and without an argument.
_IGNORED_WITH_ARGUMENT = set("BCXLhO")
# Those that ask for delivery status notifications (RFC 3461): -N, -R, -V.
_DSN_FLAGS = {"N": "notify", "R": "ret", "V": "envid"}
_IGNORED = set("vmnUGAIS")


class SendmailError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Arguments:
    config: str | None = None
    extract: bool = False            # -t
    dot_ends: bool = True            # a lone "." ends the message unless -i / -oi
    sender: str | None = None        # -f / -r
    full_name: str | None = None     # -F
    mode: str = "m"                  # -bm; -bi (newaliases) does nothing
    recipients: list[str] = field(default_factory=list)
    dsn: dict[str, str] = field(default_factory=dict)   # -N, -R, -V as given


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """sendmail's options, as Postfix's sendmail(1) takes them (unknown ones: EX_USAGE)."""
    args = Arguments()
    items = list(argv)
    while items:
        item = items.pop(0)
        if item == "--":
            break
        if item in ("--config", "-c") or item.startswith("--config="):
            args.config = item.partition("=")[2] if "=" in item else _value(items, item)
            continue
        if not item.startswith("-") or item == "-":
            items.insert(0, item)
            break
        flag, rest = item[1], item[2:]
        if flag == "t" and not rest:
            args.extract = True
        elif flag == "i" and not rest:
            args.dot_ends = False
        elif flag == "o":                  # -oi; other -oX options are ignored
            args.dot_ends = args.dot_ends and rest != "i"
        elif flag in "fr":
            args.sender = rest or _value(items, item)
        elif flag == "F":
            args.full_name = rest or _value(items, item)
        elif flag in _DSN_FLAGS:
            args.dsn[_DSN_FLAGS[flag]] = rest or _value(items, item)
        elif flag == "b":
            if rest not in ("m", "i"):
                raise SendmailError(EX_USAGE, f"-b{rest} is not supported (only -bm, -bi)")
            args.mode = rest
        elif flag == "e" or (flag in _IGNORED and not rest) or flag == "d":
            pass
        elif flag in _IGNORED_WITH_ARGUMENT:
            if not rest:
                _value(items, item)
        else:
            raise SendmailError(EX_USAGE, f"unknown option {item}")
    args.recipients = [r for item in items for r in item.split(",") if r.strip()]
    return args


def _value(items: list[str], flag: str) -> str:
    if not items:
        raise SendmailError(EX_USAGE, f"option {flag} needs a value")
    return items.pop(0)


def read_message(stream: BinaryIO, dot_ends: bool, limit: int) -> bytes:
    """
    Standard input as one message with CRLF line ends; a line of one ``.``
    ends it unless C{dot_ends} is off (-i).  Raises L{SendmailError} rather
    than return a part of it.
    """
    lines = []
    size = 0
    try:
        for line in stream:
            body = line.rstrip(b"\r\n")
            if dot_ends and body == b".":
                break
            size += len(body) + 2
            if size > limit:
                raise SendmailError(
                    EX_DATAERR, f"message too big: over limits.message_size ({limit} bytes)")
            lines.append(body)
    except (OSError, ValueError) as e:
        raise SendmailError(EX_NOINPUT, f"cannot read the message: {e}") from None
    if not lines:
        raise SendmailError(EX_NOINPUT, "no message on standard input")
    return b"".join(body + b"\r\n" for body in lines)


_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*)$")


def header_recipients(message: bytes) -> tuple[list[str], bytes]:
    """-t: the To, Cc and Bcc addresses of the header, and the message without its Bcc."""
    head, blank, body = message.partition(b"\r\n\r\n")
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    found, kept = [], []
    for lines in fields:
        match = _FIELD.match(lines[0])
        name = match.group(1).lower() if match else b""
        if name in (b"to", b"cc", b"bcc"):
            value = b" ".join([match.group(2)] + [more.strip() for more in lines[1:]])
            text = value.decode("utf-8", "replace")
            found.extend(address for _, address in email.utils.getaddresses([text]) if address)
        if name != b"bcc":
            kept.extend(lines)
    return found, b"\r\n".join(kept) + blank + body


def checked_address(text: str, hostname: str, option: str) -> str:
    """A mailbox; a bare local part gets ``@hostname`` (Postfix's myorigin)."""
    text = text.strip().removeprefix("<").removesuffix(">")
    if text and "@" not in text:
        text = f"{text}@{hostname}"
    try:
        return str(parse_mailbox(text))
    except AddressError as e:
        raise SendmailError(EX_DATAERR, f"{option} {text!r}: malformed address ({e})") from None


def poke(state_dir) -> None:
    """Tell a running node to look in the drop folder now; no node: it will at start."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        client.connect(str(state_dir / SOCKET_NAME))
        client.sendall(json.dumps({"command": "maildrop"}).encode() + b"\n")
        client.recv(4096)
    except OSError:
        pass
    finally:
        client.close()


def send(args: Arguments, stdin: BinaryIO, user: str, uid: int) -> str:
    try:
        config = configuration.load_config(args.config)
    except configuration.ConfigError as e:
        raise SendmailError(EX_CONFIG, str(e)) from None
    hostname = config.node.hostname
    if args.sender is not None and args.sender != "" and not may_choose_sender(
        user, uid, config.sendmail.trusted_users, -1
    ):
        raise SendmailError(EX_NOPERM, f"-f is not allowed for {user} "
                                       "(see [sendmail] trusted_users)")
    recipients = [checked_address(r, hostname, "recipient") for r in args.recipients]
    sender = None if args.sender is None else (
        "" if args.sender in ("", "<>") else checked_address(args.sender, hostname, "-f"))
    if not recipients and not args.extract:
        raise SendmailError(EX_USAGE, "no recipients: give them as arguments or use -t")
    try:
        request = dsn_request(**args.dsn)
    except ValueError as e:
        raise SendmailError(EX_USAGE, str(e)) from None
    message = read_message(stdin, args.dot_ends, config.limits.message_size)
    if args.extract:
        extracted, message = header_recipients(message)
        recipients += [checked_address(r, hostname, "header recipient") for r in extracted]
        if not recipients:
            raise SendmailError(EX_USAGE, "no recipients in To, Cc or Bcc (-t)")
    if len(recipients) > config.limits.recipients:
        raise SendmailError(EX_USAGE, f"too many recipients (limits.recipients is "
                                      f"{config.limits.recipients})")
    drop = Drop(sender, tuple(dict.fromkeys(recipients)), message, args.full_name, request)
    try:
        name = drop_message(config.state_dir, drop)
    except PermissionError as e:
        raise SendmailError(EX_CANTCREAT, f"cannot write the drop folder: {e}") from None
    except OSError as e:
        raise SendmailError(EX_TEMPFAIL, f"cannot queue the message: {e}") from None
    poke(config.state_dir)
    return name


def main(argv: Sequence[str] | None = None, stdin: BinaryIO | None = None,
         err: TextIO | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    err = err or sys.stderr
    try:
        args = parse_arguments(argv)
        if args.mode == "i":
            return EX_OK        # newaliases: pullmail reads its aliases file itself
        if stdin is None:
            if sys.stdin is None:
                raise SendmailError(EX_NOINPUT, "standard input is closed")
            stdin = sys.stdin.buffer
        send(args, stdin, user_name(os.getuid()), os.getuid())
    except SendmailError as e:
        print(f"sendmail: fatal: {e}", file=err)
        return e.status
    except KeyboardInterrupt:
        print("sendmail: interrupted; nothing queued", file=err)
        return EX_TEMPFAIL
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
