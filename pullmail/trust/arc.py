# -*- test-case-name: tests.test_arc -*-
"""
ARC (RFC 8617).  L{ARCVerifier} validates the chain of arriving mail
through dkimpy's ``arc_verify``: the result goes into our
Authentication-Results as ``arc=pass|fail|none`` (RFC 8617 7.1).
L{arc_set} is the set an alias forward adds, that result as its ``cv=``.

As for DKIM, dkimpy never touches the network: the key records that the
ARC-Seal and ARC-Message-Signature fields name are fetched first through
the node's resolver, then dkimpy's check (pure-Python RSA) runs with those
answers in a thread, away from the reactor.  Sealing hashes with dkimpy's
canonicalization and signs in OpenSSL, as DKIM signing does: dkimpy's own
``arc_sign`` spent 10 ms of pure-Python RSA per forward.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Callable

import dkim
from dkim.canonicalization import Relaxed
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pullmail import maillog
from pullmail.net.dns import DNSPermanentError
from pullmail.trust.dkim_keys import SigningKey
from pullmail.trust.message import (ParsedMessage, hash_fields, header_end, header_fields,
                                    loose_tags, squeezed)
from pullmail.trust.signing import sign_field, signed_fields

__all__ = ["ARCResult", "ARCVerifier", "MAX_ARC_KEYS", "arc_set"]

log = Logger(namespace="pullmail.trust.arc")

# The distinct key records one chain may make us look up.  RFC 8617 allows
# 50 sets; a chain of five forwarders, each with its own keys for seal and
# message signature, needs ten.  More is treated as a broken chain.
MAX_ARC_KEYS = 10
# RFC 8617 4.2.1: i= runs from 1 to 50.
MAX_INSTANCE = 50
_ARC_SIGNATURES = (b"arc-seal", b"arc-message-signature")
# RFC 8617 5.1.1: the order a seal hashes each set's fields in.
_ARC_FIELDS = (b"arc-authentication-results", b"arc-message-signature", b"arc-seal")


@dataclass(frozen=True)
class ARCResult:
    """The chain's validation status (RFC 8617 4.4) and what it rests on."""

    result: str              # none | pass | fail
    instance: int = 0        # the highest i= seen
    domain: str = ""         # d= of that instance's ARC-Seal
    reason: str = ""


def _instance(value: bytes) -> int:
    """The i= of an ARC field; 0 when it has none."""
    number = squeezed(loose_tags(value).get(b"i", b""))
    return int(number) if number.isdigit() else 0


def _key_names(message: bytes) -> tuple[list[str], int, str] | None:
    """
    The key names (selector._domainkey.domain) the ARC signatures name, the
    highest i= and the d= of its seal; None without ARC fields.  Pure; a
    field dkimpy would refuse still names its key (the check then fails it).
    """
    names, instance, domain, present = [], 0, "", False
    for name, value, _, _ in header_fields(message[:header_end(message)]):
        present = present or name in _ARC_FIELDS
        if name not in _ARC_SIGNATURES:
            continue
        tags = loose_tags(value)
        selector = squeezed(tags.get(b"s", b"")).decode("ascii", "replace")
        signer = squeezed(tags.get(b"d", b"")).decode("ascii", "replace").lower()
        if selector and signer:
            names.append(f"{selector}._domainkey.{signer}".lower())
        if name == b"arc-seal" and _instance(value) >= instance:
            instance, domain = _instance(value), signer
    return (sorted(set(names)), instance, domain) if present else None


class ARCVerifier:
    """
    Validates a message's ARC chain.  C{txt} looks a name's TXT records up
    (the node's resolver); C{run_blocking} runs dkimpy's check off the
    reactor thread.
    """

    def __init__(self, txt: Callable[[str], defer.Deferred], run_blocking: Callable) -> None:
        self.txt = txt
        self.run_blocking = run_blocking

    def verify(self, message: bytes) -> defer.Deferred:
        """Fire with the message's L{ARCResult}; never fails."""
        if b"arc-" not in message[:header_end(message)].lower():
            return defer.succeed(ARCResult("none"))     # nearly every message: at once
        return defer.Deferred.fromCoroutine(self._verify(message))

    async def _verify(self, message: bytes) -> ARCResult:
        found = _key_names(message)
        if found is None:
            return ARCResult("none")
        names, instance, domain = found
        if instance > MAX_INSTANCE:
            return ARCResult("fail", instance, domain, f"more than {MAX_INSTANCE} ARC sets")
        if len(names) > MAX_ARC_KEYS:
            return ARCResult("fail", instance, domain, f"more than {MAX_ARC_KEYS} ARC keys")
        answers = await defer.DeferredList(
            [defer.maybeDeferred(self.txt, name) for name in names], consumeErrors=True)
        records, failed = {}, set()
        for name, (_, answer) in zip(names, answers):
            if not isinstance(answer, Failure):
                records[name] = answer[0].encode("utf-8") if answer else None
            elif not answer.check(DNSPermanentError):
                # A failed lookup fails the seal as a missing key does (RFC
                # 8617 has no temperror); the reason says which it was.
                failed.add(name)
        status, reason = await self.run_blocking(_check, message, records, failed)
        return ARCResult(status, instance, domain, reason)


