"""
Users and aliases: who exists, where their mail goes, what they may send as.

The users file holds one ``address:hash`` per line, the hash an scrypt
derivation with a per-user salt (``hashlib.scrypt``, RFC 7914).  The aliases
file holds ``alias@dom: a@dom, b@other`` lines; ``@dom: x@dom`` is the
domain's catch-all.  Both are read once at start-up into an immutable
L{Accounts}; ``pullmail adduser`` rewrites the users file atomically.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from pullmail.smtp.address import AddressError, is_dot_atom, parse_mailbox
from pullmail.storage.durable import write_atomically

__all__ = ["Accounts", "AccountsError", "hash_password", "verify_password", "add_user"]

# RFC 7914 section 2 parameters; n=2**14 costs ~16 MiB and ~50 ms, a
# reasonable interactive login cost.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_LENGTH = 32
# Local parts we create maildirs for: safe as one path component.  Beyond
# ASCII (RFC 6531), letters, marks and digits only: no separators, controls,
# spaces, bidi overrides or look-alike dots in a folder name.
_MAILBOX_LOCAL = re.compile(r"[a-z0-9\u0080-\U0010ffff][a-z0-9._+\-\u0080-\U0010ffff]{0,63}")


def _mailbox_local(local: str) -> bool:
    return (_MAILBOX_LOCAL.fullmatch(local) is not None and ".." not in local
            and len(local.encode("utf-8")) <= 64
            and all(c.isascii() or unicodedata.category(c)[0] in "LMN" for c in local))


class AccountsError(ValueError):
    """A users or aliases file line is wrong."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R,
        p=_SCRYPT_P, dklen=_SCRYPT_LENGTH,
    )
    return f"$scrypt$n={_SCRYPT_N},r={_SCRYPT_R},p={_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, scheme, params, salt, digest = stored.split("$")
        settings = dict(item.split("=") for item in params.split(","))
        n, r, p = int(settings["n"]), int(settings["r"]), int(settings["p"])
    except (ValueError, KeyError):
        return False
    if scheme != "scrypt":
        return False
    expected = _unb64(digest)
    actual = hashlib.scrypt(
        password.encode("utf-8"), salt=_unb64(salt), n=n, r=r, p=p,
        dklen=len(expected), maxmem=128 * r * n * 2,
    )
    return hmac.compare_digest(actual, expected)


def normalise_local_address(text: str) -> str:
    """An address we keep a mailbox for: lowercase, plain, path-safe."""
    try:
        mailbox = parse_mailbox(text.strip())
    except AddressError as e:
        raise AccountsError(f"bad address {text!r}: {e}") from None
    local = mailbox.local.lower()
    if mailbox.literal or not _mailbox_local(local):
        raise AccountsError(
            f"bad address {text!r}: a mailbox name uses only letters, digits and . _ + -"
        )
    return f"{local}@{mailbox.domain}"


def _read_lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return []
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def read_users(path: Path) -> dict[str, str]:
    users = {}
    for number, line in _read_lines(path):
        address, colon, stored = line.partition(":")
        if not colon or not stored.startswith("$scrypt$"):
            raise AccountsError(f"{path}:{number}: expected 'address:$scrypt$...'")
        try:
            users[normalise_local_address(address)] = stored
        except AccountsError as e:
            raise AccountsError(f"{path}:{number}: {e}") from None
    return users


def _alias_target(text: str) -> str:
    mailbox = parse_mailbox(text)
    if mailbox.literal:
        raise AddressError("address literal")
    if is_dot_atom(mailbox.local):
        return f"{mailbox.local}@{mailbox.domain}"
    return str(mailbox)


def read_aliases(path: Path) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for number, line in _read_lines(path):
        alias, colon, targets = line.partition(":")
        alias = alias.strip().lower()
        try:
            if not colon:
                raise AccountsError("expected 'alias@domain: target, ...'")
            if alias.startswith("@"):
                parse_mailbox("catchall" + alias)
            else:
                alias = normalise_local_address(alias)
            expanded = tuple(_alias_target(t.strip()) for t in targets.split(",") if t.strip())
            if not expanded:
                raise AccountsError("alias has no targets")
        except (AccountsError, AddressError) as e:
            raise AccountsError(f"{path}:{number}: {e}") from None
        aliases[alias] = expanded
    return aliases


@dataclass(frozen=True)
class Accounts:
    """
    The node's users and aliases.  C{domains} are the local domains;
    C{postmaster@} each of them always exists (RFC 5321 4.5.1).
    """

    domains: frozenset[str]
    users: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, domains: Iterable[str], users: Path, aliases: Path) -> "Accounts":
        return cls(frozenset(domains), read_users(users), read_aliases(aliases))

    # Alias chains deeper than this are a loop or a mistake.
    MAX_ALIAS_DEPTH = 10

    def exists(self, address: str) -> bool:
        """Whether a normalised local address accepts mail."""
        return bool(self.expand(address))

    def expand(self, address: str, depth: int = 0) -> tuple[str, ...]:
        """
        The final destinations of C{address}: local mailboxes and remote
        addresses, in order, without duplicates.  Empty: no such user.
        """
        if depth > self.MAX_ALIAS_DEPTH:
            return ()
        local, _, domain = address.rpartition("@")
        if domain not in self.domains:
            return (address,)
        if address in self.aliases:
            targets = self.aliases[address]
        elif address in self.users or local == "postmaster":
            return (address,)
        elif "@" + domain in self.aliases:
            targets = self.aliases["@" + domain]
        else:
            return ()
        result: dict[str, None] = {}
        for target in targets:
            if target == address:
                result[target] = None
                continue
            for final in self.expand(target.lower() if self._is_local(target) else target, depth + 1):
                result[final] = None
        return tuple(result)

    def _is_local(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.domains

    def check_password(self, address: str, password: str) -> bool:
        stored = self.users.get(address)
        if stored is None:
            # Spend the same time on unknown users as on known ones.
            verify_password(password, _dummy_hash())
            return False
        return verify_password(password, stored)

    def owns(self, user: str, sender: str) -> bool:
        """Whether C{user} may use C{sender} as MAIL FROM: own or alias to it."""
        sender = sender.lower()
        if sender == user:
            return True
        return sender in self.aliases and user in self.expand(sender)


@functools.cache
def _dummy_hash() -> str:
    return hash_password("", salt=b"\0" * 16)


def add_user(path: Path, address: str, password: str) -> str:
    """Add or replace C{address} in the users file; returns its normal form."""
    address = normalise_local_address(address)
    users = read_users(path)
    users[address] = hash_password(password)
    text = "".join(f"{a}:{h}\n" for a, h in sorted(users.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text.encode("utf-8"), mode=0o600)
    return address
