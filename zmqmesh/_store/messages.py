"""Durable messages as a node holds them, apart from the store that keeps them: what the
patterns that send them (`ReliableSender`, `DurableQueues`) need without loading the
store's module, which a node without a store never does."""

from __future__ import annotations

import functools
import operator
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, repeat
from typing import Any, Final

import msgpack

from .._wire.codec import durable_items
from .._wire.frames import MAX_ID_CHARS, check_headers

__all__ = ["INTEGER_MAX", "Entry", "Entries", "StoredMessage", "STORED", "SEQ", "QUEUE", "ID", "TIMESTAMP", "HEADERS", "BODY",
           "ATTEMPTS", "SEGMENT", "RECOVERED", "WIRE", "stored_message", "as_recovered", "with_attempt", "with_attempts",
           "stored_messages", "seq_of", "segment_of", "wire_of", "unreadable", "joins"]

INTEGER_MAX: Final = (1 << 63) - 1
"""The largest integer a store holds (SQLite's INTEGER): bounds the numbers, positions and
attempts a stranger may hand over to be stored."""

Entry = tuple[str, float, bytes | None, bytes, int, bool]
"""A message to store: ``(id, timestamp, headers, body, attempts, redelivered)``;
``redelivered``: it may have been delivered already (a keeper is handed it so marked)."""


class Entries:
    """Messages to store, as columns: a message's `Entry` fields at one index of each
    (its id, timestamp, headers, body, failed deliveries, and whether it is marked
    redelivered). One object for a call's messages, not a tuple each: the garbage
    collector counts, and runs for, every tuple made, and those of a durable call are
    many (a store keeps those of one call as columns too, `segments.stored`)."""

    __slots__ = ("ids", "stamps", "headers", "bodies", "attempts", "marked")

    def __init__(self, ids: Sequence[str], stamps: Sequence[float], headers: Sequence[bytes | None],
                 bodies: Sequence[bytes], attempts: Sequence[int], marked: Sequence[bool]) -> None:
        self.ids = ids
        self.stamps = stamps
        self.headers = headers
        self.bodies = bodies
        self.attempts = attempts
        self.marked = marked

    @classmethod
    def of_call(cls, ids: Sequence[str], stamp: float, headers: bytes | None, bodies: Sequence[bytes]) -> Entries:
        """The messages of one push call: fresh, sharing its timestamp and headers."""
        n = len(ids)
        return cls(ids, (stamp,) * n, (headers,) * n, bodies, (0,) * n, (False,) * n)

    @classmethod
    def of_rows(cls, rows: Sequence[Entry]) -> Entries:
        """The messages ``rows`` (as a keeper is handed them), as columns."""
        if not rows:
            return cls((), (), (), (), (), ())
        return cls(*zip(*rows))

    @classmethod
    def joined(cls, parts: Sequence[Entries]) -> Entries:
        """The messages of ``parts``, one after another."""
        if len(parts) == 1:
            return parts[0]
        return cls(*(list(chain.from_iterable(column)) for column in zip(*map(Entries.columns, parts))))

    def columns(self) -> tuple[Sequence[Any], ...]:
        """``(ids, stamps, headers, bodies, attempts, marked)``."""
        return self.ids, self.stamps, self.headers, self.bodies, self.attempts, self.marked

    def part(self, start: int, end: int) -> Entries:
        """The messages from index ``start`` to ``end`` (not included)."""
        return Entries(*(column[start:end] for column in self.columns()))

    def __len__(self) -> int:
        return len(self.ids)


StoredMessage = tuple[int, str, str, float, bytes | None, bytes, int, int, bool, bytes | None]
"""One durable message as stored: its place in the outbox and what travels, as a plain
tuple of its fields, by these indexes:

- `SEQ`: its sequence number; `QUEUE`; `ID`; `TIMESTAMP`; `HEADERS`; `BODY`;
- `ATTEMPTS`: its failed deliveries;
- `SEGMENT`: the sequence number of the first message of its segment (see `Store.append`);
- `RECOVERED`: it may have been delivered already: stored before this node started, or
  stored marked redelivered (a keeper handed it so). Dealt marked redelivered;
- `WIRE`: its form on the wire for a first delivery (`durable_items`), made with the
  message as it was committed or read back: the loop sends it as it is. None for a
  message marked redelivered or with failed deliveries counted (`fill_batch` relies on it
  for the latter).

A plain tuple, its type exactly `STORED`, which nothing else a queue holds is (encoded
payloads are bytes, `Headed`, `RawPayload`): the garbage collector stops tracking a tuple
of atoms at the first collection it survives, never an instance of a subclass of tuple.
As a named tuple, every message buffered or in flight stayed tracked, and each collection
of an older generation went over all of them again: a durable pusher's collections took
349-438 ns a message (benchmarks/durable_cpu.py, 1 M messages), 88-143 as plain tuples."""

STORED: Final = tuple
"""The type of a `StoredMessage` (``type(item) is STORED``: a durable message)."""
SEQ: Final = 0
QUEUE: Final = 1
ID: Final = 2
TIMESTAMP: Final = 3
HEADERS: Final = 4
BODY: Final = 5
ATTEMPTS: Final = 6
SEGMENT: Final = 7
RECOVERED: Final = 8
WIRE: Final = 9


