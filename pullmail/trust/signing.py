# -*- test-case-name: tests.test_dkim -*-
"""
What DKIM signing (RFC 6376, RFC 8463) and ARC sealing (RFC 8617) share:
the header fields a signature covers, and making one signature field, its
hash fed with dkimpy's canonical forms, the key operation in OpenSSL
(cryptography) -- 25 times faster than dkimpy's own RSA.  Pure.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Callable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, utils

from pullmail.trust.dkim_keys import SigningKey

__all__ = ["signed_fields", "sign_field", "PKCS1", "PREHASHED"]

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

PKCS1 = padding.PKCS1v15()
PREHASHED = utils.Prehashed(hashes.SHA256())


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


def sign_field(key: SigningKey, name: bytes, tags: Sequence[tuple[bytes, bytes]],
               feed: Callable) -> bytes:
    """
    The whole field C{name}: C{tags}, then b= signed by C{key} over what
    C{feed}(digest, (name, value with an empty b=)) hashes (RFC 6376 3.7).
    """
    value = b" " + _fold(tags) + b"\r\n\tb="
    digest = hashlib.sha256()
    feed(digest, (name, value))
    if key.algorithm.startswith("rsa"):
        raw = key.private.sign(digest.digest(), PKCS1, PREHASHED)
    else:
        # RFC 8463 3: Ed25519 signs the SHA-256 hash, not the data.
        raw = key.private.sign(digest.digest())
    b = base64.b64encode(raw)
    folded = b"\r\n\t ".join(b[i:i + 70] for i in range(0, len(b), 70))
    return name + b":" + value + folded + b"\r\n"
