"""A replaying subscription's place in one publisher's stream (`Cursor`): the number it
expects next per topic, the live frames it holds while it catches up (`HeldFrame`), and
the pieces of its publisher's numbers read so far; and the page reads it asks for
(`Fetch`). Plain state and the rules that look at it alone; `Replays` moves it."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from ..._mesh.registry import SubscribeOptions
from ..._store.messages import INTEGER_MAX
from ...message import Origin

__all__ = ["CURSOR_TOPICS", "MAP_MAX_NAME_CHARS", "MAP_MAX_TOPICS", "MAX_HELD", "MAX_HELD_BYTES", "Cursor", "Fetch",
           "HeldFrame", "Key", "NumbersTooMany", "storable"]

log = logging.getLogger("zmqmesh.replay")

MAX_HELD = 100_000
"""Live messages a catching-up cursor holds; past it, they are fetched from the history."""
MAX_HELD_BYTES = 64 << 20
"""Bytes of live frames a catching-up cursor holds; past them, as past `MAX_HELD`, they
are fetched from the history (100,000 messages of 1 MiB were 100 GiB)."""
CURSOR_TOPICS = 65_536
"""Topics a cursor follows before it asks its publisher which of them it still numbers (a
page of no rows) and forgets the others (`Replays._forget_topics`); it asks again once it
follows twice as many as it kept, if that is more. (A quiet publisher is asked anyway:
`QUIET_LOOK_S`.) So a cursor follows at most about twice what its publisher numbers, which
the publisher bounds (``MAX_EMPTY_TOPICS`` of the topics of which nothing is kept)."""
MAP_MAX_TOPICS = 1 << 20
"""Topics the pieces of a publisher's numbers (``next``: `Cursor.map_piece`) may name in
one read, 1,048,576: an honest publisher of 400,000 kept topics sends them in 21 pieces.
Past it, or past `MAP_MAX_NAME_CHARS`, the read is refused (`NumbersTooMany`): a peer that
sent pieces for ever grew a subscriber by about 100 MB a second, without end (1 GB in 10 s)."""
MAP_MAX_NAME_CHARS = 64 << 20
"""Characters of topic names the pieces of a publisher's numbers may hold in one read
(`MAP_MAX_TOPICS`): 64 Mi, 64 a topic of `MAP_MAX_TOPICS` (a topic has 200 bytes at most)."""

Key = tuple[str, Callable[..., Any]]
"""A subscription: its prefix and its handler."""


class Fetch(NamedTuple):
    """A page of history to fetch from ``node_id``, for the cursor ``(key, stream)``."""

    node_id: str
    key: Key
    stream: str
    request: dict[str, Any]


class HeldFrame(NamedTuple):
    """A live frame of a publisher, held while its cursor catches up (or waiting for its
    sender's HELLO)."""

    topic: str
    seq: int
    items: list[Any]
    origin: Origin | None
    sender_id: str | None
    meta: bytes | None  # its meta frame, read for ``"s"`` only when its number is not the one expected
    size: int = 0  # the bytes it came in (`MAX_HELD_BYTES`)
    read_since: bool = False  # held while a read of the history asked for after it came was made


class NumbersTooMany(ValueError):
    """The pieces of a publisher's numbers name more topics than a cursor takes in one read
    (`MAP_MAX_TOPICS`, `MAP_MAX_NAME_CHARS`): its history is not read again for that
    cursor while the same node publishes its stream (`Cursor.refused_by`)."""


class Cursor:
    """One replaying subscription's place in one publisher's stream."""

    __slots__ = ("stream", "node_id", "earlier", "kept", "options", "catching_up", "next", "pos", "held",
                 "held_count", "held_bytes", "held_topics", "live_pos", "left_to_live", "upto", "from_start", "kept_next",
                 "live_seen", "tail_looks", "away", "awaits_marker", "failures", "failing_since",
                 "reading", "run", "left_runs", "tidy_at", "tidying", "map_from", "map_part", "map_chars",
                 "refused_by", "since", "resumed")

    def __init__(self, stream: str, node_id: str, options: SubscribeOptions, from_start: bool,
                 since: float | None = None, resumed: bool = False) -> None:
        self.stream = stream
        self.node_id = node_id
        self.earlier: tuple[str, ...] = ()  # the nodes it followed before, the last few (`Replays._stream_left`)
        self.kept: tuple[str, ...] = ()  # the prefixes its node keeps, as it announced them last (`Replays.live`)
        self.options = options  # those of the subscription it was made for (a subscription made again is new)
        self.catching_up = False
        self.next: dict[str, int] = {}  # topic -> the number expected next
        self.pos = 0  # the history position replayed last
        self.held: deque[HeldFrame] | None = deque()  # None: too many held, refetch instead
        self.held_count = 0
        self.held_bytes = 0  # the bytes of the frames held (`MAX_HELD_BYTES`)
        self.held_topics: dict[str, list[HeldFrame]] = {}  # the frames held, by topic, in order
        # the lowest history position known to be past where the live stream began for this
        # catch-up: that of a frame held which said it (`hold`), or of the first row of the pages
        # read that holds a message held live (published after the subscription reached the
        # publisher: `Delivery.row`)
        self.live_pos: int | None = None
        self.left_to_live: int | None = None  # the position before the first row left to live frames (`leave_to_live`)
        self.awaits_marker = False  # its first read waits for its publisher's answer to the replay marker (`live_from`)
        self.upto: dict[str, int] = {}  # durable: numbers perhaps handled before a restart
        # a topic seen first mid-stream has missed its start (so every cursor, once it read
        # the history through: `Replays._read_through`)
        self.from_start = from_start
        self.kept_next: dict[str, int] = {}  # per topic, the next number the history had when last read
        self.live_seen = False  # a live message came: the subscription reaches the publisher
        self.tail_looks = 0  # the history read again since a catch-up (`TAIL_LOOKS_S`)
        self.away = False  # its publisher was found gone: once back, it is asked where it is
        self.failures = 0  # reads of its history failed in a row while the publisher was present
        self.failing_since: float | None = None  # when the first read of those failed
        self.reading: Fetch | None = None  # the read its catch-up waits on: a page of any other is stale
        self.run: str | None = None  # the publisher's run (store opening) followed last, if it names its runs
        self.left_runs: tuple[str, ...] = ()  # runs left at a rewind: a node still running one is stale
        self.tidy_at = CURSOR_TOPICS  # topics followed at which the publisher is asked which it still numbers
        self.tidying = False  # the look at the numbers read is for `tidy_at` (not to catch up: `_page_read`)
        self.map_from: str | None = None  # the topic from which the pieces of ``next`` being read go on
        self.map_part: dict[str, int] = {}  # the pieces of ``next`` read so far (`map_piece`)
        self.map_chars = 0  # the characters of the topic names in ``map_part`` (`MAP_MAX_NAME_CHARS`)
        # the node whose numbers came in more pieces than a read takes (`NumbersTooMany`): its
        # history is not read again (`history_refused`); a restarted publisher's is
        self.refused_by: str | None = None
        # a cursor that began mid-stream: the time (epoch seconds, read against its publisher's
        # timestamps) from which its reads go until it read the history through (`request`)
        self.since = since
        # a durable subscription's cursor resumed from its store (where it was, or where it began
        # mid-stream: `DurablePlaces.began`), not begun where the subscription was made (`live_from`)
        self.resumed = resumed

    def follow(self, node_id: str) -> None:
        """Follow the stream as the node ``node_id`` publishes it (a restarted publisher has
        a new id): the one followed until now is remembered, for its frames still coming."""
        if node_id != self.node_id:
            self.earlier = (*self.earlier[-3:], self.node_id)
            self.node_id = node_id

    def plan_tidy(self) -> None:
        """Ask the publisher which topics it still numbers once the cursor follows twice
        the topics it follows now, or `CURSOR_TOPICS` if that is more (`tidy_at`)."""
        self.tidy_at = max(CURSOR_TOPICS, 2 * len(self.next))

    def hold(self, frame: HeldFrame, position: int | None = None) -> None:
        """Hold a live frame while the cursor catches up; past `MAX_HELD` messages or
        `MAX_HELD_BYTES`, none is held any more (`held` None): the history has them.
        ``position``: where its publisher's history keeps it, if the frame says so (its
        meta frame's ``"p"``): every frame kept past it was sent after it, and comes live
        too (`live_pos`)."""
        held = self.held
        if held is None:
            return  # already too many: the history has them
        if position is not None and (self.live_pos is None or position < self.live_pos):
            self.live_pos = position
        held.append(frame)
        self.held_topics.setdefault(frame.topic, []).append(frame)
        self.held_count += len(frame.items)
        self.held_bytes += frame.size
        if self.held_count > MAX_HELD or self.held_bytes > MAX_HELD_BYTES:
            self.take_held(more=False)
            log.info("a replay of stream %s holds over %d live messages or %d MiB of them: they will come from "
                     "the history", self.stream[:8], MAX_HELD, MAX_HELD_BYTES >> 20)

    def live_from(self, position: int) -> None:
        """Its publisher answered the subscription's replay marker: ``position`` is the
        position its history gives the first frame it keeps after the answer, every such
        frame comes live after it, and every frame sent since the subscription reached the
        publisher came before it (held: `hold`). So a row from there on, of a topic of
        which no frame is held, comes live (`live_pos`); one before it, of a topic of which
        no frame is held, was published before the subscription reached the publisher.
        A cursor that begins where its subscription did (a durable subscription's first
        start with ``replay="new"``) reads from there on (`pos`), no longer from the time it
        was made (`since`): what its publisher kept before was published before it. (Not
        one `resumed`: it goes from where it began, before it was stopped.)"""
        if self.live_pos is None or position - 1 < self.live_pos:
            self.live_pos = position - 1
        if not self.from_start and not self.resumed and self.options.replay == "new":
            self.pos, self.since = max(self.pos, position - 1), None

    def request(self, prefix: str, numbers_only: bool = False) -> dict[str, Any]:
        """The request for a page of the history under ``prefix`` from the cursor's position
        (``next`` in pieces from the first topic: `map_piece`); ``numbers_only``, a look at
        the numbers alone (``"n": 0``). A cursor that began mid-stream reads from the time
        it began (`since`: ``replay`` in seconds, or the making of a durable subscription's
        first start with ``replay="new"`` until its marker is answered) until it read the
        history through (`from_start`), every read, not the first alone: a read after one
        that failed went from the start of the history, and delivered what was older. So
        does a durable subscription's cursor restarted before that, from the position and
        time it began at (`resumed` from `DurablePlaces.began`)."""
        request: dict[str, Any] = {"p": prefix, "a": self.pos, "t": ""}
        if numbers_only:
            request["n"] = 0  # (a publisher before this field sends a whole page: read as such)
        if self.since is not None and not self.from_start:
            request["s"] = self.since
        return request

    def met_at(self, topic: str, number: int) -> int:
        """The number from which a cursor that began mid-stream (not `from_start`) follows
        ``topic``, which it has no number for, met at ``number`` (its first row of a read,
        or the number the read found it at): there, or at its first live frame held, if
        that is before (it came live: published after the subscription reached the
        publisher, if before the first row the read took, by the time its reads go from:
        `since`, `live_from`)."""
        held = self.held_topics.get(topic)
        return min(number, held[0].seq) if held else number

    def take_held(self, more: bool = True) -> deque[HeldFrame] | None:
        """The live frames held (None: more came than could be), and hold afresh from none;
        ``more`` False: hold none any more (the history has them)."""
        held = self.held
        self.held, self.held_count, self.held_bytes = deque() if more else None, 0, 0
        self.held_topics, self.live_pos = {}, None
        return held

    def leave_to_live(self, pos: int) -> None:
        """Leave the row at history position ``pos`` to the live frames, which are coming
        with it: once the catch-up ends, the cursor's position goes back to before it, so
        that a later catch-up reads it again in case they never came."""
        self.left_to_live = pos - 1 if self.left_to_live is None else min(self.left_to_live, pos - 1)

    def forget_map(self) -> None:
        """Let go of the pieces of ``next`` read so far (`map_piece`)."""
        self.map_from, self.map_part, self.map_chars = None, {}, 0

    def history_refused(self) -> bool:
        """Whether the history of the node followed now is not to be read (its numbers came in
        more pieces than a read takes: `NumbersTooMany`); what comes live is delivered, a gap
        reported at once."""
        return self.refused_by is not None and self.refused_by == self.node_id

    def map_piece(self, request: dict[str, Any], page: Any) -> dict[str, Any] | None:
        """The numbers the publisher's topics reached (``next``), once whole, from the page
        read for ``request``: a publisher that has many sends them in pieces, in topic
        order, each but the last with ``"next_from"``, the topic the next piece begins at;
        the cursor collects them (`map_part`) and asks for the rest (`rest_of_map`), with
        the rows kept since (a page of them with ``more`` has no piece). None while more
        follow. A publisher before pieces sends ``next`` whole. The pieces are let go by
        `forget_map`, once the page is taken whole. Raises `TypeError`, `ValueError` for a
        malformed piece (one that does not go on past where it was asked from), and
        `NumbersTooMany` once the pieces name more than `MAP_MAX_TOPICS` topics or
        `MAP_MAX_NAME_CHARS` characters of them (the node is then `refused_by`)."""
        piece = page.get("next") or {}
        if type(piece) is not dict:
            raise TypeError(f"next of type {type(piece).__name__}")
        if not all(storable(n) for n in piece.values()):
            raise ValueError("a number of next that no store gives")
        rest = page.get("next_from")
        if rest is None and bool(page["more"]) and self.map_from is not None:
            return None  # (rows kept since the last piece, more of them: the piece comes after them)
        if rest is None:
            if not self.map_part:
                return piece
            self._count_piece(piece)
            return {**self.map_part, **piece}
        asked = request.get("t")
        if type(rest) is not str or type(asked) is not str or rest <= asked or bool(page["more"]):
            raise ValueError(f"a piece of next that goes on from {rest!r}, asked from {asked!r}")
        self._count_piece(piece)
        self.map_part.update(piece)
        self.map_from = rest
        return None

    def _count_piece(self, piece: dict[str, Any]) -> None:
        """Count ``piece`` against the bounds of a read's pieces, before it joins them; past
        them, refuse the node's history (`refused_by`) and raise `NumbersTooMany`."""
        topics = len(self.map_part) + len(piece)
        self.map_chars += sum(map(len, piece))
        if topics > MAP_MAX_TOPICS or self.map_chars > MAP_MAX_NAME_CHARS:
            self.refused_by = self.node_id
            raise NumbersTooMany(f"its numbers came in pieces naming over {MAP_MAX_TOPICS:,} topics or "
                                 f"{MAP_MAX_NAME_CHARS >> 20} Mi characters of names ({topics:,} topics, "
                                 f"{self.map_chars:,} characters so far)")

    def rest_of_map(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request for the next piece of ``next`` after the page read for ``request``. A
        look at the numbers alone (``"n": 0``) goes on as one: if pieces read later are
        further than the cursor, it reads what followed (`behind`). Otherwise the rows
        kept since are read with the piece, in one hold of the store, so that no piece is
        further than the rows the cursor has (a later live frame would take what lies
        between for missed); ``"s"`` stays, as no row may have come yet."""
        rest = {key: value for key, value in request.items() if key in ("p", "n", "s")}
        rest["a"], rest["t"] = self.pos, self.map_from
        return rest

    def ahead(self, reached: dict[str, Any]) -> dict[str, int]:
        """The topics in which the cursor expects a number its publisher has not reached
        (``reached``: the number of its next message in each topic, as a page says, read
        after what the cursor delivered): ``{topic: reached}``. A publisher commits each
        message to its history before it sends it, so no cursor can be past it, but for a
        place recorded that was damaged (a huge number), or a publisher whose numbering
        went back under a run the cursor followed (its kept topics emptied by hand, or its
        store put back from a copy taken while it ran): everything it numbers from there up
        to where the cursor is would be skipped."""
        ahead: dict[str, int] = {}
        for topic, expected in self.next.items():
            nxt = reached.get(topic)
            if type(nxt) is int and nxt < expected:
                ahead[topic] = nxt
        return ahead

    def behind(self, reached: dict[str, Any]) -> bool:
        """Whether the publisher's topics reached further than the cursor delivered (a topic
        it never saw counts only if the cursor follows its topics from their start)."""
        for topic, upto in reached.items():
            expected = self.next.get(topic)
            if expected is None and not self.from_start:
                continue
            if isinstance(upto, int) and upto > (expected or 0):
                return True
        return False


def storable(value: Any) -> bool:
    """Whether ``value`` is a position or number a store holds (an int from 0 to 2**63 - 1).
    No publisher gives one past it: in a peer's page or frame it is a lie, and taken as a
    durable subscription's place it made every record of its places fail, those of other
    streams with it."""
    return type(value) is int and 0 <= value <= INTEGER_MAX
