"""
DKIM through dkimpy: L{Signer} signs mail whose From domain is ours (RFC
6376 with RSA, RFC 8463 with Ed25519) and seals alias forwards (ARC, RFC
8617); L{Verifier} checks up to L{MAX_SIGNATURES} signatures of arriving
mail.

dkimpy canonicalizes and hashes; the private-key operation runs in OpenSSL
(cryptography), 25 times faster than dkimpy's own RSA.  Verification never
lets dkimpy touch the network: the key records are fetched first through
the node's resolver (``[dns] nameservers``, its cache) and kept parsed for
their TTL (L{pullmail.trust.dkim_records}), then the CPU part runs with
those keys; when all are known, at once.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from binascii import a2b_base64
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import dkim
import nacl.exceptions
from dkim.canonicalization import Relaxed
from cryptography.exceptions import InvalidSignature
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pullmail import maillog
from pullmail.trust.arc import arc_set
from pullmail.trust.dkim_keys import SigningKey
from pullmail.trust.dkim_records import KeyProblem, KeyRecords, PublicKey
from pullmail.trust.message import (ParsedMessage, authors, header_end, loose_tags, squeezed,
                                    tag_list)
from pullmail.trust.signing import PKCS1, PREHASHED, sign_field, signed_fields

__all__ = ["Signer", "Verifier", "DKIMResult", "MAX_SIGNATURES", "signed_fields"]

log = Logger(namespace="pullmail.trust.dkim")

# Issue 13: at most five signatures of one message are checked, so fifty
# cost what five do.
MAX_SIGNATURES = 5
# Messages up to this size are signed, sealed and verified in the reactor
# thread (a 64 KB body is 1 ms of canonicalization and hashing); larger ones
# in a thread, not to stall other sessions.
INLINE_LIMIT = 64 * 1024


class Signer:
    """
    Signs with each key of the From domain (SPEC 11.1: one RSA, one
    Ed25519 signature), relaxed/relaxed, and seals alias forwards (ARC).
    Keys are loaded once, at start.  C{run_blocking} takes the work on a
    large message off the reactor thread (L{signing}, L{sealing}).
    """

    def __init__(self, keys: Mapping[str, Sequence[SigningKey]], clock: IReactorTime,
                 run_blocking: Callable | None = None) -> None:
        self.keys = {domain.lower(): tuple(found) for domain, found in keys.items()}
        self.clock = clock
        self.run_blocking = run_blocking

    def sign(self, chunks: Sequence[bytes]) -> list[bytes]:
        """
        C{chunks} with a DKIM-Signature per key prepended, or unchanged
        when the From domain has no key (not ours, or several From).
        Call it once per message, when it enters the outbox.
        """
        message = b"".join(chunks)
        author = authors(message[:header_end(message)]).single
        keys = self._keys_for(author) if author else None
        if not keys:
            return list(chunks)
        try:
            parsed = ParsedMessage(message)
        except Exception as e:      # a header dkimpy cannot parse: sent unsigned
            maillog.DKIM_SIGN_FAILED(log, domain=author, error=repr(e))
            return list(chunks)
        include = signed_fields(parsed.headers)
        body_hash = base64.b64encode(hashlib.sha256(parsed.canonical_body(Relaxed)).digest())
        now = str(int(self.clock.seconds())).encode("ascii")

        def feed(digest, field) -> None:
            parsed.hash_signed(digest, Relaxed, include, field)

        return [sign_field(key, b"DKIM-Signature", [
            (b"v", b"1"), (b"a", key.algorithm.encode()), (b"c", b"relaxed/relaxed"),
            (b"d", key.domain.encode()), (b"s", key.selector.encode()), (b"t", now),
            (b"h", b":".join(include)), (b"bh", body_hash),
        ], feed) for key in keys] + [message]

    def _keys_for(self, domain: str):
        """
        The keys of a local From domain, or of the local domain it is a
        subdomain of (bounces come from ``MAILER-DAEMON@<hostname>``): a
        signature RFC 7489 3.1.1 relaxed alignment accepts.
        """
        while domain:
            if domain in self.keys:
                return self.keys[domain]
            domain = domain.partition(".")[2]
        return None

    def seal(self, message: bytes, domain: str, results: bytes, chain: str) -> list[bytes]:
        """
        The RFC 8617 ARC set that C{domain} adds to C{message}, carrying
        our C{results} field and the chain's status C{chain} (our arc=
        verdict): the three fields to prepend; [] without an RSA key for
        C{domain} (ARC is RSA only, RFC 8617 5.1.1.1).
        """
        for key in self.keys.get(domain.lower(), ()):
            if key.algorithm.startswith("rsa"):
                try:
                    return arc_set(key, message, results, chain, int(self.clock.seconds()))
                except Exception as e:      # a header dkimpy cannot parse: not sealed
                    maillog.ARC_FAILED(log, domain=domain, error=repr(e))
        return []

    def signing(self, chunks: Sequence[bytes]) -> defer.Deferred:
        """L{sign}, in a thread for a message whose hashing would stall the reactor."""
        return self._off_reactor(sum(map(len, chunks)), self.sign, chunks)

    def sealing(self, message: bytes, domain: str, results: bytes,
                chain: str) -> defer.Deferred:
        """L{seal}, in a thread for a large message."""
        return self._off_reactor(len(message), self.seal, message, domain, results, chain)

    def _off_reactor(self, size: int, function: Callable, *args) -> defer.Deferred:
        if size <= INLINE_LIMIT or self.run_blocking is None:
            return defer.maybeDeferred(function, *args)
        return self.run_blocking(function, *args)


@dataclass(frozen=True)
class DKIMResult:
    """One signature's verdict (RFC 8601 2.7.1) and what identifies it."""

    result: str              # pass | fail | neutral | temperror | permerror
    domain: str = ""         # d=
    selector: str = ""       # s=
    signature: str = ""      # the start of b=, RFC 6008's header.b
    reason: str = ""