def _check(message: bytes, records: dict, failed: set) -> tuple[str, str]:
    """dkimpy's RFC 8617 5.2 validation with the fetched records (pure CPU)."""
    failed_lookups = []

    def dnsfunc(name: bytes, timeout: float = 5):
        key = name.decode("ascii", "replace").rstrip(".").lower()
        if key in failed:
            failed_lookups.append(key)
        return records.get(key)

    try:
        cv, _, reason = dkim.arc_verify(message, dnsfunc=dnsfunc)
    except Exception as e:      # no input may end the check with a traceback
        maillog.DKIM_ERROR(log, domain="(ARC chain)", error=repr(e))
        return "fail", "malformed ARC set"
    if failed_lookups:
        reason = f"key lookup failed: {failed_lookups[0]}"
    if cv == dkim.CV_Pass:
        return "pass", ""
    if cv == dkim.CV_None:
        # ARC fields, but none with an instance dkimpy could read.
        return "fail", "no valid ARC set"
    # None: an earlier sealer already reported cv=fail; the chain is over.
    return "fail", str(reason)


def arc_set(key: SigningKey, message: bytes, results: bytes, chain: str, now: int) -> list[bytes]:
    """
    RFC 8617 5.1: the ARC set C{key}'s domain adds to C{message}, whose
    chain validated as C{chain} (our C{results} field says so too): its
    ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results, in the
    order to prepend them.  [] when the chain has its 50 sets already.
    """
    parsed = ParsedMessage(message)
    sets: dict[int, dict[bytes, tuple[bytes, bytes]]] = {}
    for name, field in zip(parsed.names, parsed.headers):
        if name in _ARC_FIELDS:
            sets.setdefault(_instance(field[1]), {})[name] = field
    instance = max(sets, default=0) + 1
    if instance > MAX_INSTANCE:
        return []
    earlier = [sets.get(i, {}).get(name) for i in range(1, instance) for name in _ARC_FIELDS]
    cv = "none" if instance == 1 else chain
    if cv != "pass" or None in earlier:
        # RFC 8617 5.1.2: a failed chain's seal covers its own set only.
        earlier = []
        cv = "none" if instance == 1 else "fail"
    stamp = str(now).encode("ascii")
    number = str(instance).encode("ascii")
    verdicts = results.split(b":", 1)[1].strip()
    aar = (b"ARC-Authentication-Results", b" i=" + number + b"; " + verdicts + b"\r\n")
    include = signed_fields(parsed.headers)
    body_hash = base64.b64encode(hashlib.sha256(parsed.canonical_body(Relaxed)).digest())
    ams = sign_field(key, b"ARC-Message-Signature", [
        (b"i", number), (b"a", b"rsa-sha256"), (b"c", b"relaxed/relaxed"),
        (b"d", key.domain.encode()), (b"s", key.selector.encode()), (b"t", stamp),
        (b"h", b":".join(include)), (b"bh", body_hash),
    ], lambda digest, field: parsed.hash_signed(digest, Relaxed, include, field))
    sealed = Relaxed.canonicalize_headers(earlier + [aar, tuple(ams.split(b":", 1))])
    seal = sign_field(key, b"ARC-Seal", [
        (b"i", number), (b"cv", cv.encode("ascii")), (b"a", b"rsa-sha256"),
        (b"d", key.domain.encode()), (b"s", key.selector.encode()), (b"t", stamp),
    ], lambda digest, field: hash_fields(digest, Relaxed, sealed, field))
    return [seal, ams, aar[0] + b":" + aar[1]]
