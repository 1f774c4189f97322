"""The frames of the pattern sockets, and every name and id layout they reserve.

docs/protocol.md is normative; this module is its one home in code. Pure: no sockets.

pub/sub (PUB or XPUB -> the node's SUB):   [topic, sender, body]
pipeline (PUSH -> the node's PULL):         [queue, sender, body]
request (DEALER -> the node's ROUTER):      [service, request_id, body]
reply (ROUTER -> the requesting DEALER):    [request_id, status, body]

A request without meta may travel in one frame, and so its reply (protocol 3,
`request_frames`); several of them in one batch frame (protocol 4, `request_batch`,
`reply_batch`). A pushed payload of `LARGE_FRAME` bytes or more may travel as it is, in a
fourth frame after an empty body (protocol 5, `RawPayload`).

``sender`` is empty or 16 bytes of the sender's UUID followed, on pub/sub, by an 8-byte
big-endian sequence number of the first message in ``body``. ``body`` is one or more
concatenated msgpack objects (a batch of at most `MAX_BATCH_ITEMS`), except in requests
and replies (exactly one). A batch some of whose messages carry headers has a fourth
frame, ``meta``: a msgpack map ``{"h": [headers or nil per message], "t": wall clock,
"n": number of the first message}`` (``n`` on pipelines only; on a kept topic, ``"p"``:
where the publisher's history keeps the batch, and ``"s"`` on the first frame of a topic
numbered afresh); so has a request with
headers: ``{"h": headers, "t": wall clock}``. Without headers the frames are exactly
those of protocol 1, so a client written for it keeps working.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from .._addresses import parse_tcp_endpoint
from ..errors import ConfigError, DecodeError, EncodeError

__all__ = [
    "parse_meta",
    "dead_letter_queue",
    "UUID_SIZE",
    "STATUS_OK",
    "STATUS_ERROR",
    "STATUS_NO_SERVICE",
    "STATUS_BAD_REQUEST",
    "STATUS_PARTLY_HANDLED",
    "PARTIAL_ACK_PROTOCOL",
    "MAX_NAME_BYTES",
    "RESERVED_NAME_PREFIX",
    "pullable",
    "MAX_REQUEST_ID_BYTES",
    "MAX_BATCH_ITEMS",
    "BATCH_BYTES",
    "FRAME_HEADROOM",
    "wire_size",
    "STATS_SERVICE",
    "STATS_SERVICE_BYTES",
    "QUEUE_SERVICE_PREFIX",
    "KEEP_SERVICE_PREFIX",
    "HISTORY_SERVICE",
    "HISTORY_SERVICE_BYTES",
    "keep_service",
    "CONTROL_MAGIC",
    "HEADER",
    "PROTOCOL",
    "ENDPOINT_KEYS",
    "OFFER_KINDS",
    "OFFER_PREFIXES",
    "pub_sender",
    "parse_sender",
    "Headed",
    "requester_id",
    "link_id",
    "sender_of_requester",
    "request_frames",
    "reply_frames",
    "CompactCaller",
    "may_compact",
    "BatchCaller",
    "BATCH_PROTOCOL",
    "MARKER_PROTOCOL",
    "MARKER_PREFIX",
    "replay_marker",
    "RAW_PUSH_PROTOCOL",
    "BATCH_MARK",
    "REQUEST_ITEM_BYTES",
    "REPLY_ITEM_BYTES",
    "msgpack_bin",
    "request_batch",
    "parse_request_batch",
    "reply_batch",
    "parse_reply_batch",
    "is_batch",
    "batch_full",
    "LARGE_FRAME",
    "RawPayload",
    "parse_request",
    "parse_reply",
    "queue_service",
    "wrap_item",
    "MAX_ID_CHARS",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "check_headers",
    "inproc_endpoint",
    "parse_endpoint",
]

UUID_SIZE = 16
MAX_NAME_BYTES = 200
MAX_REQUEST_ID_BYTES = 64
MAX_BATCH_ITEMS = 256
"""Most messages one frame may carry. A receiver rejects a frame holding more: without the
bound, one 64 KiB frame of one-byte objects would make 65,536 handler calls."""
BATCH_BYTES = 64 * 1024
"""A batch is closed before it passes this size (a larger message travels alone)."""
_BATCH_TURNS = range(MAX_BATCH_ITEMS)  # (a batch's requests read at most: `parse_request_batch`)
FRAME_HEADROOM = 64 * 1024
"""What a frame may carry past ``max_message_bytes``: the wrapping of one message of the
largest size (its item form, headers of up to 16 KiB, the meta frame). Sockets refuse
frames larger than ``max_message_bytes + FRAME_HEADROOM``; senders never build one."""

STATUS_OK = b"\x00"
STATUS_ERROR = b"\x01"
STATUS_NO_SERVICE = b"\x02"
STATUS_BAD_REQUEST = b"\x03"
STATUS_PARTLY_HANDLED = b"\x04"
"""A stopping puller's answer to an at-least-once batch it handled only part of: the body
names the items it left unhandled (dealt again, no attempt counted) and the failures of
those it handled (`PARTIAL_ACK_PROTOCOL`)."""

STATS_SERVICE = "\x00stats"
"""The built-in service every node answers with its counters."""
STATS_SERVICE_BYTES = STATS_SERVICE.encode()
QUEUE_SERVICE_PREFIX = "\x00queue/"
"""At-least-once batches travel as requests to the service ``"\\x00queue/<name>"``."""
KEEP_SERVICE_PREFIX = "\x00keep/"
"""Durable messages handed to a keeper travel as requests to ``"\\x00keep/<name>"``."""
HISTORY_SERVICE = "\x00history"
"""The built-in service of a publisher that keeps topics: one page of a replay."""
HISTORY_SERVICE_BYTES = HISTORY_SERVICE.encode()

CONTROL_MAGIC = b"\x00zmqmesh-control"
"""First frame of the WHISPERs zmqmesh nodes exchange among themselves (never sent to plain ZRE peers)."""

PROTOCOL = 7
"""The wire protocol this package speaks: 2 adds headers, ids and durable items to 1;
3 adds the one-frame form of requests and replies (`request_frames`); 4 adds batches of
them, several requests or replies in one frame (`request_batch`); 5 adds a large pushed
payload in a frame of its own (`RawPayload`); 6 adds the answer of a publisher that keeps
topics to a replay marker (`MARKER_PREFIX`); 7 adds a stopping puller's answer to a batch
it handled part of (`STATUS_PARTLY_HANDLED`)."""
BATCH_PROTOCOL = 4
"""The protocol from which a provider reads batches of requests."""
RAW_PUSH_PROTOCOL = 5
"""The protocol from which a puller reads a pushed payload in a frame of its own."""
MARKER_PROTOCOL = 6
"""The protocol from which a publisher that keeps topics answers a replay marker (`MARKER_PREFIX`)."""
PARTIAL_ACK_PROTOCOL = 7
"""The protocol from which a pusher reads `STATUS_PARTLY_HANDLED` (a puller sends it to no other)."""
MARKER_PREFIX = b"\xffmarker/"
"""The topic prefix of a replay marker: a subscriber catching up on a publisher's history
subscribes, right after its prefix, to ``MARKER_PREFIX + <its node id> + "/" + <a number
of its own>``; a publisher that keeps topics answers the subscription with one frame on
exactly that topic: its sender frame numbered with the position its history gives the
next frame it keeps (`pub_sender`), its body empty (no message). No UTF-8 topic begins
with the byte 0xFF: no publication matches a marker, and ZeroMQ sends a SUB's
subscriptions to a new connection in byte order, so a marker always goes after the
prefixes it follows."""
BATCH_MARK = b"\x00"
"""First byte of a batch frame: a one-frame request never starts with it (it would name
the empty service), nor does a one-frame reply to a zmqmesh node (its ids are 8 bytes)."""
REQUEST_ITEM_BYTES = 6
"""What a request adds in a batch frame to its service, id and body (their lengths)."""
REPLY_ITEM_BYTES = 6
"""What a reply adds in a batch frame to its id and body (the id's length, the status, the body's length)."""

LARGE_FRAME = 64 * 1024
"""From this size up, a frame is sent without a copy (ZeroMQ keeps a reference), a stream
frame is decoded from a view of what arrived, and a request body travels in a frame of its
own (never copied into a one-frame request)."""

HEADER = {
    "version": "X-ZMQMESH-VERSION",
    "protocol": "X-ZMQMESH-PROTOCOL",
    "mesh": "X-ZMQMESH-MESH",
    "pub": "X-ZMQMESH-PUB",
    "sub": "X-ZMQMESH-SUB",
    "pull": "X-ZMQMESH-PULL",
    "service": "X-ZMQMESH-SERVICE",
    "host": "X-ZMQMESH-HOST",
    "pid": "X-ZMQMESH-PID",
    "key": "X-ZMQMESH-KEY",
    "stream": "X-ZMQMESH-STREAM",
    "runs": "X-ZMQMESH-RUNS",
    "max_message_bytes": "X-ZMQMESH-MAX-MESSAGE-BYTES",
}
"""The HELLO headers of a zmqmesh node (plain ZRE peers send none of them)."""
ENDPOINT_KEYS = ("pub", "sub", "pull", "service")
"""The HELLO headers that carry a pattern socket's endpoint."""

