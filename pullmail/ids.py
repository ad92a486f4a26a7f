"""
Identifiers: queue ids for logs and Received headers, and General Delivery
message ids (SPEC section 2), which are capabilities and so come from a
CSPRNG with at least 128 bits.
"""

from __future__ import annotations

import re
import secrets

__all__ = ["new_queue_id", "new_gdel_id", "is_gdel_id"]

# gdel-id = 16*128( ALPHA / DIGIT / "-" / "_" )
_GDEL_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
# 24 random bytes -> 32 url-safe base64 characters, 192 bits.
_GDEL_ID_BYTES = 24


def new_queue_id() -> str:
    """A short id that names one accepted message in logs: 64 random bits."""
    return secrets.token_hex(8).upper()


def new_gdel_id() -> str:
    return secrets.token_urlsafe(_GDEL_ID_BYTES)


def is_gdel_id(text: str) -> bool:
    return _GDEL_ID.fullmatch(text) is not None
