"""Handing a replaying subscription's messages to its handler (`Delivery`): a live frame
or a page's row at the number its cursor expects, in order, what was missed just before
counted and reported on the message (``msg.gap``), what may have been handled before a
restart marked ``redelivered``, and, for a durable subscription, each number handed out
recorded as pending until handled (`DurablePlaces`)."""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
from typing import Any

from ..._mesh.directory import Directory
from ..._mesh.registry import SubscribeOptions
from ..._stats import Stats
from ..._wire.codec import Codec
from ..._wire.frames import parse_meta
from ...errors import DecodeError
from ...message import Message, Origin
from ..calls import Call, CursorMark
from .cursor import Cursor, Key, storable
from .places import DurablePlaces

__all__ = ["Delivery"]

log = logging.getLogger("zmqmesh.replay")

_seq_of = operator.attrgetter("seq")


class Delivery:
    """Hands the messages of the cursors of one node to their subscriptions' handlers (the
    inbox's thread only): appends a `Call` per message to the burst being gathered."""

    def __init__(self, codec: Codec, stats: Stats, directory: Directory, places: DurablePlaces | None) -> None:
        self.codec = codec
        self.stats = stats
        self.directory = directory
        self.places = places

    def row(self, key: Key, options: SubscribeOptions, cursor: Cursor, row: list[Any], calls: list[Call]) -> None:
        """Deliver a page's ``row`` (``[pos, topic, seq, count, ts, payload, meta]``) of
        the subscription ``key``: the messages of it the cursor has not had, the held live
        frames of its topic that come before it first (`_fill_from_held`); a row of another
        prefix is passed over. A row past the number expected, of a topic of which no live
        frame is held, published after a message that came live (`Cursor.live_pos`: a
        held frame that said its position, or a row holding a message held), is left to
        the live frames: it comes live too, as do those of its topic before it that the
        history dropped (they were in the socket while the page was read: taken for
        missed, they were counted so, and dropped as delivered once they came). Raises
        `ValueError` for a row numbered past what a store gives, `DecodeError` for a
        payload that is no batch (the page is malformed)."""
        pos, topic, seq, count, ts, payload, meta = row
        if not isinstance(topic, str) or not topic.startswith(key[0]):
            return
        if not (storable(pos) and storable(seq) and type(count) is int):
            raise ValueError(f"a row at position {pos!r} numbered {seq!r} ({count!r} messages), which no store gives")
        cursor.pos = max(cursor.pos, pos)
        expected = cursor.next.get(topic)
        if expected is None:
            expected = 0 if cursor.from_start else cursor.met_at(topic, seq)
        held = cursor.held_topics.get(topic)
        if held and seq + count > held[0].seq and (cursor.live_pos is None or pos < cursor.live_pos):
            cursor.live_pos = pos  # (it holds a message that came live)
        if seq + count <= expected:
            return  # replayed already
        if expected < seq and held:
            expected = self._fill_from_held(key, options, cursor, topic, seq, pos, expected, calls)
            if expected < 0:
                return  # (left to the live frames)
            if seq + count <= expected:
                return
        elif expected < seq and cursor.live_pos is not None and pos > cursor.live_pos:
            cursor.leave_to_live(pos)
            return
        items = self.codec.decode_batch(payload)
        if not storable(seq + len(items)):
            raise ValueError(f"a row of {len(items)} messages numbered from {seq!r}, which no store gives")
        headers = None
        if meta:
            try:  # (checked as a live frame's: what a peer's history holds is a stranger's word)
                headers = parse_meta(self.codec.decode(meta), len(items))[0]
            except DecodeError:
                self.stats.reject("pubsub_malformed")  # the messages still go, without their headers
        origin = Origin(f"{cursor.stream}/{topic}/", seq, float(ts), headers)
        missed = max(0, seq - expected)
        counters = self.stats.pattern["pubsub"]  # (written by the inbox's thread only)
        counters["replayed"] = counters.get("replayed", 0) + len(items)
        self.frame(key, options, cursor, topic, seq, items, origin, cursor.node_id, missed, int(pos), calls)

    def _fill_from_held(self, key: Key, options: SubscribeOptions, cursor: Cursor, topic: str, seq: int, pos: int,
                        expected: int, calls: list[Call]) -> int:
        """A page's row of ``topic`` numbered from ``seq``, past the number the cursor
        expects: the history dropped what lies between since (it keeps a few), but what of
        it came live is held. Those held frames go first (their messages delivered now,
        each the same message as from the history; let go later, they are taken as
        delivered), a number missing before one of them counted missed. If the frames held
        end before ``seq``, those after them were sent live after them and are coming (still
        in the socket: the page came first); the row is left to them (-1), and the
        position before it is read again by a later catch-up (`left_to_live`), in case they
        never came. Otherwise the number now expected (``expected``: before them)."""
        frames = cursor.held_topics[topic]  # (in the order they came: by number)
        last = frames[-1]
        if last.seq + len(last.items) > expected:  # (some not delivered yet: from the one holding the number expected)
            for frame in itertools.islice(frames, max(0, bisect.bisect_right(frames, expected, key=_seq_of) - 1), None):
                if frame.seq >= seq:
                    break
                if frame.seq + len(frame.items) <= expected:
                    continue
                self.frame(key, options, cursor, topic, frame.seq, frame.items, frame.origin, frame.sender_id,
                           max(0, frame.seq - expected), None, calls)
                expected = cursor.next.get(topic, expected)
        if last.seq + len(last.items) < seq:
            cursor.leave_to_live(pos)
            return -1
        return expected

    def frame(self, key: Key, options: SubscribeOptions, cursor: Cursor, topic: str, seq: int, items: list[Any],
                 origin: Origin | None, sender_id: str | None, missed: int, pos: int | None, calls: list[Call]) -> None:
        """Hand the messages of a frame numbered from ``seq`` that the cursor expects to the
        subscription's handler; ``missed`` were lost just before them."""
        expected = cursor.next.get(topic, seq)
        skip = max(0, expected - seq) if missed == 0 else 0
        if missed:
            self.stats.add("pubsub", "gap", missed)
            log.warning("stream %s, topic %r: %d message(s) missed (not to be had from the history)",
                        cursor.stream[:8], topic, missed)
        stem = f"{cursor.stream}/{topic}/"  # named by the stream, live or replayed: the same id either way
        if origin is None or origin.stem != stem or origin.first != seq:
            origin = Origin(stem, seq, origin.timestamp if origin else None, origin.headers if origin else None)
        name = options.durable_name
        pending = None
        if name is not None and self.places is not None and skip < len(items):
            pending = self.places.pending(name, cursor.stream, topic)
        upto = cursor.upto.get(topic, -1)
        lookup = self.directory.lookup_peer
        for index in range(skip, len(items)):
            number = seq + index
            msg = Message("pubsub", topic, items[index], sender_id, lookup, origin, index)
            if missed:
                msg.gap, missed = missed, 0
            if number <= upto:
                msg.redelivered = True  # perhaps handled before a crash
            mark = None
            if pending is not None:
                # the history position to resume from once this message is handled: its row's
                # (the one before, while the row has more after it); a live message, the last replayed
                at = cursor.pos if pos is None else (pos if index == len(items) - 1 else pos - 1)
                mark = CursorMark(name, cursor.stream, topic, number, at)  # type: ignore[arg-type]
                pending.append(number)
            calls.append(Call(key[1], msg, mark, "pubsub"))
        if skip >= len(items):
            return  # all had been delivered
        cursor.next[topic] = seq + len(items)
        if upto >= 0 and seq + len(items) > upto:
            cursor.upto.pop(topic, None)
