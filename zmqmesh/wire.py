"""Frame layouts of the pattern sockets (see docs/protocol.md, which is normative).

pub/sub (PUB or XPUB -> the node's SUB):   [topic, sender, body]
pipeline (PUSH -> the node's PULL):         [queue, sender, body]
request (DEALER -> the node's ROUTER):      [service, request_id, body]
reply (ROUTER -> the requesting DEALER):    [request_id, status, body]

``sender`` is empty or 16 bytes of the sender's UUID followed, on pub/sub, by an 8-byte
big-endian sequence number of the first message in ``body``. ``body`` is one or more
concatenated msgpack objects (a batch of at most `MAX_BATCH_ITEMS`), except in requests
and replies (exactly one).
"""

from __future__ import annotations

__all__ = [
    "UUID_SIZE",
    "STATUS_OK",
    "STATUS_ERROR",
    "STATUS_NO_SERVICE",
    "STATUS_BAD_REQUEST",
    "MAX_NAME_BYTES",
    "MAX_REQUEST_ID_BYTES",
    "MAX_BATCH_ITEMS",
    "pub_sender",
    "parse_sender",
]

UUID_SIZE = 16
MAX_NAME_BYTES = 200
MAX_REQUEST_ID_BYTES = 64
MAX_BATCH_ITEMS = 256
"""Most messages one frame may carry. A receiver rejects a frame holding more: without the
bound, one 64 KiB frame of one-byte objects would make 65,536 handler calls."""

STATUS_OK = b"\x00"
STATUS_ERROR = b"\x01"
STATUS_NO_SERVICE = b"\x02"
STATUS_BAD_REQUEST = b"\x03"


def pub_sender(uuid: bytes, sequence: int) -> bytes:
    """The sender frame of a pub/sub message: UUID plus the sequence of its first message."""
    return uuid + sequence.to_bytes(8, "big")


def parse_sender(frame: bytes) -> tuple[bytes | None, int | None]:
    """``(uuid, sequence)`` from a sender frame; either may be ``None`` when absent."""
    size = len(frame)
    if size == UUID_SIZE:
        return frame, None
    if size == UUID_SIZE + 8:
        return frame[:UUID_SIZE], int.from_bytes(frame[UUID_SIZE:], "big")
    return None, None