_BASE64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")
_DIGITS = re.compile(rb"\d+$")
_LENGTH = re.compile(rb"\d{,76}$")
_DOMAIN_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_REQUIRED = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
_ALGORITHMS = (b"rsa-sha1", b"rsa-sha256", b"ed25519-sha256")
# dkimpy's leeway for signers' clocks, either side of t= and x=.
_CLOCK_SLOP = 36000
# RFC 6376 3.5 c=: the usual values' dkimpy policies, made once.
_POLICIES = MappingProxyType({c: dkim.CanonicalizationPolicy.from_c_value(c) for c in (
    b"relaxed/relaxed", b"relaxed/simple", b"simple/relaxed", b"simple/simple",
    b"relaxed", b"simple")})


def check_tags(sig: dict[bytes, bytes]) -> None:
    """
    RFC 6376 3.5: the checks dkimpy's validate_signature_fields makes of
    a DKIM-Signature's tags (dkimpy 1.1, its quirks included: bh= passes
    its character check when b= does), with the same exceptions, at a
    third of its cost; t= and x= against the wall clock, as dkimpy.
    """
    for name in _REQUIRED:
        if name not in sig:
            raise dkim.ValidationError(f"missing {name.decode()}=")
    if sig[b"a"] not in _ALGORITHMS:
        raise dkim.ValidationError(f"unknown signature algorithm: {sig[b'a']!r}")
    if _BASE64.match(sig[b"b"]) is None:
        raise dkim.ValidationError("b= value is not valid base64")
    for name in (b"b", b"bh"):
        if len(squeezed(sig[name])) % 4:
            raise dkim.ValidationError(f"{name.decode()}= value is not valid base64")
    if b"cv" in sig and sig[b"cv"] not in (dkim.CV_Pass, dkim.CV_Fail, dkim.CV_None):
        raise dkim.ValidationError("cv= value is not valid")
    domain = sig[b"d"]
    if domain.isascii() and _DOMAIN_SPECIALS.search(domain):
        raise dkim.ValidationError(f"d= value is not valid ({domain!r})")
    if b"i" in sig and (not sig[b"i"].lower().endswith(domain.lower())
                        or sig[b"i"][-len(domain) - 1] not in (64, 46)):     # @ .
        raise dkim.ValidationError("i= domain is not a subdomain of d=")
    if b"l" in sig and _LENGTH.match(sig[b"l"]) is None:
        raise dkim.ValidationError("l= value is not a decimal integer")
    if b"q" in sig and sig[b"q"] != b"dns/txt":
        raise dkim.ValidationError("q= value is not dns/txt")
    signed_at = None
    if b"t" in sig:
        if _DIGITS.match(sig[b"t"]) is None:
            raise dkim.ValidationError("t= value is not a decimal integer")
        signed_at = int(sig[b"t"])
        if signed_at > int(time.time()) + _CLOCK_SLOP:
            raise dkim.ValidationError("t= value is in the future")
    if sig[b"v"] != b"1":
        raise dkim.ValidationError("v= value is not 1")
    if b"x" in sig:
        if _DIGITS.match(sig[b"x"]) is None:
            raise dkim.ValidationError("x= value is not a decimal integer")
        expires = int(sig[b"x"])
        if expires < int(time.time()) - _CLOCK_SLOP:
            raise dkim.ValidationError("x= value is past")
        if signed_at and expires < signed_at:
            raise dkim.ValidationError("x= value is less than t= value")


