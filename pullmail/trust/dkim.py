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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pullmail import maillog
from pullmail.net.dns import DNSPermanentError, DNSTemporaryError
from pullmail.trust.dkim_keys import SigningKey
from pullmail.trust.message import from_domains, header_end

__all__ = ["Signer", "Verifier", "DKIMResult", "MAX_SIGNATURES", "signed_fields"]

log = Logger(namespace="pullmail.trust.dkim")

# Issue 13: at most five signatures of one message are checked, so fifty
# cost what five do.
MAX_SIGNATURES = 5
# Messages up to this size are verified in the reactor thread (well under
# a millisecond); larger ones in a thread, not to stall other sessions.
INLINE_LIMIT = 256 * 1024
KEY_CACHE_ENTRIES = 1024

# RFC 6376 5.4.1's list, with Message-ID, Sender and the RFC 2045 MIME fields.
_SIGNED = (
    b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"resent-date", b"resent-from",
    b"resent-sender", b"resent-to", b"resent-cc", b"in-reply-to", b"references", b"list-id",
    b"list-help", b"list-unsubscribe", b"list-subscribe", b"list-post", b"list-owner",
    b"list-archive", b"message-id", b"sender", b"mime-version", b"content-type",
    b"content-transfer-encoding", b"content-id", b"content-description",
)
# RFC 6376 8.15: naming a field once more than it occurs ("oversigning")
# makes adding one more instance break the signature.
_OVERSIGNED = frozenset((
    b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
    b"content-type", b"content-transfer-encoding", b"content-id", b"content-description",
))
_RELAXED = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


