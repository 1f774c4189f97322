"""msgpack encoding of payloads, with explicit size limits on decoding; no pickle anywhere.

Payloads may be anything msgpack represents: None, bool, int, float, str, bytes, lists
(tuples are sent as lists) and dicts. ``bytes`` stay ``bytes`` (bin type), ``str`` stay
``str``. An object msgpack cannot represent raises `EncodeError` (a ``TypeError``) in the
caller, before anything is sent.

One frame may carry a *batch*: several msgpack objects concatenated back to back. A
frame holding a single object is the batch of one, so a sender never has to batch.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from itertools import islice, repeat
from typing import Any

import msgpack

from ..errors import DecodeError, EncodeError, MessageTooLargeError
from .frames import (
    BATCH_BYTES,
    FRAME_HEADROOM,
    LARGE_FRAME,
    MAX_BATCH_ITEMS,
    RawPayload,
    msgpack_bin,
)

__all__ = ["Codec", "durable_item", "durable_items", "DURABLE_ITEM_FIELDS", "new_packer"]

DURABLE_ITEM_FIELDS = 6
"""A durable queue item: ``[redelivered, data, id, timestamp, headers, attempts]``; an
in-memory at-least-once item is ``[redelivered, data]``."""
_TRUE, _FALSE, _ARRAY6, _NIL = b"\xc3", b"\xc2", b"\x96", b"\xc0"
_FIXINT = [bytes((i,)) for i in range(128)]  # msgpack's positive fixint: the integer is its byte
_FLOAT64 = struct.Struct(">Bd").pack  # (0xcb, x): msgpack's float 64, as its Packer writes a float


def durable_item(body: bytes, redelivered: bool, msg_id: str, timestamp: float, headers: bytes | None,
                 attempts: int, pack: Callable[[Any], bytes] = msgpack.packb) -> bytes:
    """The msgpack array of one durable queue item around an already encoded payload and
    already encoded headers (a map, or None). ``pack``: a `msgpack.Packer`'s own, from a
    caller that makes many items on one thread (``packb`` makes a Packer each call)."""
    return b"".join((_ARRAY6, _TRUE if redelivered else _FALSE, body, pack(msg_id),
                     _FLOAT64(0xCB, timestamp) if type(timestamp) is float else pack(timestamp), headers or _NIL,
                     _FIXINT[attempts] if 0 <= attempts < 128 else msgpack.packb(attempts)))


def durable_items(ids: Sequence[str], stamps: Sequence[float], headers: Sequence[bytes | None],
                  bodies: Sequence[bytes], attempts: Sequence[int], pack: Callable[[Any], bytes]) -> list[bytes]:
    """`durable_item` of each message given as columns (its id, timestamp, headers, body
    and attempts at one index), not redelivered: alike to calling it for each, and made
    without a Python step per item when they share their timestamp, headers and attempts
    (the messages of one call do). ``pack``: a `msgpack.Packer`'s own, of one thread at a time."""
    n, stamp, head, tries = len(ids), stamps[0], headers[0], attempts[0]
    if type(stamp) is float and 0 <= tries < 128 and stamps.count(stamp) == n and headers.count(head) == n \
            and attempts.count(tries) == n:
        tail = _FLOAT64(0xCB, stamp) + (head or _NIL) + _FIXINT[tries]
        return list(map(b"".join, zip(repeat(_ARRAY6 + _FALSE, n), bodies, map(pack, ids), repeat(tail, n))))
    return [durable_item(body, False, msg_id, ts, head, tries, pack)
            for msg_id, ts, head, body, tries in zip(ids, stamps, headers, bodies, attempts)]

_BIN8 = [b"\xc4" + bytes((i,)) for i in range(256)]  # msgpack's bin 8 header, by the length it heads
_LARGE_BIN = 16 * 1024  # from here on, `Codec.encode` makes a bin itself (`msgpack_bin`)

_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError)  # (msgpack's, for what it cannot pack)
_DECODE_ERRORS = (ValueError, TypeError, msgpack.UnpackException, OverflowError, RecursionError)
_KEPT_UNPACKER_BYTES = BATCH_BYTES  # (a batch's frame at most: decoded by its thread's Unpacker, `Codec._take_unpacker`)
_WITHIN_LIMITS = {"raw": False, "strict_map_key": False}  # (`decode_batch`: a frame no longer than the limit)