OFFER_KINDS = ("services", "queues", "topics", "ackqueues", "idempotent", "acktimeouts", "keepers", "history")
OFFER_PREFIXES = {
    "services": "zmqmesh/svc/",
    "queues": "zmqmesh/queue/",
    "topics": "zmqmesh/sub/",
    "ackqueues": "zmqmesh/ackqueue/",  # queues pulled at-least-once
    "idempotent": "zmqmesh/idem/",  # services safe to retry on another provider
    "acktimeouts": "zmqmesh/ackto/",  # "<milliseconds>/<queue>": redeal what is not acknowledged in time
    "keepers": "zmqmesh/keep/",  # keeps the durable messages of a queue that stopping pushers hand over
    "history": "zmqmesh/hist/",  # keeps the topics under a prefix (``history=``), served by \x00history
}
"""A node announces what it offers by joining the ZRE group ``prefix + name``."""

_REQUESTER_SUFFIX = 4


RESERVED_NAME_PREFIX = "\x00"
"""How the built-ins' names begin (`STATS_SERVICE`, the at-least-once queues' services):
no user's topic, queue or service may begin so."""


def pullable(queue: str) -> bool:
    """Whether ``queue`` is a name `pull` takes for a queue: text UTF-8 can encode, of 1
    to `MAX_NAME_BYTES` bytes, not beginning `RESERVED_NAME_PREFIX`."""
    if not queue or queue.startswith(RESERVED_NAME_PREFIX):
        return False
    try:
        return len(queue.encode()) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