class _Pending:
    """One signature between parsing and checking."""

    def __init__(self, index: int, value: bytes) -> None:
        self.index = index
        self.sig: dict[bytes, bytes] | None = None
        self.include: list[bytes] = []
        self.key: PublicKey | None = None
        try:
            # RFC 6376 3.5 as dkimpy checks it: the tag list, the required tags.
            tags = tag_list(value)
            check_tags(tags)
            self.sig = tags
        except Exception as e:      # dkimpy raises more than DKIMException on junk
            tags = loose_tags(value)
            problem = f"bad signature: {e}"
        self.domain = squeezed(tags.get(b"d", b"")).decode("ascii", "replace").lower()
        self.selector = squeezed(tags.get(b"s", b"")).decode("ascii", "replace")
        self.b = squeezed(tags.get(b"b", b""))[:12].decode("ascii", "replace")
        self.result: DKIMResult | None = None
        if self.sig is None:
            self.done("permerror", problem)
            return
        # RFC 6376 3.5 h=: names apart by ":" and FWS, compared without case.
        h = self.sig[b"h"].lower()
        self.include = h.split(b":")
        if len(h.split()) != 1:         # white space in it
            self.include = [name.strip() for name in self.include]
        if self.sig[b"a"] == b"rsa-sha1":
            self.done("permerror", "rsa-sha1 is not accepted (RFC 8301 3.1)")
        elif b"from" not in self.include:
            self.done("permerror", "From field not signed (RFC 6376 6.1.1)")
        else:
            # As dkimpy: every From field counts, however many h= names.
            self.include.append(b"from")

    def done(self, result: str, reason: str = "") -> None:
        self.result = DKIMResult(result, self.domain, self.selector, self.b, reason)

    def take(self, outcome: PublicKey | KeyProblem) -> None:
        """The key record's outcome: the key to check with, or the result."""
        if isinstance(outcome, KeyProblem):
            self.done(outcome.result, outcome.reason)
        else:
            self.key = outcome

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}".lower()


class Verifier:
    """
    RFC 6376 6 over dkimpy's parsing and canonicalization.  C{keys} holds
    the key records (L{KeyRecords}: looked up through the node's resolver,
    kept parsed for their TTL); C{run_blocking} takes the CPU part of a
    large message off the reactor thread.
    """

    def __init__(self, keys: KeyRecords, run_blocking: Callable) -> None:
        self.keys = keys
        self.run_blocking = run_blocking

    def verify(self, message: bytes) -> defer.Deferred:
        """
        Fire with a L{DKIMResult} per checked signature ([]: unsigned):
        at once when every key is known (no lookup, no coroutine).
        """
        if b"dkim-signature" not in message[:header_end(message)].lower():
            return defer.succeed([])            # unsigned: at once
        if len(message) > INLINE_LIMIT:
            return defer.Deferred.fromCoroutine(self._verify_large(message))
        parsed, pending = _prepare(message)
        missing = self._take_known(pending)
        if missing:
            return defer.Deferred.fromCoroutine(self._fetch_and_check(parsed, pending, missing))
        _check_all(parsed, pending)
        return defer.succeed([item.result for item in pending])

    async def _fetch_and_check(self, parsed, pending: list[_Pending],
                               missing: list[str]) -> list[DKIMResult]:
        await self._fetch(pending, missing)
        _check_all(parsed, pending)
        return [item.result for item in pending]

    async def _verify_large(self, message: bytes) -> list[DKIMResult]:
        parsed, pending = await self.run_blocking(_prepare, message)
        missing = self._take_known(pending)
        if missing:
            await self._fetch(pending, missing)
        if any(item.result is None for item in pending):
            await self.run_blocking(_check_all, parsed, pending)
        return [item.result for item in pending]

    def _take_known(self, pending: list[_Pending]) -> list[str]:
        """Give each signature its key where known; the names left to look up."""
        missing: list[str] = []
        for item in pending:
            if item.result is None:
                outcome = self.keys.known(item.key_name)
                if outcome is not None:
                    item.take(outcome)
                elif item.key_name not in missing:
                    missing.append(item.key_name)
        return missing

    async def _fetch(self, pending: list[_Pending], missing: list[str]) -> None:
        """Look every missing key up at once, then give each signature its outcome."""
        lookups = {name: self.keys.fetch(name) for name in missing}
        found = {name: await lookup for name, lookup in lookups.items()}
        for item in pending:
            if item.result is None and item.key is None:
                item.take(found[item.key_name])