def signed_fields(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """The h= list: each present field of the set, the oversigned once more."""
    counts: dict[bytes, int] = {}
    for name, _ in headers:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    chosen = []
    for name in _SIGNED:
        chosen.extend([name] * (counts.get(name, 0) + (name in _OVERSIGNED)))
    return chosen


def _fold(tags: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Tags joined by "; ", a new line before a tag that would pass column 76."""
    lines, line = [], b""
    for name, value in tags:
        tag = name + b"=" + value + b";"
        if line and len(line) + len(tag) > 60:
            lines.append(line)
            line = b""
        line += (b" " if line else b"") + tag
    lines.append(line)
    return b"\r\n\t".join(lines)


class Signer:
    """
    Signs with each key of the From domain (SPEC 11.1: one RSA, one
    Ed25519 signature), relaxed/relaxed.  Keys are loaded once, at start.
    """

    def __init__(self, keys: Mapping[str, Sequence[SigningKey]], clock: IReactorTime) -> None:
        self.keys = {domain.lower(): tuple(found) for domain, found in keys.items()}
        self.clock = clock

    def sign(self, chunks: Sequence[bytes]) -> list[bytes]:
        """
        C{chunks} with a DKIM-Signature per key prepended, or unchanged
        when the From domain has no key (not ours, or several From).
        Call it once per message, when it enters the outbox.
        """
        message = b"".join(chunks)
        domains = from_domains(message[:header_end(message)])
        keys = self._keys_for(domains[0]) if len(domains) == 1 else None
        if not keys:
            return list(chunks)
        headers, body = dkim.rfc822_parse(message)
        canonical = _RELAXED.canonicalize_headers(headers)
        include = signed_fields(headers)
        body_hash = base64.b64encode(hashlib.sha256(_RELAXED.canonicalize_body(body)).digest())
        now = str(int(self.clock.seconds())).encode("ascii")
        return [self._signature(key, canonical, include, body_hash, now)
                for key in keys] + [message]

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

    def _signature(self, key: SigningKey, canonical, include, body_hash: bytes,
                   now: bytes) -> bytes:
        tags = [(b"v", b"1"), (b"a", key.algorithm.encode()), (b"c", b"relaxed/relaxed"),
                (b"d", key.domain.encode()), (b"s", key.selector.encode()), (b"t", now),
                (b"h", b":".join(include)), (b"bh", body_hash)]
        # RFC 6376 3.7: the hash covers the signature field with an empty b=.
        value = b" " + _fold(tags) + b"\r\n\tb="
        digest = hashlib.sha256()
        dkim.hash_headers(digest, _RELAXED, canonical, list(include),
                          (b"DKIM-Signature", value), dict(tags))
        if key.algorithm.startswith("rsa"):
            raw = key.private.sign(digest.digest(), padding.PKCS1v15(),
                                   utils.Prehashed(hashes.SHA256()))
        else:
            # RFC 8463 3: Ed25519 signs the SHA-256 hash, not the data.
            raw = key.private.sign(digest.digest())
        b = base64.b64encode(raw)
        folded = b"\r\n\t ".join(b[i:i + 70] for i in range(0, len(b), 70))
        return b"DKIM-Signature:" + value + folded + b"\r\n"

    def seal(self, message: bytes, domain: str, authserv_id: str) -> list[bytes]:
        """
        RFC 8617 ARC set over C{message}, whose top Authentication-Results
        carries C{authserv_id}'s verdicts: the three header fields to
        prepend ([] without an RSA key for C{domain}, or when dkimpy ends
        the chain).  ARC is RSA only (RFC 8617 5.1.1.1).
        """
        rsa_keys = [k for k in self.keys.get(domain.lower(), ()) if k.algorithm.startswith("rsa")]
        if not rsa_keys:
            return []
        key = rsa_keys[0]
        try:
            return dkim.arc_sign(message, key.selector.encode(), key.domain.encode(), key.pem,
                                 authserv_id.encode(), timestamp=int(self.clock.seconds()))
        except dkim.DKIMException as e:
            maillog.ARC_FAILED(log, domain=domain, error=str(e))
            return []


@dataclass(frozen=True)
class DKIMResult:
    """One signature's verdict (RFC 8601 2.7.1) and what identifies it."""

    result: str              # pass | fail | neutral | temperror | permerror
    domain: str = ""         # d=
    selector: str = ""       # s=
    signature: str = ""      # the start of b=, RFC 6008's header.b
    reason: str = ""


_TAG = re.compile(rb"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)")


def _loose_tags(value: bytes) -> dict[bytes, bytes]:
    """d=, s=, b= of a signature, even one that dkimpy's parser refuses."""
    return {m.group(1): m.group(2) for m in _TAG.finditer(value)}


def _squeezed(value: bytes) -> bytes:
    """A tag value without its folding white space (RFC 6376 3.2)."""
    return b"".join(value.split())


class _Pending:
    """One signature between parsing and checking."""

    def __init__(self, index: int, value: bytes) -> None:
        self.index = index
        tags = _loose_tags(value)
        self.domain = _squeezed(tags.get(b"d", b"")).decode("ascii", "replace").lower()
        self.selector = _squeezed(tags.get(b"s", b"")).decode("ascii", "replace")
        self.b = _squeezed(tags.get(b"b", b""))[:12].decode("ascii", "replace")
        self.prepared = None
        self.result: DKIMResult | None = None
        self.record: str | None = None

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
        return defer.Deferred.fromCoroutine(self._verify(message))

    async def _verify(self, message: bytes) -> list[DKIMResult]:
        if b"dkim-signature" not in message[:header_end(message)].lower():
            return []
        inline = len(message) <= INLINE_LIMIT
        run = (lambda f, *a: defer.succeed(f(*a))) if inline else self.run_blocking
        parsed, pending = await run(self._prepare, message)
        names = sorted({p.key_name for p in pending if p.result is None})
        answers = await defer.DeferredList(
            [defer.maybeDeferred(self.txt, name) for name in names], consumeErrors=True)
        records = {name: answer for name, (_, answer) in zip(names, answers)}
        for item in pending:
            if item.result is None:
                self._take_record(item, records[item.key_name])
        if parsed is not None and any(p.result is None for p in pending):
            await run(self._check_all, parsed, pending)
        return [item.result for item in pending]

    def _prepare(self, message: bytes):
        """Parse the message and the first signatures (pure CPU)."""
        try:
            parsed = dkim.DKIM(message, minkey=1024)
        except Exception as e:      # dkimpy raises more than DKIMException on junk
            first = _Pending(0, b"")
            first.done("permerror", f"message not parsable: {e}")
            return None, [first]
        values = [v for n, v in parsed.headers if n.lower() == b"dkim-signature"]
        pending = []
        for index, value in enumerate(values[:MAX_SIGNATURES]):
            item = _Pending(index, value)
            try:
                item.prepared = parsed.verify_headerprep(index)
                sig = item.prepared[0]
                if sig[b"a"] == b"rsa-sha1":
                    item.done("permerror", "rsa-sha1 is not accepted (RFC 8301 3.1)")
                elif b"from" not in item.prepared[1]:
                    item.done("permerror", "From field not signed (RFC 6376 6.1.1)")
            except Exception as e:
                item.done("permerror", f"bad signature: {e}")
            pending.append(item)
        return parsed, pending

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
        (kind, public key, bits) of a key record: dkimpy checks the record,
        cryptography holds the key; parsed once per record text.
        """
        found = self._keys.get(record)
        if found is None:
            pk, bits, kind, _ = dkim.evaluate_pk(name.encode(), record.encode("utf-8"))
            if kind == b"rsa":
                key = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
            else:
                key = ed25519.Ed25519PublicKey.from_public_bytes(bytes(pk))
            found = self._keys[record] = (kind, key, bits)
            if len(self._keys) > KEY_CACHE_ENTRIES:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(record)
        return found

    def _check_all(self, parsed, pending: list[_Pending]) -> None:
        canonical: dict = {}      # one canonical form per algorithm, for every signature
        for item in pending:
            if item.result is None:
                try:
                    self._check(parsed, item, canonical)
                except Exception as e:   # no input may end the check with a traceback
                    maillog.DKIM_ERROR(log, domain=item.domain, error=repr(e))
                    item.done("permerror", "unverifiable signature")

    def _check(self, parsed, item: _Pending, canonical: dict) -> None:
        """RFC 6376 6.1.3, hashing with dkimpy's canonicalization, verifying in OpenSSL."""
        sig, include, signatures = item.prepared
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
        body = _canonical(canonical, ("body", policy.body_algorithm),
                          lambda: policy.canonicalize_body(parsed.body))
        if b"l" in sig:
            if int(sig[b"l"]) > len(body):
                # RFC 6376 3.5 (l=): longer than the body makes it invalid.
                item.done("permerror", "l= is larger than the body")
                return
            body = body[:int(sig[b"l"])]
        if hashlib.sha256(body).digest() != base64.b64decode(_squeezed(sig[b"bh"])):
            item.done("fail", "body hash mismatch")
            return
        headers = _canonical(canonical, ("header", policy.header_algorithm),
                             lambda: policy.canonicalize_headers(parsed.headers))
        # As dkimpy: every From field counts, however many h= names.
        include = list(include) + [b"from"] if b"from" in include else list(include)
        digest = hashlib.sha256()
        dkim.hash_headers(digest, policy, headers, include, signatures[item.index], sig)
        signature = base64.b64decode(_squeezed(sig[b"b"]))
        try:
            if kind == b"rsa":
                key.verify(signature, digest.digest(), padding.PKCS1v15(),
                           utils.Prehashed(hashes.SHA256()))
            else:
                key.verify(signature, digest.digest())
        except InvalidSignature:
            item.done("fail", "signature did not verify")
            return
        if kind == b"rsa" and bits < 1024:
            # RFC 8301 3.2: RSA keys under 1024 bits never verify.
            item.done("fail", f"public key too small: {bits}")
            return
        item.done("pass")


def _canonical(cache: dict, algorithm, make):
    if algorithm not in cache:
        cache[algorithm] = make()
    return cache[algorithm]