def stored_message(seq: int, queue: str, msg_id: str, timestamp: float, headers: bytes | None, body: bytes,
                   attempts: int, segment: int, recovered: bool = False, wire: bytes | None = None) -> StoredMessage:
    """A `StoredMessage` of these fields."""
    return seq, queue, msg_id, timestamp, headers, body, attempts, segment, recovered, wire


def as_recovered(message: StoredMessage) -> StoredMessage:
    """``message``, marked as stored before this node started (no wire form)."""
    seq, queue, msg_id, timestamp, headers, body, attempts, segment, _, _ = message
    return seq, queue, msg_id, timestamp, headers, body, attempts, segment, True, None


def with_attempt(message: StoredMessage) -> StoredMessage:
    """``message`` with one more failed delivery counted."""
    return with_attempts(message, message[ATTEMPTS] + 1)


def with_attempts(message: StoredMessage, attempts: int) -> StoredMessage:
    """``message`` with ``attempts`` failed deliveries counted (no wire form)."""
    seq, queue, msg_id, timestamp, headers, body, _, segment, recovered, _ = message
    return seq, queue, msg_id, timestamp, headers, body, attempts, segment, recovered, None


# getters of a StoredMessage's fields, to map over many messages: no Python step per message
seq_of = operator.itemgetter(SEQ)
segment_of = operator.itemgetter(SEGMENT)
wire_of = operator.itemgetter(WIRE)


def stored_messages(queue: str, first: int, segments: Iterable[int], ids: Sequence[str], stamps: Sequence[float],
                    headers: Sequence[bytes | None], bodies: Sequence[bytes], attempts: Sequence[int],
                    marked: Sequence[bool], pack: Callable[[Any], bytes]) -> tuple[list[StoredMessage], list[int] | None]:
    """The messages of ``queue`` given as columns (a message's fields at one index),
    numbered on from ``first``, each in the segment ``segments`` gives it in turn: as a
    commit or a read back holds them, with their wire form for a first delivery
    (`durable_items`), made without a Python step per message; those ``marked`` (stored
    marked redelivered) as recovered instead, and those with failed deliveries without
    it (neither is dealt as a first delivery). With them, the lengths of their wire forms
    when each has one (None otherwise): what a buffer reckons their sizes by (`held_halves`),
    without looking each form up again. ``pack``: a `msgpack.Packer`'s own, of one thread
    at a time."""
    n = len(ids)
    wires = durable_items(ids, stamps, headers, bodies, attempts, pack)
    # (each the tuple zip makes: the caller answers for the fields' types)
    messages: list[StoredMessage] = list(zip(range(first, first + n), repeat(queue, n), ids, stamps, headers, bodies,
                                             attempts, segments, repeat(False, n), wires))
    if any(marked) or any(attempts):  # (rare: what a keeper was handed marked, or with failed deliveries)
        return [as_recovered(m) if mark else with_attempts(m, m[ATTEMPTS]) if m[ATTEMPTS] else m
                for m, mark in zip(messages, marked)], None
    return messages, list(map(len, wires))


def joins(empty: str | bytes, values: Sequence[Any]) -> bool:
    """Whether ``values`` all join to ``empty`` (all str, or all bytes): for what msgpack
    unpacked, which makes no subclass of either nor another type with bytes' buffer, their
    type is then exactly that, found in one C call. (It copies them: for the small bodies
    of a segment of many messages, a third of the cost of looking at each one's type; what
    it copies is bounded: a segment's bytes by `SEGMENT_BYTES`, a batch's by its frame's.)"""
    try:
        empty.join(values)
    except TypeError:
        return False
    return True


_unpack_body = functools.partial(msgpack.unpackb, raw=False, strict_map_key=False)
"""Decode a stored body as a puller decodes it (`Codec.decode_batch`); raises as msgpack does."""
_UNREADABLE = (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException)
"""What decoding damaged bytes raises (`unreadable`)."""


def unreadable(messages: Sequence[StoredMessage]) -> str | None:
    """Why a puller would refuse ``messages`` read back from a store (None if it would not):
    an id longer than `MAX_ID_CHARS`, a body that is not one msgpack object, headers that
    do not decode to headers within their limits. A batch carries its bodies as stored, so
    one such message makes a puller refuse the whole batch, and every message dealt in it,
    each time it is dealt. Costs a decoding of each body (about 0.3 us for a small one)."""
    if not messages:
        return None
    if max(len(m[ID]) for m in messages) > MAX_ID_CHARS:
        return f"an id of more than {MAX_ID_CHARS} characters"
    bodies = [m[BODY] for m in messages]
    try:
        deque(map(_unpack_body, bodies), 0)  # (a C call a body, no Python step: extra data or a cut one raises)
    except _UNREADABLE:
        for body in bodies:  # (which one; not one whose map keys are arrays, which a puller reads)
            try:
                _unpack_body(body)
            except TypeError as exc:
                if "unhashable" not in str(exc):
                    return f"a body that is no msgpack object: {exc}"
            except _UNREADABLE as exc:
                return f"a body that is no msgpack object: {exc}"
    for message in messages:
        if message[HEADERS] is not None:
            try:
                check_headers(msgpack.unpackb(message[HEADERS], raw=False))
            except _UNREADABLE as exc:
                return f"headers that are not headers: {exc}"
    return None
