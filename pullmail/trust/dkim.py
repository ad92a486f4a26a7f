"""
DKIM through dkimpy: L{Signer} signs mail whose From domain is ours (RFC
6376 with RSA, RFC 8463 with Ed25519) and seals alias forwards (ARC, RFC
8617); L{Verifier} checks up to L{MAX_SIGNATURES} signatures of arriving
mail.

dkimpy canonicalizes and hashes; the private-key operation runs in OpenSSL
(cryptography), 25 times faster than dkimpy's own RSA.  Verification never
lets dkimpy touch the network: the key records are fetched first through
the node's resolver (``[dns] nameservers``, its cache, its thread pool),
then the CPU part runs with those answers.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import dkim
import dkim.util
import nacl.exceptions
from dkim.canonicalization import Relaxed
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pullmail import maillog
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError
from pullmail.trust.arc import arc_set
from pullmail.trust.dkim_keys import SigningKey
from pullmail.trust.message import ParsedMessage, authors, header_end, loose_tags, squeezed
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
KEY_CACHE_ENTRIES = 1024


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


_H_SEPARATOR = re.compile(rb"\s*:\s*")


class _Pending:
    """One signature between parsing and checking."""

    def __init__(self, index: int, value: bytes) -> None:
        self.index = index
        self.sig: dict[bytes, bytes] | None = None
        self.include: list[bytes] = []
        try:
            # RFC 6376 3.5 by dkimpy: the tag list, the required tags.
            tags = dkim.util.parse_tag_value(value)
            dkim.validate_signature_fields(tags)
            self.sig = tags
        except Exception as e:      # dkimpy raises more than DKIMException on junk
            tags = loose_tags(value)
            problem = f"bad signature: {e}"
        self.domain = squeezed(tags.get(b"d", b"")).decode("ascii", "replace").lower()
        self.selector = squeezed(tags.get(b"s", b"")).decode("ascii", "replace")
        self.b = squeezed(tags.get(b"b", b""))[:12].decode("ascii", "replace")
        self.result: DKIMResult | None = None
        self.record: str | None = None
        if self.sig is None:
            self.done("permerror", problem)
            return
        self.include = [name.lower() for name in _H_SEPARATOR.split(self.sig[b"h"])]
        if self.sig[b"a"] == b"rsa-sha1":
            self.done("permerror", "rsa-sha1 is not accepted (RFC 8301 3.1)")
        elif b"from" not in self.include:
            self.done("permerror", "From field not signed (RFC 6376 6.1.1)")
        else:
            # As dkimpy: every From field counts, however many h= names.
            self.include.append(b"from")

    def done(self, result: str, reason: str = "") -> None:
        self.result = DKIMResult(result, self.domain, self.selector, self.b, reason)

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


class Verifier:
    """
    RFC 6376 6 over dkimpy.  C{txt} looks a name's TXT records up (the
    node's L{pullmail.net.dns.Resolver}); C{run_blocking} takes the CPU
    part of a large message off the reactor thread.
    """

    def __init__(self, txt: Callable[[str], defer.Deferred], run_blocking: Callable) -> None:
        self.txt = txt
        self.run_blocking = run_blocking
        self._keys: OrderedDict[str, tuple] = OrderedDict()

    def verify(self, message: bytes) -> defer.Deferred:
        """Fire with a L{DKIMResult} per checked signature ([]: unsigned)."""
        if b"dkim-signature" not in message[:header_end(message)].lower():
            return defer.succeed([])            # unsigned: at once
        return defer.Deferred.fromCoroutine(self._verify(message))

    async def _verify(self, message: bytes) -> list[DKIMResult]:
        inline = len(message) <= INLINE_LIMIT
        parsed, pending = (self._prepare(message) if inline
                           else await self.run_blocking(self._prepare, message))
        # Every lookup is asked at once, then each answer taken in turn
        # (cached keys have answered already: no DeferredList to build).
        lookups = {name: defer.maybeDeferred(self.txt, name)
                   for name in sorted({p.key_name for p in pending if p.result is None})}
        records = {}
        for name, lookup in lookups.items():
            try:
                records[name] = await lookup
            except Exception:
                records[name] = Failure()
        for item in pending:
            if item.result is None:
                self._take_record(item, records[item.key_name])
        if parsed is not None and any(p.result is None for p in pending):
            if inline:
                self._check_all(parsed, pending)
            else:
                await self.run_blocking(self._check_all, parsed, pending)
        return [item.result for item in pending]

    @staticmethod
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

    def _take_record(self, item: _Pending, answer) -> None:
        if isinstance(answer, Failure):
            if answer.check(DNSPermanentError):
                item.done("permerror", "no key record")
            elif answer.check(DNSTemporaryError):
                item.done("temperror", "key lookup failed")
            else:
                item.done("temperror", f"key lookup failed: {answer.getErrorMessage()}")
        elif not answer:
            item.done("permerror", "no key record")
        else:
            # RFC 6376 3.6.2.2: several records at the name are ambiguous.
            item.record = answer[0]

    def _key(self, name: str, record: str) -> tuple:
        """
        (kind, public key, bits) of a key record: dkimpy checks the record
        and holds an Ed25519 key (libsodium's verify is the faster), an
        RSA key is held by cryptography (OpenSSL); parsed once per record
        text.
        """
        found = self._keys.get(record)
        if found is None:
            pk, bits, kind, _ = dkim.evaluate_pk(name.encode(), record.encode("utf-8"))
            if kind == b"rsa":
                pk = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
            found = self._keys[record] = (kind, pk, bits)
            if len(self._keys) > KEY_CACHE_ENTRIES:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(record)
        return found

    def _check_all(self, parsed: ParsedMessage, pending: list[_Pending]) -> None:
        for item in pending:
            if item.result is None:
                try:
                    self._check(parsed, item)
                except Exception as e:   # no input may end the check with a traceback
                    maillog.DKIM_ERROR(log, domain=item.domain, error=repr(e))
                    item.done("permerror", "unverifiable signature")

    def _check(self, parsed: ParsedMessage, item: _Pending) -> None:
        """RFC 6376 6.1.3, hashing with dkimpy's canonicalization, verifying in C."""
        sig = item.sig
        try:
            kind, key, bits = self._key(item.key_name, item.record)
        except Exception as e:
            item.done("permerror", f"bad key record: {e}")
            return
        if kind.decode() != sig[b"a"].decode().partition("-")[0]:
            item.done("permerror", "key type does not match a=")
            return
        try:
            policy = dkim.CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except dkim.InvalidCanonicalizationPolicyError:
            item.done("permerror", "bad c= value")
            return
        body = parsed.canonical_body(policy.body_algorithm)
        if b"l" in sig:
            if int(sig[b"l"]) > len(body):
                # RFC 6376 3.5 (l=): longer than the body makes it invalid.
                item.done("permerror", "l= is larger than the body")
                return
            body = body[:int(sig[b"l"])]
        if hashlib.sha256(body).digest() != base64.b64decode(squeezed(sig[b"bh"])):
            item.done("fail", "body hash mismatch")
            return
        digest = hashlib.sha256()
        parsed.hash_signed(digest, policy.header_algorithm, item.include,
                           parsed.headers[item.index])
        if not _verified(kind, key, base64.b64decode(squeezed(sig[b"b"])), digest.digest()):
            item.done("fail", "signature did not verify")
            return
        if kind == b"rsa" and bits < 1024:
            # RFC 8301 3.2: RSA keys under 1024 bits never verify.
            item.done("fail", f"public key too small: {bits}")
            return
        item.done("pass")


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