def dead_letter_queue(queue: str, named: str | None = None) -> str:
    """The queue the dead letters of ``queue`` go to: ``named``, or by default
    ``"<queue>.dead"`` (which passes `MAX_NAME_BYTES` for a queue of more than 195 bytes)."""
    return named or f"{queue}.dead"


def pub_sender(uuid: bytes, sequence: int) -> bytes:
    """The sender frame of a pub/sub message: UUID plus the sequence of its first message."""
    return uuid + sequence.to_bytes(8, "big")


def replay_marker(node_id: str, number: int) -> bytes:
    """The replay marker topic numbered ``number`` of the node ``node_id`` (`MARKER_PREFIX`)."""
    return MARKER_PREFIX + f"{node_id}/{number}".encode()


def parse_sender(frame: bytes) -> tuple[bytes | None, int | None]:
    """``(uuid, sequence)`` from a sender frame; either may be ``None`` when absent."""
    size = len(frame)
    if size == UUID_SIZE:
        return frame, None
    if size == UUID_SIZE + 8:
        return frame[:UUID_SIZE], int.from_bytes(frame[UUID_SIZE:], "big")
    return None, None


class Headed(bytes):
    """An encoded payload that carries headers (checked, and encoded as a msgpack map),
    an id and the sender's wall clock, on its way to the loop."""

    headers: bytes
    id: str
    timestamp: float


