"""Segments: how the store packs the messages one commit stores for one queue into one
row, and reads them back, checked, as a puller would need them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import msgpack

from .messages import Entries, StoredMessage, joins

__all__ = ["SEGMENT_MAX", "SEGMENT_BYTES", "COUNT_SQL", "COLUMNS", "StoredSegment", "stored", "attempted", "cut", "columns",
           "sane_count", "sane_attempts", "stored_size", "span"]

SEGMENT_MAX = 1024
"""Messages in one stored segment at most: a larger call is stored as several."""
SEGMENT_BYTES = 1 << 20
"""A segment also closes once its payloads and headers pass this many bytes (a larger
message is a segment of its own): reading one back whole stays bounded."""
COUNT_SQL = f"(CASE WHEN typeof(count) = 'integer' THEN min(max(count, 1), {SEGMENT_MAX}) ELSE 1 END)"
"""A segment's stored count as the store reckons with it: a healthy segment holds 1 to
`SEGMENT_MAX` messages, and a damaged one's count may be anything (text, a fraction: 1)."""


COLUMNS = 1
"""The first item of a segment stored as columns (`stored`); a segment of rows begins with
its first row, an array."""


def stored(part: Entries) -> bytes:
    """What a segment keeps of the messages ``part``, packed (attempts apart). The messages
    of one call (one timestamp, one headers, none marked redelivered: most segments) as
    columns, the msgpack array ``[COLUMNS, ids, timestamp, headers, bodies]`` (schema 8:
    no row nor timestamp a message to pack, or to unpack and take apart again when read
    back); others as rows, the array of their ``[id, timestamp, headers, body]``, with
    ``True`` after them for one marked redelivered."""
    n, stamp, head = len(part), part.stamps[0], part.headers[0]
    if not any(part.marked) and part.stamps.count(stamp) == n and part.headers.count(head) == n:
        columns: bytes = msgpack.packb((COLUMNS, part.ids, stamp, head, part.bodies))
        return columns
    rows: Iterator[tuple[Any, ...]] = zip(part.ids, part.stamps, part.headers, part.bodies)
    if any(part.marked):  # (rare: what a keeper was handed marked)
        rows = ((*row, True) if mark else row for row, mark in zip(rows, part.marked))
    packed: bytes = msgpack.packb(list(rows))
    return packed


def attempted(first: int, part: Entries) -> list[tuple[int, int]]:
    """``(sequence number, failed deliveries)`` of the messages of ``part`` that have any
    counted, numbered on from ``first`` (as `Store.append` numbers a segment's messages)."""
    if not any(part.attempts):  # (the common case, without a Python step per message)
        return []
    return [(first + i, n) for i, n in enumerate(part.attempts) if n]


def cut(entries: Entries) -> Iterator[Entries]:
    """``entries`` cut into the segments `Store.append` stores, in order."""
    n = len(entries)
    # (one message, or small ones: cut by count alone; a single push need not be summed)
    if n == 1 or sum(map(len, entries.bodies)) + sum(map(len, filter(None, entries.headers))) <= SEGMENT_BYTES:
        if 0 < n <= SEGMENT_MAX:  # (none: no segment, as `range` below makes none)
            yield entries
            return
        for start in range(0, n, SEGMENT_MAX):
            yield entries.part(start, start + SEGMENT_MAX)
        return
    start = size = 0
    for i, (body, headers) in enumerate(zip(entries.bodies, entries.headers)):
        grown = size + len(body) + len(headers or b"")
        if i > start and (i - start >= SEGMENT_MAX or grown > SEGMENT_BYTES):
            yield entries.part(start, i)
            start, grown = i, grown - size
        size = grown
    yield entries.part(start, n)


_STAMP_TYPES = {float, int}
_HEADER_TYPES = {bytes, type(None)}


