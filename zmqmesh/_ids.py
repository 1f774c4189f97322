"""Random version-4 UUIDs (RFC 4122), as ``uuid.uuid4()`` makes them, without loading the
``uuid`` module (and its C helper) into every node process: a node's ZRE identity and the
ids of messages that carry none."""

from __future__ import annotations

import os

__all__ = ["uuid4_bytes", "uuid4_hex"]


def uuid4_bytes() -> bytes:
    """16 random bytes with a version-4 UUID's version and variant bits: what
    ``uuid.uuid4().bytes`` returns. Raises nothing."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return bytes(raw)


def uuid4_hex() -> str:
    """A version-4 UUID as 32 lowercase hex digits: what ``uuid.uuid4().hex`` returns."""
    return uuid4_bytes().hex()