def _frozen(value: Any) -> Any:
    """``value`` made hashable: lists become tuples, maps tuples of pairs (recursively)."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple((_frozen(k), _frozen(v)) for k, v in value.items())
    return value


def _map_of_frozen_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_frozen(k): v for k, v in pairs}


def _several(frame: bytes) -> bool:
    """Whether ``frame`` is a batch of several objects, as its first one's header says at a
    glance: bytes shorter than 256 (msgpack's bin 8, a push's bare bytes) ending before the
    frame does. (Then ``unpackb`` would decode the first, copy the rest into the
    `msgpack.ExtraData` it raises, and the batch would be decoded again: 0.9 us a frame.)
    False says nothing: ``unpackb`` finds out."""
    return len(frame) > 2 and frame[0] == 0xC4 and len(frame) > 2 + frame[1]


def _which(item: int | None) -> str:
    """How an error names the payload: "the payload", or the ``item``-th of a batch."""
    return "the payload" if item is None else f"item {item} (from 0) of the batch"


def _unencodable(data: Any, exc: BaseException, item: int | None = None) -> EncodeError:
    """The error for ``data`` msgpack refused with ``exc`` (a packer empties its buffer on
    failure), naming its type and, for the ``item``-th of a batch (from 0), its place."""
    return EncodeError(f"{_which(item)} ({type(data).__name__}) cannot be encoded as msgpack: {exc}")


def new_packer() -> msgpack.Packer:
    """A packer that writes as `Codec.encode` does (``bytes`` as msgpack bin), for one user
    at a time: a packer fills one buffer per call, so two threads packing at once with it
    mix their bodies."""
    return msgpack.Packer(use_bin_type=True)


class Codec:
    """Encodes payloads to msgpack bytes and decodes them within fixed limits.

    ``max_message_bytes`` bounds one encoded payload and every string, binary, array and
    map decoded from a frame; deeper nesting than msgpack's own stack limit is refused.
    """

    __slots__ = ("max_message_bytes", "short_bins", "_limits", "_local", "_small")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.short_bins: list[bytes] = _BIN8[:min(256, max_message_bytes - 1)]
        """The header `encode` puts before ``bytes`` shorter than ``len(short_bins)`` (msgpack's
        bin 8), by their length: such a payload's encoding is ``short_bins[len(data)] + data``."""
        self._small = len(self.short_bins)  # (bytes shorter than this take msgpack's bin 8 form)
        self._limits = dict(
            raw=False,
            strict_map_key=False,
            max_str_len=max_message_bytes,
            max_bin_len=max_message_bytes,
            max_array_len=max_message_bytes,
            max_map_len=max_message_bytes,
            max_ext_len=max_message_bytes,
        )
        self._local = threading.local()  # a Packer per thread: Packer.pack is ~3x packb

    def encode(self, data: Any, item: int | None = None, packer: msgpack.Packer | None = None) -> bytes:
        """Encode one payload (``item``: its index in the caller's batch, for the error;
        ``packer``: one the caller keeps, which spares looking up the thread's: the calling
        thread's `thread_packer`, or a `new_packer` that caller alone uses). Raises
        `EncodeError` (a ``TypeError``) for unencodable data, `MessageTooLargeError` if too big."""
        if type(data) is bytes:
            size = len(data)
            if size < self._small:
                return self.short_bins[size] + data  # (msgpack's bin 8, as its Packer writes it, in half the time)
            if size >= _LARGE_BIN:  # (msgpack's Packer: 2.6x the time at 1 MiB)
                self._check_bin(size, item)
                return msgpack_bin(data)
        if packer is None:
            try:
                packer = self._local.packer  # (inline: one call less on the path of every payload)
            except AttributeError:
                packer = self.thread_packer()
        try:
            body: bytes = packer.pack(data)
        except _ENCODE_ERRORS as exc:
            raise _unencodable(data, exc, item) from exc
        if len(body) > self.max_message_bytes:
            raise self._too_large(len(body), item)
        return body

    def encode_many(self, items: Iterable[Any]) -> list[bytes]:
        """Every item encoded, as `encode` encodes each, with one lookup of this thread's
        packer for them all (a third less time a small item). Raises what `encode` raises,
        for the first item that fails, naming its index."""
        if type(items) is list and items and type(items[0]) is not bytes:  # (a list of bytes: `_short_bytes`)
            bodies = self.packed(items)
            if bodies is not None:
                return bodies
        return self._encode_all(items, self.encode)

    def packed(self, items: Sequence[Any]) -> list[bytes] | None:
        """``items`` (one or more) encoded as `encode` encodes each, by one map of this
        thread's packer over them, with no Python step per item (a quarter fewer
        instructions a small map; the packer writes ``bytes`` as `encode` does, each as a
        msgpack bin); None if one cannot be encoded or is too large (`encode`, item by item,
        then says which, as `_encode_all` does)."""
        try:
            bodies = list(map(self.thread_packer().pack, items))
        except _ENCODE_ERRORS:
            return None
        return bodies if max(map(len, bodies)) <= self.max_message_bytes else None

    def encode_pushes(self, items: Iterable[Any]) -> list[bytes | RawPayload]:
        """Every item as a push without headers sends it: encoded as `encode_many` encodes
        it, but ``bytes`` of `LARGE_FRAME` or more, which `raw` makes ready to travel as
        they are (a pull with ``zero_copy=True`` gets them as views, as it gets those of
        single pushes). Raises what `encode_many` raises, for the first item that fails."""
        return self._encode_all(items, self._push_bytes)

    def _push_bytes(self, data: bytes, item: int) -> bytes | RawPayload:
        """``data`` (``bytes`` of at least `_small`, the ``item``-th of a batch) as a push
        sends it: `raw` from `LARGE_FRAME`."""
        return self.raw(data, item) if len(data) >= LARGE_FRAME else self.encode(data, item)

    def _encode_all(self, items: Iterable[Any], encode: Callable[[bytes, int], Any]) -> list[Any]:
        """`encode_many`, with ``encode`` for the ``bytes`` that are not short (`_small`)."""
        short = self._short_bytes(items)
        if short is not None:
            return short
        bin8, small, limit = _BIN8, self._small, self.max_message_bytes
        pack = self.thread_packer().pack
        bodies: list[Any] = []
        add = bodies.append
        for data in items:
            if type(data) is bytes:
                add(bin8[len(data)] + data if len(data) < small else encode(data, len(bodies)))
                continue
            try:
                body = pack(data)
            except _ENCODE_ERRORS as exc:
                raise _unencodable(data, exc, len(bodies)) from exc
            if len(body) > limit:
                raise self._too_large(len(body), len(bodies))
            add(body)
        return bodies

    def _short_bytes(self, items: Iterable[Any]) -> list[bytes] | None:
        """``items`` encoded as `encode` encodes each, if they are a list of ``bytes``
        shorter than `_small` (msgpack's bin 8); else None, and `encode_many` encodes
        them one by one. The comprehension that encodes them checks their types and, by the
        table it reads, their lengths: a first pass for the types (``set(map(type, items))``)
        cost more, ``type`` being called through a tuple of arguments per item (the pusher of
        ``push_many`` of 64-byte bytes: 1,460 against 1,400 instructions a message). (A list
        whose first item is no such bytes is not looked at.)"""
        if type(items) is not list or not items or type(items[0]) is not bytes or len(items[0]) >= self._small:
            return None
        bins = self.short_bins  # (as long as `_small`: a longer item raises IndexError)
        try:
            bodies = [bins[len(data)] + data for data in items if type(data) is bytes]
        except IndexError:
            return None
        return bodies if len(bodies) == len(items) else None

    def thread_packer(self) -> msgpack.Packer:
        """The calling thread's packer (`Packer.pack` is ~3x ``packb``), for it alone: made
        on its first use."""
        try:
            packer: msgpack.Packer = self._local.packer
        except AttributeError:
            packer = self._local.packer = new_packer()
        return packer

    def _too_large(self, size: int, item: int | None = None) -> MessageTooLargeError:
        return MessageTooLargeError(f"{_which(item)} is {size} bytes; max_message_bytes is {self.max_message_bytes}")

    def raw(self, data: bytes, item: int | None = None) -> RawPayload:
        """``data`` (`LARGE_FRAME` bytes or more) to travel as it is, in a frame of its own
        where the receiver reads that (see `RawPayload`; ``item``: its index in the caller's
        batch, for the error). Raises `MessageTooLargeError` if it is too big, `EncodeError`
        past 4 GiB."""
        self._check_bin(len(data), item)  # (as msgpack: some pullers get it so)
        return RawPayload(data)

    def _check_bin(self, size: int, item: int | None = None) -> None:
        header_size = 3 if size <= 0xFFFF else 5
        if size + header_size > self.max_message_bytes:
            raise self._too_large(size + header_size, item)
        if size > 0xFFFFFFFF:
            raise EncodeError(f"{_which(item)} cannot be encoded as msgpack: bytes over 4 GiB")

    def decode(self, frame: bytes) -> Any:
        """Decode a frame holding exactly one object. Raises `DecodeError`."""
        if len(frame) > self.max_message_bytes:
            raise DecodeError(f"frame of {len(frame)} bytes exceeds max_message_bytes")
        try:  # (unpackb bounds every length by the frame's: no limit past it needs saying)
            try:  # (msgpack's defaults take maps keyed by str or bytes, the common case, with no
                # keyword to parse, a third of the call's cost; they refuse other keys)
                return msgpack.unpackb(frame)
            except ValueError:  # (a map keyed otherwise, or malformed: as it always was, from the start)
                return msgpack.unpackb(frame, raw=False, strict_map_key=False)
        except TypeError as exc:
            if "unhashable" not in str(exc):
                raise DecodeError(f"malformed msgpack payload: {exc}") from exc
            return self._decode_keys_frozen(frame)[0]
        except _DECODE_ERRORS as exc:
            raise DecodeError(f"malformed msgpack payload: {exc}") from exc

    def decode_batch(self, frame: bytes, max_items: int = MAX_BATCH_ITEMS) -> list[Any]:
        """Decode a frame holding one to ``max_items`` concatenated objects (at most
        ``max_message_bytes`` each, the frame at most `FRAME_HEADROOM` more: a message of
        the largest size in its item form). Raises `DecodeError`."""
        if len(frame) > self.max_message_bytes + FRAME_HEADROOM:
            raise DecodeError(f"frame of {len(frame)} bytes exceeds max_message_bytes")
        # (unpackb bounds every length by the frame's: within max_message_bytes, the limits
        # need no saying, and saying them took about a quarter of a one-message frame's decoding)
        limits = self._limits if len(frame) > self.max_message_bytes else _WITHIN_LIMITS
        if not _several(frame):
            try:
                return [msgpack.unpackb(frame, **limits)]
            except msgpack.ExtraData:
                pass  # a batch of several objects
            except TypeError as exc:
                if "unhashable" not in str(exc):
                    raise DecodeError(f"malformed msgpack payload: {exc}") from exc
                return self._decode_keys_frozen(frame, max_items)
            except _DECODE_ERRORS as exc:
                raise DecodeError(f"malformed msgpack payload: {exc}") from exc
        try:
            return self._decode_many(frame, max_items, self._limits)
        except DecodeError as exc:
            if "unhashable" not in str(exc):
                raise
            return self._decode_keys_frozen(frame, max_items)

    def _decode_keys_frozen(self, frame: bytes, max_items: int = 1) -> list[Any]:
        """The slow path for maps keyed by arrays or maps (a tuple key encodes as an array,
        which Python cannot hash): such keys come back as tuples, as they were sent."""
        return self._decode_many(frame, max_items, {**self._limits, "object_pairs_hook": _map_of_frozen_keys})

    def _decode_many(self, frame: bytes, max_items: int, limits: dict[str, Any]) -> list[Any]:
        kept = limits is self._limits and len(frame) <= _KEPT_UNPACKER_BYTES
        unpacker = self._take_unpacker() if kept else msgpack.Unpacker(max_buffer_size=len(frame) + 1, **limits)
        start = unpacker.tell()
        try:
            unpacker.feed(frame)
            items = list(islice(unpacker, max_items + 1))
        except _DECODE_ERRORS as exc:
            raise DecodeError(f"malformed msgpack batch: {exc}") from exc
        if len(items) > max_items:
            raise DecodeError(f"a batch of more than {max_items} messages")
        # The iteration ends quietly where the frame ends inside an object. A nil fed after
        # it then either ends that object (something else than a lone nil comes back),
        # is not enough to end it, or fails it: only after a whole last object is it read
        # as a lone nil, right at the frame's end.
        try:
            unpacker.feed(_NIL)
            whole = unpacker.unpack() is None and unpacker.tell() - start == len(frame) + 1
        except _DECODE_ERRORS:
            whole = False
        if not whole:
            raise DecodeError("truncated msgpack batch")
        if kept:  # (it read a whole frame and the nil after it: empty again, for the next frame)
            self._local.unpacker = unpacker
        return items

    def _take_unpacker(self) -> msgpack.Unpacker:
        """This thread's Unpacker for batches of up to `_KEPT_UNPACKER_BYTES`, taken from it:
        `_decode_many` gives it back only after it decoded a whole frame, so one left part-way
        by a malformed frame is never used again (a new one is made). A new Unpacker costs
        a frame 1.1 us (it zeroes its 40 KiB stack), 4 ns a message of a 256-message batch."""
        local = self._local
        unpacker: msgpack.Unpacker | None = getattr(local, "unpacker", None)
        if unpacker is None:
            return msgpack.Unpacker(max_buffer_size=_KEPT_UNPACKER_BYTES + 1, **self._limits)
        local.unpacker = None
        return unpacker