def _prepare(message: bytes):
    """Parse the message and its first signatures (pure CPU)."""
    try:
        parsed = ParsedMessage(message)
    except Exception as e:      # dkimpy raises more than DKIMException on junk
        first = _Pending(0, b"")
        first.done("permerror", f"message not parsable: {e}")
        return None, [first]
    indices = [i for i, name in enumerate(parsed.names) if name == b"dkim-signature"]
    return parsed, [_Pending(i, parsed.headers[i][1]) for i in indices[:MAX_SIGNATURES]]


def _check_all(parsed: ParsedMessage, pending: list[_Pending]) -> None:
    for item in pending:
        if item.result is None:
            try:
                _check(parsed, item)
            except Exception as e:   # no input may end the check with a traceback
                maillog.DKIM_ERROR(log, domain=item.domain, error=repr(e))
                item.done("permerror", "unverifiable signature")


def _check(parsed: ParsedMessage, item: _Pending) -> None:
    """RFC 6376 6.1.3, hashing with dkimpy's canonicalization, verifying in C."""
    sig, key = item.sig, item.key
    if key.kind != sig[b"a"].partition(b"-")[0]:
        item.done("permerror", "key type does not match a=")
        return
    policy = _policy(sig.get(b"c", b"simple/simple"))
    if policy is None:
        item.done("permerror", "bad c= value")
        return
    length = None
    if b"l" in sig:
        length = int(sig[b"l"])
        if length > len(parsed.canonical_body(policy.body_algorithm)):
            # RFC 6376 3.5 (l=): longer than the body makes it invalid.
            item.done("permerror", "l= is larger than the body")
            return
    # a2b_base64 passes over folding white space, as base64 of a tag may hold.
    if parsed.body_hash(policy.body_algorithm, length) != a2b_base64(sig[b"bh"]):
        item.done("fail", "body hash mismatch")
        return
    digest = hashlib.sha256()
    parsed.hash_signed(digest, policy.header_algorithm, item.include,
                       parsed.headers[item.index])
    if not _verified(key.kind, key.key, a2b_base64(sig[b"b"]), digest.digest()):
        item.done("fail", "signature did not verify")
        return
    if key.kind == b"rsa" and key.bits < 1024:
        # RFC 8301 3.2: RSA keys under 1024 bits never verify.
        item.done("fail", f"public key too small: {key.bits}")
        return
    item.done("pass")


def _policy(c: bytes):
    """dkimpy's CanonicalizationPolicy of a c= value; None when it names no algorithm."""
    policy = _POLICIES.get(c)
    if policy is None:
        try:
            policy = dkim.CanonicalizationPolicy.from_c_value(c)
        except dkim.InvalidCanonicalizationPolicyError:
            return None
    return policy


def _verified(kind: bytes, key, signature: bytes, digest: bytes) -> bool:
    """RSA in OpenSSL; Ed25519 (RFC 8463 3: over the SHA-256 hash) in libsodium."""
    try:
        if kind == b"rsa":
            key.verify(signature, digest, PKCS1, PREHASHED)
        else:
            key.verify(digest, signature)
    except (InvalidSignature, nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True