_BYTE = [bytes((i,)) for i in range(256)]
_u32 = struct.Struct(">I").pack
_read_u32 = struct.Struct(">I").unpack_from
_read_reply_head = struct.Struct(">x8scI").unpack_from
"""The head of a reply of a batch to a request id of 8 bytes (as `Outstanding` makes them),
past its length byte: the id, the status and the body's length, read in one call."""
_read_id8_size = struct.Struct(">8sI").unpack_from
"""A request's id of 8 bytes and its body's length, in a batch (`parse_request_batch`)."""
_REPLY_HEAD_BYTES = 14


class RawPayload:
    """A pushed payload of `LARGE_FRAME` bytes or more, on its way to the loop: to pullers
    of protocol 5 it travels in a frame of its own, as the caller gave it, never copied on
    the way (``[queue, sender, b"", data]``); to others, and in at-least-once batches,
    `encoded` (msgpack's bin form)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data) + 5  # (as it is `encoded`)

    def encoded(self) -> bytes:
        """The payload as msgpack encodes it (a bin)."""
        return msgpack_bin(self.data)


def msgpack_bin(data: bytes) -> bytes:
    """``data`` (over 255 bytes, under 4 GiB) as msgpack encodes it, a bin 16 or bin 32,
    made with one copy of ``data`` (msgpack's Packer grows its buffer as it writes)."""
    size = len(data)
    header = b"\xc5" + size.to_bytes(2, "big") if size <= 0xFFFF else b"\xc6" + _u32(size)
    return b"".join((header, data))


def wire_size(body: bytes) -> int:
    """The bytes an encoded message adds to a frame, its headers included."""
    return len(body) + len(body.headers) if type(body) is Headed else len(body)


def requester_id(uuid: bytes, serial: int) -> bytes:
    """The routing id of a requesting DEALER: the node's UUID and 4 bytes, the serial
    (which its node starts at random: a stranger cannot take an id before the node)."""
    return uuid + (serial & 0xFFFFFFFF).to_bytes(_REQUESTER_SUFFIX, "big")


def link_id(uuid: bytes) -> bytes:
    """The routing id of a ZRE link: ``0x01`` and the UUID, as RFC 36 asks."""
    return b"\x01" + uuid


def sender_of_requester(routing_id: bytes) -> str | None:
    """The node id (hex) in a requester's or acker's routing id, or None for a foreign one."""
    if len(routing_id) == UUID_SIZE + _REQUESTER_SUFFIX:
        return routing_id[:UUID_SIZE].hex()
    return None


class CompactCaller(bytes):
    """The routing id of a caller that sent its request in one frame: its reply goes back
    in one frame too (`reply_frames`)."""


class BatchCaller(CompactCaller):
    """The routing id of a caller that sent a batch of requests: its replies may go back
    in batches too (`reply_batch`), or one by one in one frame each."""


_ONE_FRAME_CALLERS = (CompactCaller, BatchCaller)


def may_compact(service: bytes, body: bytes, meta: bytes | None) -> bool:
    """Whether a request can travel in one frame (to a provider of protocol 3): no meta,
    and a body small enough to copy."""
    return meta is None and len(body) < LARGE_FRAME and len(service) < 256


def request_frames(service: bytes, request_id: bytes, body: bytes, meta: bytes | None = None,
                   compact: bool = False) -> list[bytes]:
    """The frames a DEALER sends for one request (``meta``: headers and timestamp, if any).

    ``compact`` (a provider of protocol 3, and `may_compact`): one frame, ``[len(service)]
    service [len(request_id)] request_id body``, each length one byte. ZeroMQ costs about
    as much per frame as per message, so one frame instead of three halves what a request
    costs on the wire (see docs/protocol.md)."""
    if compact:
        return [b"".join((_BYTE[len(service)], service, _BYTE[len(request_id)], request_id, body))]
    return [service, request_id, body] if meta is None else [service, request_id, body, meta]


def reply_frames(route: tuple[bytes, bytes], status: bytes, body: bytes) -> list[bytes]:
    """The frames a ROUTER sends back: ``route`` is ``(routing_id, request_id)``; one frame
    after the routing id, ``[len(request_id)] request_id status body``, to a caller that
    asked in one frame (a `CompactCaller`)."""
    if type(route[0]) in _ONE_FRAME_CALLERS:
        return [route[0], b"".join((_BYTE[len(route[1])], route[1], status, body))]
    return [route[0], route[1], status, body]


def parse_request(frames: list[bytes], callers: Mapping[bytes, CompactCaller] | None = None
                  ) -> tuple[tuple[bytes, bytes], bytes, bytes, bytes | None] | None:
    """``(route, service, body, meta)`` of a request as the ROUTER receives it (``meta``:
    the optional frame with headers and timestamp), or None if it is not one: a one-frame
    batch of them (`is_batch`: it would name the empty service) is not. (A request id past
    `MAX_REQUEST_ID_BYTES` is the receiver's to refuse: it can still answer it.) A request
    in one frame gives a `CompactCaller` as the route's routing id: ``callers``'s for that
    routing id when given (a table that keeps those it made), else a new one."""
    count = len(frames)
    if count == 2:
        envelope = frames[1]
        id_at = 1 + (envelope[0] if envelope else 0)
        if id_at == 1 or len(envelope) <= id_at:  # (empty, or `BATCH_MARK`: no service named)
            return None
        body_at = id_at + 1 + envelope[id_at]
        if len(envelope) < body_at:
            return None
        # (`get` first: a dict subclass's subscript goes through a slot wrapper, at five times
        # a plain dict's cost; a miss subscripts, for the table to make the caller it keeps)
        caller = CompactCaller(frames[0]) if callers is None else callers.get(frames[0]) or callers[frames[0]]
        return (caller, envelope[id_at + 1:body_at]), envelope[1:id_at], envelope[body_at:], None
    if count not in (4, 5):
        return None
    routing_id, service, request_id, body = frames[:4]
    return (routing_id, request_id), service, body, frames[4] if count == 5 else None


def batch_full(size: int, count: int, adding: int) -> bool:
    """Whether a batch frame of ``size`` bytes and ``count`` requests or replies has no
    room for one more of ``adding`` bytes (`BATCH_BYTES`, `MAX_BATCH_ITEMS`)."""
    return size + adding > BATCH_BYTES or count == MAX_BATCH_ITEMS


def is_batch(frame: bytes) -> bool:
    """Whether a one-frame request or reply is a batch (`BATCH_MARK`)."""
    return frame[:1] == BATCH_MARK


def request_batch(requests: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """One frame holding ``requests`` (``(service, request_id, body)`` each, as
    `may_compact` allows): `BATCH_MARK`, then per request ``[len(service)] service
    [len(request_id)] request_id [len(body), 4 bytes big-endian] body``."""
    parts = [BATCH_MARK]
    add = parts.extend
    byte, u32 = _BYTE, _u32
    for service, request_id, body in requests:  # (one join for the whole frame, none per request)
        add((byte[len(service)], service, byte[len(request_id)], request_id, u32(len(body)), body))
    return b"".join(parts)


def parse_request_batch(frame: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """The ``(service, request_id, body)`` of each request of a batch frame. Raises
    `DecodeError` for a malformed one, one of more than `MAX_BATCH_ITEMS` or larger than
    `BATCH_BYTES`."""
    if len(frame) > BATCH_BYTES:
        raise DecodeError(f"a batch of {len(frame)} bytes")
    requests: list[tuple[bytes, bytes, bytes]] = []
    append = requests.append
    at, end = 1, len(frame)
    # a request whose head begins as the one before it (its service, and an id of 8 bytes: a
    # batch's usual run) is read in one go, its service the same object: two slices, two
    # indexings and four additions fewer a request
    head, head_bytes, service = b"", 0, b""
    for _ in _BATCH_TURNS:  # (no count looked at per request; one past the limit is not read)
        if at >= end:
            break
        if head and frame.startswith(head, at) and (body_at := at + head_bytes) <= end:
            request_id, size = _read_id8_size(frame, body_at - 12)
        else:
            id_at = at + 1 + frame[at]
            if id_at >= end:
                raise DecodeError("a request of a batch is cut short")
            size_at = id_at + 1 + frame[id_at]
            body_at = size_at + 4
            if body_at > end:
                raise DecodeError("a request of a batch is cut short")
            service, request_id, size = frame[at + 1:id_at], frame[id_at + 1:size_at], _read_u32(frame, size_at)[0]
            head, head_bytes = (frame[at:id_at + 1], body_at - at) if size_at - id_at == 9 else (b"", 0)
        body_end = body_at + size
        if body_end > end:
            raise DecodeError("a request of a batch is cut short")
        append((service, request_id, frame[body_at:body_end]))
        at = body_end
    else:
        if at < end:
            raise DecodeError(f"a batch of more than {MAX_BATCH_ITEMS} requests")
    if not requests:
        raise DecodeError("an empty batch of requests")
    return requests


def reply_batch(replies: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """One frame holding ``replies`` (``(request_id, status, body)`` each): `BATCH_MARK`,
    then per reply ``[len(request_id)] request_id status [len(body), 4 bytes] body``."""
    parts = [BATCH_MARK]
    add = parts.extend
    byte, u32 = _BYTE, _u32
    for request_id, status, body in replies:  # (one join for the whole frame, none per reply)
        add((byte[len(request_id)], request_id, status, u32(len(body)), body))
    return b"".join(parts)


def parse_reply_batch(frame: bytes) -> list[tuple[bytes, bytes, bytes]] | None:
    """The ``(request_id, status, body)`` of each reply of a batch frame; None if it is
    malformed, holds more than `MAX_BATCH_ITEMS` or is larger than `BATCH_BYTES`."""
    if len(frame) > BATCH_BYTES:
        return None
    replies: list[tuple[bytes, bytes, bytes]] = []
    append = replies.append
    at, end = 1, len(frame)
    while at < end:  # (bounded by the frame's size: its count is looked at once, after)
        if frame[at] == 8 and at + _REPLY_HEAD_BYTES <= end:  # (an id of 8 bytes, the head whole: one read)
            request_id, status, size = _read_reply_head(frame, at)
            body_at = at + _REPLY_HEAD_BYTES
        else:
            status_at = at + 1 + frame[at]
            body_at = status_at + 5
            if body_at > end:
                return None
            request_id, status, size = frame[at + 1:status_at], _BYTE[frame[status_at]], _read_u32(frame, status_at + 1)[0]
        body_end = body_at + size
        if body_end > end:
            return None
        append((request_id, status, frame[body_at:body_end]))
        at = body_end
    return replies if 0 < len(replies) <= MAX_BATCH_ITEMS else None


def parse_reply(frames: list[bytes]) -> tuple[bytes, bytes, bytes] | None:
    """``(request_id, status, body)`` of a reply as the DEALER receives it, in three
    frames or in one (`reply_frames`), or None if malformed."""
    if len(frames) == 1:
        reply = frames[0]
        status_at = 1 + (reply[0] if reply else 0)
        if len(reply) <= status_at:
            return None
        return reply[1:status_at], reply[status_at:status_at + 1], reply[status_at + 1:]
    if len(frames) != 3:
        return None
    return frames[0], frames[1], frames[2]


def queue_service(queue: str) -> bytes:
    """The service name at-least-once batches of ``queue`` are sent to."""
    return (QUEUE_SERVICE_PREFIX + queue).encode()


def keep_service(queue: str) -> bytes:
    """The service name a keeper of ``queue`` takes durable messages on."""
    return (KEEP_SERVICE_PREFIX + queue).encode()


_TRUE, _FALSE, _ARRAY2 = b"\xc3", b"\xc2", b"\x92"


def wrap_item(body: bytes, redelivered: bool) -> bytes:
    """The msgpack array ``[redelivered, data]`` around an already encoded payload."""
    return _ARRAY2 + (_TRUE if redelivered else _FALSE) + body


MAX_ID_CHARS = 128
"""Longest message id accepted."""
MAX_HEADERS = 64
"""Most headers one message may carry."""
MAX_HEADER_BYTES = 16 * 1024
"""Most bytes the headers of one message may take, names and values together."""


def check_headers(headers: object) -> dict[str, str]:
    """``headers`` if it is a ``dict[str, str]`` within `MAX_HEADERS` and
    `MAX_HEADER_BYTES`. Raises `ConfigError` (a ``ValueError``) past them, `EncodeError`
    (a ``TypeError``) for a wrong type or a string that UTF-8 cannot encode (a lone
    surrogate), as for unencodable data."""
    if not isinstance(headers, dict):
        raise EncodeError(f"headers must be a dict of str to str, not {type(headers).__name__}")
    if len(headers) > MAX_HEADERS:
        raise ConfigError(f"{len(headers)} headers; at most {MAX_HEADERS}")
    size = 0
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise EncodeError(f"headers must be a dict of str to str; header {_shown(key)}: a "
                              f"{type(key).__name__} name, a {type(value).__name__} value")
        try:
            size += len(key.encode()) + len(value.encode())
        except UnicodeEncodeError as exc:
            raise EncodeError(f"header {_shown(key)}: text UTF-8 cannot encode: {exc}") from exc
    if size > MAX_HEADER_BYTES:
        raise ConfigError(f"headers of {size} bytes; at most {MAX_HEADER_BYTES}")
    return headers


def _shown(key: object) -> str:
    """A header's name for an error message: quoted, at most 40 characters of it."""
    shown = repr(key)
    return shown if len(shown) <= 42 else shown[:39] + "..."


def parse_meta(meta: object, count: int) -> tuple[list[dict[str, str] | None], float | None, int | None]:
    """``(headers per message, timestamp, first number)`` from the decoded meta frame of a
    batch of ``count`` messages (live or replayed from a history). Raises `DecodeError`."""
    headers = meta.get("h") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(headers, list) or len(headers) != count:
        raise DecodeError("a meta frame that does not match its messages")
    for entry in headers:
        if entry is not None:
            try:
                check_headers(entry)
            except (TypeError, ValueError) as exc:
                raise DecodeError(f"bad headers: {exc}") from None
    first = meta.get("n")
    timestamp = sent_at(meta.get("t"))
    number = first if isinstance(first, int) and not isinstance(first, bool) and first >= 0 else None
    return headers, timestamp, number


def sent_at(stamp: object) -> float | None:
    """A sender's clock (its ``time.time()`` as it sent) as a message shows it: a finite
    number, else None (NaN, an infinity, a bool, text: a stranger's, which handlers would
    take for a time). Raises nothing."""
    if type(stamp) is float:  # (what senders write: checked first, the cheapest way)
        return stamp if stamp - stamp == 0.0 else None  # (NaN and the infinities give NaN)
    if type(stamp) is int:
        try:
            return float(stamp)
        except OverflowError:  # (an int past a float's range)
            return None
    return None


def inproc_endpoint(node_id: str, what: str) -> str:
    """The in-process endpoint of one of a node's sockets (its own deliveries, its wake-ups)."""
    return f"inproc://zmqmesh-{node_id}-{what}"


def parse_endpoint(endpoint: str) -> tuple[str, int] | None:
    """``(ip, port)`` of a ``tcp://a.b.c.d:port`` endpoint, or ``None`` if it is not one."""
    return parse_tcp_endpoint(endpoint)