def columns(unpacked: Any, count: int) -> tuple[Sequence[Any], ...]:
    """The messages of a segment stored with ``count`` of them, as msgpack unpacked its
    bytes (`stored`, its arrays as tuples): their ids, timestamps, headers, bodies, and
    whether each is marked redelivered. Raises `ValueError` (or `TypeError`, `IndexError`
    for bytes `stored` never packs) unless it holds ``count`` messages, each with the
    types a durable message needs (a damaged segment must not reach the wire)."""
    if count < 1:
        raise ValueError("a segment of no message")
    if type(unpacked[0]) is not tuple:  # (not a row: stored as columns, or damaged)
        tag, ids, stamp, head, bodies = unpacked
        if tag != COLUMNS or type(ids) is not tuple or type(bodies) is not tuple or len(ids) != count \
                or len(bodies) != count:
            raise ValueError(f"no columns of {count} messages")
        if not (joins("", ids) and joins(b"", bodies) and type(stamp) in _STAMP_TYPES
                and (head is None or type(head) is bytes)):
            raise ValueError(f"columns of the wrong types: {type(stamp).__name__}, {type(head).__name__}")
        return ids, (stamp,) * count, (head,) * count, bodies, (False,) * count
    if len(unpacked) != count:
        raise ValueError(f"{len(unpacked)} messages where {count} were stored")
    if set(map(len, unpacked)) == {4}:  # (nothing marked redelivered: no Python step per message)
        ids, stamps, headers, bodies = zip(*unpacked)
        if joins("", ids) and joins(b"", bodies) and set(map(type, stamps)) <= _STAMP_TYPES \
                and (headers.count(None) == len(headers) or set(map(type, headers)) <= _HEADER_TYPES):
            return ids, stamps, headers, bodies, (False,) * count
    _check_entries(unpacked)  # (raises, or finds some marked)
    ids, stamps, headers, bodies = zip(*(e[:4] for e in unpacked))
    return ids, stamps, headers, bodies, [len(e) == 5 for e in unpacked]


def _check_entries(entries: Sequence[tuple[Any, ...]]) -> None:
    """Raises `ValueError` unless every stored ``(id, timestamp, headers, body)`` (with
    ``True`` after it if marked redelivered) has the types a durable message needs (a
    damaged segment must not reach the wire)."""
    for entry in entries:
        if len(entry) == 4:
            msg_id, ts, headers, body = entry
        elif len(entry) == 5 and entry[4] is True:
            msg_id, ts, headers, body, _marked = entry
        else:
            raise ValueError(f"an entry of {len(entry)} fields")
        if type(msg_id) is not str or type(body) is not bytes or (headers is not None and type(headers) is not bytes) \
                or type(ts) not in (float, int):
            raise ValueError(f"an entry of the wrong types: {type(msg_id).__name__}, {type(ts).__name__}, "
                             f"{type(headers).__name__}, {type(body).__name__}")


class StoredSegment(NamedTuple):
    """A segment read back from the store: its numbers and its messages not yet settled."""

    first: int
    size: int
    """How many messages it was stored with (numbered ``first`` .. ``first + size - 1``).
    A damaged segment's stored count may be wrong: its size is then 1 to `SEGMENT_MAX`,
    and never reaches the queue's next segment nor the next number to be given."""
    messages: list[StoredMessage]
    damaged: str | None = None
    """Why its messages cannot be read (then none are given); the segment stays stored."""
    wire_sizes: list[int] | None = None
    """The lengths of its messages' wire forms, when each has one (`stored_messages`)."""


def sane_count(count: object) -> int:
    """A stored count as the store reckons with it (see `COUNT_SQL`; a damaged one that is
    no whole number, as 1)."""
    return min(max(count, 1), SEGMENT_MAX) if type(count) is int else 1


def sane_attempts(n: object) -> int:
    """A stored count of failed deliveries as the store hands it out: a damaged one that is
    no whole number, or is below 0, as 0 (a puller refuses a batch with such a count in it,
    and every message dealt with it)."""
    return n if type(n) is int and n >= 0 else 0


def stored_size(items: object) -> int:
    """The bytes of a segment's stored ``items`` (a damaged one that is no blob: its text's,
    or 0), as a read's byte budget counts them."""
    return len(items) if isinstance(items, (bytes, str)) else 0


def span(first: int, count: int, before: int) -> int:
    """How many numbers the segment at ``first`` stored with ``count`` may hold: its count
    as the store reckons with it, short of ``before`` (its queue's next segment, or the
    next number to be given), since a damaged segment's count may be anything."""
    return min(sane_count(count), before - first)
