"""
The public keys DKIM verification needs (RFC 6376 3.6): each key record
fetched through the node's resolver, parsed once (dkimpy checks the
record; the key goes to OpenSSL or libsodium) and kept, parsed, for its
DNS TTL (L{MAX_KEY_TTL} at most) on the node's clock.  A message whose keys are all known is
verified at once, with no lookup and nothing to wait for.

What a record says against a signature is kept as long as DNS allows too:
no record at the name (NXDOMAIN or no TXT: the negative TTL of RFC 2308
5, not kept without an SOA), a revoked key (empty ``p=``) or one that
does not parse (the record's TTL).  A failed lookup (timeout, SERVFAIL)
is a temperror and is never kept: the next message asks again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import dkim
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from pullmail.net.dns import DNSPermanentError, DNSTemporaryError, TXTAnswer
from pullmail.scheduling.expiring import ExpiringCache

__all__ = ["PublicKey", "KeyProblem", "KeyRecords", "parse_key", "KEY_CACHE_ENTRIES",
           "MAX_KEY_TTL"]

# Key names kept at once (least recently used dropped first).
KEY_CACHE_ENTRIES = 4096
# The longest a record is kept, whatever its TTL says (BIND caps at a week;
# a day lets a revoked key be seen the next day at the latest).
MAX_KEY_TTL = 86400.0


@dataclass(frozen=True)
class PublicKey:
    """A parsed key record: what checking a signature needs of it."""

    kind: bytes         # k=: b"rsa" | b"ed25519"
    key: object         # cryptography's RSA public key | PyNaCl's VerifyKey
    bits: int


@dataclass(frozen=True)
class KeyProblem:
    """Why no key: the signature's result and the reason given with it."""

    result: str         # "permerror" | "temperror"
    reason: str


NO_RECORD = KeyProblem("permerror", "no key record")


def parse_key(name: str, record: str) -> PublicKey | KeyProblem:
    """
    A key record's key: dkimpy's checks (RFC 6376 3.6.1: v=, k=, s=, p=;
    an empty p= is a revoked key), an RSA key held by cryptography
    (OpenSSL), an Ed25519 key by PyNaCl (libsodium's verify is the faster).
    """
    try:
        pk, bits, kind, _ = dkim.evaluate_pk(name.encode(), record.encode("utf-8"))
        if kind == b"rsa":
            pk = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
    except Exception as e:      # dkimpy raises more than KeyFormatError on junk
        return KeyProblem("permerror", f"bad key record: {e}")
    return PublicKey(kind, pk, bits)


class KeyRecords:
    """
    Key name (``<selector>._domainkey.<domain>``, lower case) to its
    L{PublicKey} or L{KeyProblem}.  C{fetch} looks a name's TXT records up
    as a L{TXTAnswer} (the node's L{pullmail.net.dns.Resolver.txt_answer});
    C{clock} times what is kept.
    """

    def __init__(self, fetch: Callable[[str], defer.Deferred], clock: IReactorTime,
                 entries: int = KEY_CACHE_ENTRIES) -> None:
        self._fetch = fetch
        self._known = ExpiringCache(clock, entries)

    def known(self, name: str) -> PublicKey | KeyProblem | None:
        """What is known of C{name} now, or None: only a lookup can tell."""
        return self._known.get(name)

    def forget(self, name: str) -> None:
        self._known.discard(name)

    def fetch(self, name: str) -> defer.Deferred:
        """Look C{name} up: fires with its L{PublicKey} or L{KeyProblem}; never fails."""
        d = defer.maybeDeferred(self._fetch, name)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(name,), errbackArgs=(name,))
        return d

    def _answered(self, answer: TXTAnswer, name: str) -> PublicKey | KeyProblem:
        # RFC 6376 3.6.2.2: several records at the name are ambiguous; the
        # first is taken.
        outcome = parse_key(name, answer.records[0]) if answer.records else NO_RECORD
        self._known.put(name, outcome, min(answer.ttl, MAX_KEY_TTL))
        return outcome

    def _failed(self, failure, name: str) -> KeyProblem:
        if failure.check(DNSPermanentError):
            self._known.put(name, NO_RECORD, min(failure.value.ttl, MAX_KEY_TTL))
            return NO_RECORD
        if failure.check(DNSTemporaryError):
            return KeyProblem("temperror", "key lookup failed")
        return KeyProblem("temperror", f"key lookup failed: {failure.getErrorMessage()}")
