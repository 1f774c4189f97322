"""`Replays`: the replaying subscriptions of one node, following each publisher that keeps
its topics with a `Cursor` per stream: live frames taken in order or held while the cursor
catches up, pages of history read and delivered, gaps filled or reported, and the
histories read again when a stream is quiet, behind, or its read failed (the package's
docstring tells the whole story)."""

from __future__ import annotations

import logging
import operator
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._mesh.directory import Directory
from ..._mesh.registry import Registry, SubscribeOptions
from ..._stats import LogThrottle, Stats
from ..._wire.codec import Codec
from ..._wire.frames import MARKER_PROTOCOL
from ...errors import PeerLostError
from ...message import Message, Origin
from ..calls import Call, CursorMark
from . import places as places_module
from .awaiting import AwaitingHello
from .cursor import Cursor, Fetch, HeldFrame, Key, NumbersTooMany, storable
from .delivery import Delivery
from .places import DurablePlaces
from .plain import PlainlyDelivered
from .rereads import Rereads

if TYPE_CHECKING:
    from ..._store.store import Store

__all__ = ["AWAY_HOLD_S", "FETCH_RETRIES_S", "MARKER_WAIT_S", "PAGE_BURST", "QUIET_LOOK_S", "TAIL_LOOKS_S", "UNKEPT_LOG_S", "Replays"]

log = logging.getLogger("zmqmesh.replay")

QUIET_LOOK_S = 2.0
"""After a publisher's live frame, if no other frame of it came for this long, the
subscription asks it for the numbers its topics reached (a page of no rows, ``"n": 0``)
and catches up if it is behind: a frame dropped at a high-water mark is otherwise seen
missing only with the next one, which a publisher that fell silent never sends. (One
small request per quiet spell and stream; none while frames keep coming.)"""
TAIL_LOOKS_S = (0.5, 1.0, 2.0, 4.0)
"""After a catch-up during which no live message of its publisher came, the history is
read again, this long after each read, until one comes: the live subscription may not
have reached the publisher yet when the history was read, and what it published in
between arrives neither way; with more to come, the numbers of the next live message
show the gap, but a publisher that goes quiet right then sends no next message."""
FETCH_RETRIES_S = (0.5, 1.0, 2.0)
"""A read of a history that fails while its publisher is present (a timeout on a busy
host) is tried again after each of these delays, the live frames held meanwhile; once
they are spent, the held frames go and what is still missing is reported (``msg.gap``)."""
AWAY_HOLD_S = 30.0
"""A publisher that leaves while a subscription reads its history (stopped, restarted,
or silent long enough to be taken for gone): the subscription holds what came live
from it, and reads on from where it was as soon as the stream is back (under the same
node id or a new one); past this long, the held frames go and the gap is reported. A
publisher that leaves and comes back meanwhile is asked where its topics are, so that
what it published last, if dropped on the way, is read from its history."""
MARKER_WAIT_S = 2.0
"""A new cursor's first read of a publisher that answers replay markers (protocol 6) waits
for the answer to its subscription's marker (`Replays.marked`), the live frames held
meanwhile, at most this long; past it, the read goes without it, as for a publisher
before markers (logged)."""
_AWAY_LOOK_S = 0.5  # how often a subscription looks whether a departed publisher is back
_MAX_CURSORS = 65_536
MAX_CURSORS_GONE = 1_024
"""Cursors kept of streams whose publisher is not present (`Replays._forget_gone`): past
them, those of the streams whose publisher was found gone first are forgotten, counted
(``rejected["replay_streams_forgotten"]``). Kept up to `_MAX_CURSORS`, each publisher run
on a fresh store (a worker with a temporary store directory) left its cursors (~2 kB each)
for good: 3,000 short-lived publishers, 3,000 cursors."""
UNKEPT_LOG_S = 10.0
"""Live frames a publisher's history never reached (`Replays._unkept`) are logged at most
this often."""
_LEFT_RUNS = 16  # runs a cursor remembers having left at a rewind
_MAX_LEFT = 1024  # publishers gone whose streams are remembered (`Replays._stream_left`)
PAGE_BURST = 256
"""Messages of the pages read delivered at a time (`Replays.deliver_pages`), the driver
handling them before it asks for more: a page of small messages holds tens of thousands,
and as many calls alive at once made the interpreter's garbage collector scan them over
and over."""

_seq_of = operator.attrgetter("seq")


def _overlaps(prefix: str, kept: tuple[str, ...]) -> bool:
    """Whether a subscription to ``prefix`` takes a topic under one of the ``kept`` prefixes."""
    return any(p.startswith(prefix) or prefix.startswith(p) for p in kept)


class Replays:
    """The replaying subscriptions of one node (the inbox's thread only).

    ``fetch`` hands a `Fetch` to the driver, which later calls `on_page` with the reply
    (or the error) on this thread.
    """

    def __init__(self, *, registry: Registry, directory: Directory, codec: Codec, stats: Stats,
                 store: Store | None, fetch: Callable[[Fetch], None]) -> None:
        self.registry = registry
        self.directory = directory
        self.codec = codec
        self.stats = stats
        self.fetch = fetch
        self.cursors: dict[tuple[Key, str], Cursor] = {}
        # the cursors whose stream's publisher was not present at a `sync`, those found so first first
        self._gone: dict[tuple[Key, str], None] = {}
        self.places = DurablePlaces(store, stats) if store is not None else None
        """Where the durable subscriptions are (None without a store: none is made then)."""
        self.delivery = Delivery(codec, stats, directory, self.places)
        """Hands the cursors' messages to the handlers."""
        self.awaiting = AwaitingHello()
        """The frames of senders whose HELLO is still on its way (`live`)."""
        self.rereads = Rereads()
        """The reads of histories planned for later (`look_again`)."""
        self._unkept_log = LogThrottle(UNKEPT_LOG_S)  # (`_unkept`)
        self._streams_full_log = LogThrottle(UNKEPT_LOG_S)  # (`_cursor`: a durable name past its streams)
        self.plain = PlainlyDelivered(stats)
        """What went plainly of streams no cursor could follow, marked redelivered once one does."""
        # sender id of a publisher no longer a peer -> (the directory's epoch, its stream or ""): `_stream_left`
        self._left: dict[str, tuple[int, str]] = {}
        # pages whose rows are being delivered (`deliver_pages`): [fetch, page, rows, more, next row]
        # (one read at a time per cursor: bounded as the cursors are, with the pages of cursors
        # forgotten meanwhile, left once they reach the front)
        self._paging: deque[list[Any]] = deque()
        self._replays_seen: dict[Key, SubscribeOptions] | None = None  # the table `forget_dropped` last saw
        # (subscription, publisher id) -> (its options, the position it answered the marker with), for
        # a cursor not made yet (`marked`): of publishers whose HELLO has not come yet (`sync` lets
        # go of the others); bounded as the cursors are
        self._marks: dict[tuple[Key, str], tuple[SubscribeOptions, int]] = {}

    # -- which subscriptions ----------------------------------------------------------------

    def waiting(self) -> bool:
        """Whether frames wait for their sender (see `live`), or a history is to be read
        again (`TAIL_LOOKS_S`, `QUIET_LOOK_S`, `FETCH_RETRIES_S`): the driver then calls
        `look_again` now and then."""
        return bool(self.awaiting or self.rereads)

    def look_again(self, calls: list[Call]) -> None:
        """Take the frames that waited long enough for their sender (`release_unknown`),
        read again the histories due (`TAIL_LOOKS_S`, `QUIET_LOOK_S`), unless their
        publisher left (then it is asked once it is back: `sync`), and try again the reads
        that failed (`FETCH_RETRIES_S`, `AWAY_HOLD_S`)."""
        if self.awaiting:
            self.release_unknown(calls)
        now = time.monotonic()
        for place, numbers_only in self.rereads.looks_due(now):
            cursor = self.cursors.get(place)
            if cursor is None or not self._still_made(place[0], cursor):
                continue
            if self._publisher(cursor) is None:
                cursor.away = True
                continue
            if cursor.history_refused():
                continue
            if not numbers_only:
                cursor.tail_looks += 1
            self._catch_up(place[0], cursor, numbers_only=numbers_only)
        for place, fetch in self.rereads.retries_due(now):
            cursor = self._waiting_on(fetch)
            if cursor is None or not self._still_made(place[0], cursor):
                continue
            node_id = self._publisher(cursor)
            if node_id is None:  # still away
                self.on_page(fetch, None, PeerLostError("the publisher is away", fetch.node_id), calls)
            else:
                self._read(cursor, Fetch(node_id, fetch.key, fetch.stream, fetch.request))

    def _publisher(self, cursor: Cursor) -> str | None:
        """The id of the node publishing the cursor's stream now (a restarted publisher
        has a new one: the cursor follows it), or None while none is present."""
        alive = self.directory.alive_ids
        if cursor.node_id in alive:
            return cursor.node_id
        for node_id, (stream, _prefixes) in self.directory.streams.items():
            if stream == cursor.stream and node_id in alive:
                cursor.follow(node_id)
                return node_id
        return None

    def sync(self, calls: list[Call]) -> None:
        """Follow every publisher that keeps topics a replaying subscription wants (after
        a subscription or a peer came): a new cursor starts catching up at once; one whose
        publisher was found gone and is back asks it where its topics are (`QUIET_LOOK_S`)."""
        for key, options in list(self.registry.replays.items()):
            for node_id, (stream, prefixes) in list(self.directory.streams.items()):
                if _overlaps(key[0], prefixes):
                    cursor = self._cursor(key, options, stream, node_id, calls)
                    if cursor is not None:
                        self._check_run(key, cursor, node_id, calls)
                    if cursor is not None and cursor.away:  # (the streams are those of present peers)
                        cursor.away = False
                        cursor.follow(node_id)
                        if not cursor.catching_up:
                            self.rereads.look_at((key, stream), 0.0, True)
                    if cursor is not None and cursor.node_id == node_id:
                        cursor.kept = prefixes
        if self._marks:  # (those of publishers now known: their cursors took theirs, if any is ever made)
            streams = self.directory.streams
            self._marks = {place: mark for place, mark in self._marks.items() if place[1] not in streams}
        self._forget_gone()

    def _forget_gone(self) -> None:
        """Keep the cursors of at most `MAX_CURSORS_GONE` streams whose publisher is not
        present: past them, forget those whose publisher was found gone first (and that are
        not catching up: the live frames they hold wait for their read), counted
        (``rejected["replay_streams_forgotten"]``). A publisher of a forgotten stream that
        comes back on its store is followed afresh, as its ``replay`` says (a durable
        subscription resumes from the place stored)."""
        present, gone = self._present_streams(), self._gone
        for place in self.cursors:
            if place[1] in present:
                gone.pop(place, None)
            elif place not in gone:
                gone[place] = None
        excess = len(gone) - MAX_CURSORS_GONE
        if excess <= 0:
            return
        doomed = [place for place in gone if not self.cursors[place].catching_up][:excess]
        for place in doomed:
            self._forget(place)
        if doomed:
            self.stats.reject("replay_streams_forgotten", len(doomed))

    # -- a publisher's numbering going back ----------------------------------------------------

    def _check_run(self, key: Key, cursor: Cursor, node_id: str, calls: list[Call]) -> None:
        """Whether the numbering the cursor follows went back: its publisher (``node_id``)
        names its store's runs (``X-ZMQMESH-RUNS``, newest first: those of its last
        ``RUNS_KEPT`` openings, then older ones that numbered messages); one that lacks the
        run the cursor followed last opened a store restored from an older copy, which
        numbers anew messages the cursor may have taken already: `_rewind`. (Or, falsely,
        it was opened more than ``RUNS_KEPT`` times meanwhile, and the run followed
        numbered nothing or ``RUNS_KEPT`` later runs numbered some: then the history is
        read again for nothing.) A publisher that names none is taken on trust."""
        runs = self.directory.runs.get(node_id)
        if not runs or cursor.run == runs[0] or runs[0] in cursor.left_runs:
            return  # (the last: a node of a run left, still taken for present)
        if self._superseded(cursor, node_id):
            return  # (a node of an older run, killed and still taken for present: `_superseded`)
        if cursor.run is None or cursor.run in runs:
            self._follow_run(cursor, runs[0])
            return
        self._rewind(key, cursor, node_id, runs[0], calls)

    def _follow_run(self, cursor: Cursor, run: str) -> None:
        """The cursor follows its publisher's ``run``; a durable subscription records it
        (`DurablePlaces.follow_run`): a stream recorded is resumed, not begun again as
        ``replay`` says (`DurablePlaces.known`), and a publisher found restored from an
        older copy then (`_check_run`). One that began mid-stream records where it began
        too (`_record_began`), in the same transaction: resumed before it read the history
        through, it goes on from there, not from the start of the history. (Before, its run
        was recorded only once it had read the history through: restarted before, it had
        none to miss from a publisher put back from a copy.)"""
        cursor.run = run
        name = cursor.options.durable_name
        if name is not None and self.places is not None:
            self.places.follow_run(name, cursor.stream, run)

    def _record_began(self, cursor: Cursor) -> None:
        """A durable subscription's cursor that began mid-stream here (a first start with
        ``replay="new"`` or in seconds: not `Cursor.from_start`, not `Cursor.resumed`)
        records where its reads go from (`Cursor.pos`, `Cursor.since`), written at once
        (`DurablePlaces.began_mid_stream`): until a read goes through (`_read_through`),
        a restart resumes mid-stream from there in every topic it has no place in. (Before,
        restarted after a first read that failed, it read the history of those topics from
        their start, or from where it began with what came before counted in ``msg.gap``.)"""
        name = cursor.options.durable_name
        if name is None or self.places is None or cursor.from_start or cursor.resumed:
            return
        self.places.began_mid_stream(name, cursor.stream, cursor.pos, cursor.since)
        self.flush()

    def _rewind(self, key: Key, cursor: Cursor, node_id: str, run: str, calls: list[Call]) -> None:
        """The publisher of ``cursor``'s stream (``node_id``) now runs ``run`` on a store that never saw
        the run the cursor followed: its numbers may have gone back. The cursor reads the
        whole history again, what it holds marked ``redelivered`` up to the numbers it had
        reached (they may have been handled under the numbers given before); held live
        frames go (the history has those of the new run). Logged and counted
        (``stats()["pubsub"]["rewound"]``); a durable subscription records it at once."""
        held = cursor.held_count if cursor.held is not None else 0
        self.stats.add("pubsub", "rewound")
        log.warning("stream %s: its publisher's store does not know the run followed until now (restored from an "
                    "older copy?); its numbers may have gone back: reading its history again, messages up to the "
                    "numbers reached marked redelivered%s", cursor.stream[:8],
                    f" ({held} live message(s) held dropped: the history has them)" if held else "")
        for topic, nxt in cursor.next.items():
            cursor.upto[topic] = max(cursor.upto.get(topic, -1), nxt - 1)
        cursor.next.clear()
        cursor.kept_next.clear()
        cursor.pos, cursor.from_start, cursor.left_to_live = 0, True, None
        cursor.take_held()
        cursor.catching_up, cursor.reading, cursor.tidying = False, None, False  # (a page on its way is stale)
        cursor.awaits_marker = False  # (read now, from the start: nothing held to tell apart)
        cursor.forget_map()
        cursor.failures, cursor.failing_since = 0, None
        cursor.away = False
        cursor.follow(node_id)
        if cursor.run is not None:
            cursor.left_runs = (*cursor.left_runs[-(_LEFT_RUNS - 1):], cursor.run)
        place = (key, cursor.stream)
        self.rereads.forget(place)
        self._record_from_start(cursor, cursor.upto)
        self._follow_run(cursor, run)
        self.flush()
        self._catch_up(key, cursor)

    # -- live frames ------------------------------------------------------------------------

    def live(self, topic: str, seq: int | None, items: list[Any], origin: Origin | None, sender_id: str | None,
             subscriptions: list[tuple[Key, SubscribeOptions]], calls: list[Call], meta: bytes | None = None,
             wait: bool = True, size: int = 0) -> None:
        """A frame from a publisher, for the replaying ``subscriptions`` matching its topic
        (``meta``: its meta frame, if it has one; ``size``: the bytes it came in).

        A frame from a sender not known yet (its HELLO, which says whether it keeps a
        history, is still on its way) waits for it, up to `UNKNOWN_WAIT_S` (``wait``);
        delivered plainly at once, it would come again in the replay of that history.
        Frames wait so for at most `MAX_UNKNOWN` senders, `MAX_HELD` frames of one, and
        `UNKNOWN_MAX_BYTES` in all (`AwaitingHello`); past them, the sender's frames go at once. A
        subscription dropped since the frame was matched to it does not get it, and neither
        does the same subscription made anew since (a new one: the frame was matched to the
        one before).
        """
        gone = seq is not None and sender_id is not None and sender_id not in self.directory.alive_ids
        left = self._stream_left(sender_id) if gone else None  # type: ignore[arg-type]
        # (`left`: the stream of a publisher that left, whose frames are still coming: `_stream_left`)
        awaiting = self.awaiting
        if wait and seq is not None and sender_id is not None and ((gone and left is None) or sender_id in awaiting):
            # (behind those waiting: in order)
            over = awaiting.add(sender_id, (topic, seq, items, origin, subscriptions, meta, size), size)
            if over or sender_id in self.directory.alive_ids:
                self.release_unknown(calls, sender_id)
            return
        stream = self.directory.stream_of(sender_id, topic) if sender_id is not None else None
        replays = self.registry.replays
        for key, options in subscriptions:
            if replays.get(key) is not options:  # dropped (or made anew) since the frame was matched to it
                continue
            if left is not None and seq is not None:
                cursor = self.cursors.get((key, left))
                # (none is made for a publisher gone; a topic it does not keep went plainly while it
                # was a peer, and has no history: followed, its first frame was a gap to fill from
                # the history, read again and again once the publisher was back)
                if cursor is not None and cursor.options is options and topic.startswith(cursor.kept):
                    self._take(key, options, cursor, HeldFrame(topic, seq, items, origin, sender_id, meta, size),
                               calls)
                    continue
            elif stream is not None and seq is not None:
                cursor = self._cursor(key, options, stream, sender_id, calls)  # type: ignore[arg-type]
                if cursor is not None:
                    moved = cursor.node_id != sender_id
                    if moved and self._superseded(cursor, sender_id):  # type: ignore[arg-type]
                        # a node the stream had before the one followed, killed and not yet found
                        # gone: what it sent is still coming, its stream's (as once it left), and
                        # followed, it made its run look unknown (`_rewind`: its whole history again)
                        self._take(key, options, cursor, HeldFrame(topic, seq, items, origin, sender_id, meta, size),
                                   calls)
                        continue
                    if moved or cursor.run is None:  # (a restarted publisher: a new id)
                        cursor.follow(sender_id)  # type: ignore[arg-type]
                        self._check_run(key, cursor, sender_id, calls)  # type: ignore[arg-type]
                    self._take(key, options, cursor, HeldFrame(topic, seq, items, origin, sender_id, meta, size),
                               calls)
                    if moved and not cursor.catching_up:
                        # its numbers may have gone back under the run followed (a store put back from
                        # a copy taken while it ran): asked where it is now (`Cursor.ahead`), not once it is
                        # quiet, which a busy publisher never is
                        self._catch_up(key, cursor, numbers_only=True)
                    continue
                self.plain.note(key, options, stream, topic, seq + len(items) - 1)  # (too many streams followed)
            # the publisher keeps no history of it (or too many streams are followed): plain delivery
            for index, data in enumerate(items):
                calls.append(Call(key[1], Message("pubsub", topic, data, sender_id, self.directory.lookup_peer,
                                                  origin, index), None, "pubsub"))

    def _superseded(self, cursor: Cursor, node_id: str) -> bool:
        """Whether the node ``node_id``, a peer publishing the cursor's stream, is one the
        stream had before: the cursor followed it before another, or it runs a run that the
        store of the node running the run followed names as an older one (``X-ZMQMESH-RUNS``).
        Only a publisher killed and restarted on its store before it was taken for gone
        leaves two such peers."""
        if node_id in cursor.earlier:
            return True
        runs = self.directory.runs
        theirs, followed = runs.get(node_id), cursor.run
        if not theirs or followed is None or theirs[0] == followed:
            return False
        return any(lineage[0] == followed and theirs[0] in lineage for lineage in runs.values())

    def _stream_left(self, sender_id: str) -> str | None:
        """The stream of the publisher ``sender_id``, which is no peer any more (it left, was
        killed, or was taken for gone), as a cursor that follows it names it (or followed it
        until the node of its restart came): the frames it sent that are still coming are its
        stream's, to be sequenced as its others (taken for a stranger's, they waited 2 s and
        went plainly, under ids of its node, and came again from its history under its
        stream's). None if no cursor follows it. (Remembered per sender while the peers stay
        as they are: a publisher killed mid-stream leaves thousands of frames behind it, and
        a cursor follows another node only once that one is a peer.)"""
        epoch = self.directory.epoch
        known = self._left.get(sender_id)
        if known is not None and known[0] == epoch:
            return known[1] or None
        found = next((c.stream for c in self.cursors.values() if c.node_id == sender_id or sender_id in c.earlier), "")
        if len(self._left) >= _MAX_LEFT:
            self._left.clear()
        self._left[sender_id] = (epoch, found)
        return found or None

    def release_unknown(self, calls: list[Call], now_for: str | None = None) -> None:
        """Take the frames that waited for their sender: those of senders now known, of
        senders waited for long enough (delivered plainly), and of ``now_for``."""
        for sender_id, frames in self.awaiting.release(self.directory.alive_ids, now_for):
            for topic, seq, items, origin, subscriptions, meta, size in frames:
                self.live(topic, seq, items, origin, sender_id, subscriptions, calls, meta, wait=False, size=size)

    def _take(self, key: Key, options: SubscribeOptions, cursor: Cursor, frame: HeldFrame, calls: list[Call],
              settled: bool = False, final: bool = False) -> None:
        """A live frame for a cursor. A jump in the numbers makes the cursor catch up from
        the history; once it has (``settled``), what is still missing is reported instead,
        unless the history was read before those messages were kept; a frame past what
        the history reached, read after the frame came, is dropped (`_unkept`). ``final``:
        there is no history to be had (a failed fetch): report at once. A frame that says where
        its topic's numbering began (`_said_start`) is taken as a page's ``"start"``. A
        cursor that reaches `tidy_at` topics asks its publisher which it still numbers. A
        frame numbered past what a store holds is malformed: dropped, counted
        (``rejected["pubsub_malformed"]``)."""
        if not storable(frame.seq + len(frame.items)):  # (numbers no store gives: `storable`)
            self.stats.reject("pubsub_malformed")
            return
        cursor.live_seen = True
        self.rereads.look_at((key, cursor.stream), time.monotonic() + QUIET_LOOK_S, True)  # (a later frame puts it off)
        if cursor.catching_up:
            cursor.hold(frame, self._said_position(frame.meta) if cursor.live_pos is None else None)
            return
        expected = cursor.next.get(frame.topic)
        if expected is None and (frame.seq == 0 or not cursor.from_start):
            expected = frame.seq  # a topic that starts now (or a subscription that starts now)
        if (expected is None or frame.seq > expected) and frame.meta is not None:
            start = self._said_start(frame.meta, frame.seq)
            if start is not None:
                self._starts(cursor, {frame.topic: start})
                expected = cursor.next.get(frame.topic, expected)
        missed = 0
        if cursor.history_refused():
            settled = final = True  # (no history to be had: `NumbersTooMany`)
        if expected is None or frame.seq > expected:
            # missed some: the history may have them, unless it was just read up to past them
            if not settled or (not final and frame.seq > cursor.kept_next.get(frame.topic, 0)):
                if settled and frame.read_since:
                    self._unkept(cursor, frame)
                    return
                # (a read already on its way when the frame came may have been served before the
                # frame was kept: the one asked for now is after it)
                cursor.hold(HeldFrame(*frame[:-1], read_since=True), self._said_position(frame.meta))
                self._catch_up(key, cursor)
                return
            missed = frame.seq - (expected or 0)
        self.delivery.frame(key, options, cursor, frame.topic, frame.seq, frame.items, frame.origin, frame.sender_id,
                      missed, None, calls)
        if len(cursor.next) >= cursor.tidy_at and not cursor.history_refused():  # (a busy publisher is never quiet: asked now)
            # (asked again only past twice these, whatever comes of it: an answer that forgets
            # nothing, from a publisher before this look, or none at all, must not make every
            # frame ask: `_forget_topics` sets it from what is kept)
            cursor.plan_tidy()
            cursor.tidying = True
            self._catch_up(key, cursor, numbers_only=True)

    def _unkept(self, cursor: Cursor, frame: HeldFrame) -> None:
        """Drop a live frame numbered past what its publisher's history reached, as read
        after the frame came: a publisher keeps each frame before it sends it, so its
        number is a lie (or of a numbering its store went back from). Read again and again,
        the history never reached it. Counted per message (``rejected["replay_unkept"]``),
        logged at most every `UNKEPT_LOG_S`; the cursor goes on from where it was."""
        self.stats.reject("replay_unkept", len(frame.items))
        said = self._unkept_log.due(len(frame.items))
        if said:
            log.warning("stream %s, topic %r: a live frame numbered %d, past what its publisher's history reached "
                        "(%d), dropped; %d message(s) so since the last such line (counted in "
                        "rejected.replay_unkept; said again at most every %g s)", cursor.stream[:8], frame.topic,
                        frame.seq, cursor.kept_next.get(frame.topic, 0), said, UNKEPT_LOG_S)

    def _said_position(self, meta: bytes | None) -> int | None:
        """Where its publisher's history keeps a live frame, as its meta frame says (``"p"``,
        on a kept topic); None if it says nothing of it (no meta frame, a publisher before
        this field), or a position no store gives. (Asked only while the cursor does not
        know where its live stream began: a publisher's frames come in the order it keeps
        them, so a later one's position is past it.)"""
        if meta is None:
            return None
        try:
            position = self.codec.decode(meta).get("p")
        except Exception:  # (a meta frame that is no map: read as a frame's when received)
            return None
        return position if storable(position) else None

    def _said_start(self, meta: bytes, seq: int) -> int | None:
        """Where the numbering of a frame's topic began, as its meta frame says (``"s"``: on
        the first frame of a topic its publisher numbered afresh past 0); None if it says
        nothing of it, or a start past the frame's first number (``seq``)."""
        try:
            start = self.codec.decode(meta).get("s")
        except Exception:  # (a meta frame that is no map: read as a frame's when received)
            return None
        return start if storable(start) and start <= seq else None

    # -- catching up ------------------------------------------------------------------------

    def _cursor(self, key: Key, options: SubscribeOptions, stream: str, node_id: str,
                calls: list[Call]) -> Cursor | None:
        """The subscription's cursor in ``stream``, made (and its catch-up begun) if new.
        Past `_MAX_CURSORS`, the cursor of a stream whose publisher left makes way
        (`_make_room`); None if none can: counted (``rejected["replay_streams_full"]``),
        and that stream's frames are delivered plainly, as a publisher without a history's.
        So too, counted as ``rejected["durable_streams_full"]`` and logged, past the streams a
        durable subscription's name keeps places in (`DurablePlaces.room`). What a stream
        delivered plainly so is noted (`PlainlyDelivered`), and comes again marked
        ``redelivered`` once a cursor follows it."""
        cursor = self.cursors.get((key, stream))
        if cursor is not None:
            if cursor.options is options:
                return cursor
            self._forget((key, stream))  # made for a subscription since dropped: this one is new
        if len(self.cursors) >= _MAX_CURSORS and not self._make_room():
            self.stats.reject("replay_streams_full")
            return None
        # (after the table had room: what a durable name forgets is gone from its store too)
        name, places = options.durable_name, self.places
        stored: dict[str, tuple[int, int, int]] = {}
        resumed = all_again = False
        began = None  # (where a durable subscription began mid-stream, not yet read through: resumed from there)
        if name is not None and places is not None:
            if not places.room(name, stream, self._present_streams(), self.cursors, self._forget):
                self.stats.reject("durable_streams_full")
                said = self._streams_full_log.due()
                if said:
                    log.warning("durable subscription %r: past its %d streams, and none of a publisher gone to make "
                                "way: stream %s (and others, %d frame(s) since the last such line) delivered plainly, "
                                "unsequenced, counted in rejected.durable_streams_full; followed once a publisher "
                                "leaves, what came plainly then comes again marked redelivered; said again at most "
                                "every %g s", name, places_module.MAX_DURABLE_STREAMS, stream[:8], said,
                                UNKEPT_LOG_S)
                return None
            stored = places.stored(name, stream)
            # (a stream listed with no place in any topic: its rows were damaged, `Cursors.load_counting`)
            resumed = bool(stored) or places.known(name, stream)
            began = places.began(name, stream)
            # (the name taken again to follow every topic from its start: from the start of the
            # history, not from its places, which are past where it began mid-stream)
            all_again = began is not None and options.replay == "all"
            if all_again:
                places.read_through(name, stream)
                began = None
        since = None  # (a first start that begins mid-stream: from that many seconds ago, or from now)
        if began is not None:
            since = began[1]
        elif not resumed and options.replay != "all":
            since = time.time() - (0.0 if options.replay == "new" else float(options.replay))
        cursor = Cursor(stream, node_id, options, from_start=options.replay == "all" or (resumed and began is None),
                        since=since, resumed=resumed)
        cursor.kept = self.directory.streams.get(node_id, (stream, ()))[1]
        self.cursors[(key, stream)] = cursor
        for topic, (seq, upto, _pos) in stored.items():
            cursor.next[topic] = seq + 1
            if upto > seq:
                cursor.upto[topic] = upto
        for topic, last in self.plain.take(key, options, stream).items():  # (what came plainly comes again marked)
            cursor.upto[topic] = max(cursor.upto.get(topic, -1), last)
        if began is not None:
            # (what it handled before was published after where it began: a place below it is
            # one placed before its topic's first message was handled, `before_handling`)
            cursor.pos = began[0]
        elif stored and not all_again:  # (taken again with "all": from the start, 0)
            cursor.pos = min(pos for _s, _u, pos in stored.values())
        if name is not None and places is not None:
            cursor.run = places.run(name, stream)
        self._check_run(key, cursor, node_id, calls)
        self._record_began(cursor)
        mark = self._marks.pop((key, node_id), None)
        self._catch_up(key, cursor, marked=mark[1] if mark is not None and mark[0] is options else -1)
        return cursor

    def _make_room(self) -> bool:
        """Forget the oldest cursor of a stream that no present peer publishes and that is
        not catching up (it holds no live frame); False if there is none. A publisher that
        comes back on its store after that is followed afresh, as its ``replay`` says (a
        durable subscription resumes from the place stored). Otherwise the cursors of the
        streams of publishers gone for good, each run of a worker on a fresh store one,
        filled the table, and no stream that came later was replayed."""
        present = self._present_streams()
        for place, cursor in self.cursors.items():
            if place[1] not in present and not cursor.catching_up:
                self._forget(place)
                return True
        return False

    def _present_streams(self) -> set[str]:
        """The streams of the publishers present now."""
        return {stream for stream, _prefixes in self.directory.streams.values()}

    def _catch_up(self, key: Key, cursor: Cursor, numbers_only: bool = False,
                  marked: int | None = None) -> None:
        """Begin a catch-up: read the cursor's publisher's history from the cursor's
        position (`Cursor.request`). ``marked``, for the first catch-up of a new cursor: the
        position its publisher answered the subscription's replay marker with
        (`Cursor.live_from`), or -1 if it has not yet; then, from a publisher that answers
        markers, the read waits for it, up to `MARKER_WAIT_S` (`marked`)."""
        if cursor.catching_up or cursor.history_refused():
            return
        cursor.catching_up = True
        cursor.forget_map()
        if marked is not None and marked >= 0:
            cursor.live_from(marked)  # (before the request: it may say where the read goes from)
            self._record_began(cursor)
        fetch = Fetch(cursor.node_id, key, cursor.stream, cursor.request(key[0], numbers_only))
        if marked is not None and marked < 0 and self.directory.speaks(cursor.node_id, MARKER_PROTOCOL):
            cursor.reading, cursor.awaits_marker = fetch, True  # (read at the answer, or at the deadline: `look_again`)
            self.rereads.retry_at((key, cursor.stream), time.monotonic() + MARKER_WAIT_S, fetch)
            return
        self._read(cursor, fetch)

    def _read(self, cursor: Cursor, fetch: Fetch) -> None:
        """Ask for the page ``fetch`` names, the one ``cursor`` now waits on (one that waited
        for its replay marker's answer goes without it: counted, ``pubsub.replay_unmarked``)."""
        if cursor.awaits_marker:
            cursor.awaits_marker = False
            # (no answer came, or one of the publisher's next run, which a read planned against
            # the run before cannot take: that run's frames may still be on their way)
            self.stats.add("pubsub", "replay_unmarked")
            log.info("stream %s: no answer to the replay marker taken within %g s: catching up without it",
                     cursor.stream[:8], MARKER_WAIT_S)
        cursor.reading = fetch
        self.fetch(fetch)

    def marked(self, key: Key, options: SubscribeOptions, sender_id: str, position: Any) -> None:
        """The publisher ``sender_id`` answered the replay marker of the subscription ``key``
        (made with ``options``) with ``position``: the position its history gives the first
        frame it keeps after the answer (`Cursor.live_from`). The cursor's first read, which
        waited for it, goes now; a cursor not made yet takes it when it is (`sync`, which
        lets go of the answers of the publishers it knows: their cursors, if any, took
        theirs); one of a publisher that keeps nothing under the subscription's prefix is
        let go. A later answer (ZeroMQ subscribes again on a connection made again),
        or one that came after the read went without it, is let go. Raises `ValueError` for
        a position no store gives (the frame is malformed)."""
        if not storable(position) or position < 1:
            raise ValueError(f"a replay marker answered with position {position!r}")
        if self.registry.replays.get(key) is not options:
            return  # (a subscription dropped or made anew since: its marker is another)
        found = self.directory.streams.get(sender_id)
        if found is not None and not _overlaps(key[0], found[1]):
            return  # (it keeps nothing the subscription takes: no cursor follows it)
        cursor = self.cursors.get((key, found[0])) if found is not None else None
        if cursor is None or cursor.options is not options:
            if len(self._marks) >= _MAX_CURSORS:
                self._marks.clear()
            self._marks[(key, sender_id)] = (options, position)
            return
        fetch = cursor.reading
        if not cursor.awaits_marker or fetch is None or fetch.node_id != sender_id:
            return
        cursor.awaits_marker = False
        cursor.live_from(position)
        self._record_began(cursor)
        # (a new read, from where the answer says, if it does: the one planned at the deadline is stale)
        self._read(cursor, Fetch(fetch.node_id, fetch.key, fetch.stream, cursor.request(fetch.key[0])))

    def wanted(self, fetch: Fetch) -> bool:
        """Whether a cursor still waits on the page of ``fetch`` (any thread: a driver asks
        before it reads the page, and spares the publisher a read for a subscription
        dropped meanwhile; one dropped later has its page left as stale: `_reader`)."""
        return self._waiting_on(fetch) is not None

    def _waiting_on(self, fetch: Fetch) -> Cursor | None:
        """The cursor whose catch-up waits on the page of ``fetch``, if one does."""
        cursor = self.cursors.get((fetch.key, fetch.stream))
        return cursor if cursor is not None and cursor.reading is fetch else None

    def forget_dropped(self) -> None:
        """Forget the cursors of the subscriptions no longer made, with the live frames they
        hold and their plans to read again (call when the subscriptions may have changed).
        The same subscription made again starts a cursor of its own: it replays as its
        ``replay`` says, or, durable, resumes from the place recorded under its name. A page
        still on its way for a forgotten cursor is left (see `_reader`). The places of the
        durable names no subscription takes any more are let go from memory
        (`DurablePlaces.release`)."""
        replays = self.registry.replays
        if replays is self._replays_seen:  # (the registry makes a new table on each change)
            return
        self._replays_seen = replays
        for place in [place for place, cursor in self.cursors.items() if not self._still_made(place[0], cursor)]:
            self._forget(place)
        self.plain.forget_unless(lambda key, options: replays.get(key) is options)
        if self.places is not None:
            self.places.release({o.durable_name for o in replays.values() if o.durable_name is not None})
        self._marks = {place: mark for place, mark in self._marks.items() if replays.get(place[0]) is mark[0]}

    def _still_made(self, key: Key, cursor: Cursor) -> bool:
        """Whether the subscription ``cursor`` was made for is still made (not dropped, nor
        made anew since)."""
        return self.registry.replays.get(key) is cursor.options

    def _forget(self, place: tuple[Key, str]) -> None:
        del self.cursors[place]
        self._gone.pop(place, None)
        self.rereads.forget(place)

    def on_page(self, fetch: Fetch, page: Any, error: BaseException | None, calls: list[Call]) -> None:
        """Apply one page of history (or the failure to get it) to its cursor: its rows
        join those waiting to be delivered, and `deliver_pages` delivers the next burst. A
        look at the numbers alone also tells which topics the publisher still numbers: the
        cursor forgets the others (`_forget_topics`)."""
        cursor = self._reader(fetch)
        if cursor is None:
            return
        if error is None:
            try:
                rows, more = page["rows"], bool(page["more"])
                if type(rows) is not list:
                    raise TypeError(f"rows of type {type(rows).__name__}")
                reached = cursor.map_piece(fetch.request, page)
                # (this page's piece of the numbers alone, read with its rows: a piece read before
                # is older than the rows of the pages delivered since)
                ahead = cursor.ahead(page.get("next") or {})
                if reached is not None:
                    page = {**page, "next": reached}  # (whole: `_page_read` looks at it)
                    if not cursor.tidying:
                        cursor.kept_next.update((t, int(n)) for t, n in reached.items())
                self._starts(cursor, page.get("start") or {})
                if fetch.request.get("n") == 0 and reached is not None and not rows and not more:
                    self._forget_topics(cursor, reached)  # (all its topics, and no row)
            except NumbersTooMany as exc:  # (its history is not read again: `Cursor.history_refused`)
                error = exc
                self.stats.reject("history_numbers_refused")
            except Exception as exc:  # a malformed page: what is held is released as it is
                error = exc
                self.stats.reject("history_malformed")
            else:
                if reached is not None or ahead:  # (kept until the page was taken: a malformed one is asked for again whole)
                    cursor.forget_map()
                if ahead:
                    self._gone_back(fetch.key, cursor, ahead)  # (this page's rows are read again with the rest)
                    return
                self._paging.append([fetch, page, rows, more, 0])
                self.deliver_pages(calls)
                return
        self._page_read(fetch, cursor, page, error, False, calls)

    def _gone_back(self, key: Key, cursor: Cursor, ahead: dict[str, int]) -> None:
        """The cursor is past its publisher in the topics ``ahead`` (`Cursor.ahead`, which says
        where the publisher is in each): those topics are read again from the start of the
        history, what the publisher numbered in them so far marked ``redelivered`` (it may
        be what was handled under the same numbers before; what it numbers later is new),
        the other topics resuming after their numbers; the live frames held are held on.
        Logged and counted (``stats()["pubsub"]["rewound"]``, as for `_rewind`); a durable
        subscription records it at once."""
        self.stats.add("pubsub", "rewound")
        shown = ", ".join(f"{t!r} at {cursor.next.get(t)} of {n}" for t, n in list(ahead.items())[:3])
        log.warning("stream %s: this subscription is past its publisher in %d topic(s) (%s%s): a damaged place, or "
                    "a numbering that went back; reading them again from the start of the history, what the "
                    "publisher numbered in them so far marked redelivered", cursor.stream[:8], len(ahead), shown,
                    ", ..." if len(ahead) > 3 else "")
        for topic, nxt in ahead.items():
            cursor.next.pop(topic, None)
            if nxt > 0:
                cursor.upto[topic] = nxt - 1
            else:
                cursor.upto.pop(topic, None)
        cursor.pos, cursor.from_start = 0, True
        cursor.tidying = False
        cursor.forget_map()
        if self._record_from_start(cursor, {topic: nxt - 1 for topic, nxt in ahead.items()}):
            self.flush()
        self._read(cursor, Fetch(cursor.node_id, key, cursor.stream, cursor.request(key[0])))

    def _record_from_start(self, cursor: Cursor, uptos: dict[str, int]) -> bool:
        """For a durable subscription (True; False for another), record that it reads the
        topics of ``uptos`` of the cursor's stream again from the start of the history
        (`DurablePlaces.from_start`), and every topic from its start (`Cursor.from_start`):
        where it began mid-stream, if it did, is forgotten (`DurablePlaces.read_through`)."""
        name = cursor.options.durable_name
        if name is None or self.places is None:
            return False
        self.places.from_start(name, cursor.stream, uptos)
        self.places.read_through(name, cursor.stream)
        return True

    def delivering(self) -> bool:
        """Whether rows of pages wait to be delivered: the driver then calls
        `deliver_pages` again once it handled the calls it has."""
        return bool(self._paging)

    def deliver_pages(self, calls: list[Call]) -> None:
        """Deliver the rows of the pages taken, in order, into ``calls``: a burst of at most
        `PAGE_BURST` messages (a frame is never cut: one that would take the burst past it
        waits for the next, unless it is the burst's first); a page delivered whole is then
        done with (`_page_read`). A page with more to follow that took the cursor no further
        is malformed (``rejected["history_malformed"]``): its read failed."""
        start = len(calls)
        limit = start + PAGE_BURST
        paging = self._paging
        while paging and len(calls) < limit:
            entry = paging[0]
            fetch, page, rows, more, index = entry
            cursor = self._reader(fetch)
            if cursor is None:
                paging.popleft()
                continue
            error = None
            try:
                while index < len(rows):
                    stated = rows[index][3]  # (its messages, as its publisher says: a hint only)
                    if len(calls) > start and len(calls) + (stated if type(stated) is int else 1) > limit:
                        break
                    index += 1
                    self.delivery.row(fetch.key, cursor.options, cursor, rows[index - 1], calls)
            except Exception as exc:  # a malformed row: what is held is released as it is
                error = exc
                self.stats.reject("history_malformed")
            if error is None and index < len(rows):
                entry[4] = index
                return
            paging.popleft()
            if error is None and more and cursor.pos <= fetch.request["a"]:
                # (a publisher's page with more to follow has a row past the position asked from:
                # one with none was asked for again and again, thousands of times a second)
                error = ValueError(f"a page with more to follow that goes no further than position {cursor.pos}")
                self.stats.reject("history_malformed")
            self._page_read(fetch, cursor, page, error, more, calls)

    def _reader(self, fetch: Fetch) -> Cursor | None:
        """The cursor whose catch-up waits on the page of ``fetch``; None if the page is
        stale. A page is stale once its subscription was dropped (the cursor waiting on it
        is then forgotten, if `forget_dropped` has not yet), and so it stays when the same
        subscription was made again since: a new cursor reads for that one."""
        cursor = self._waiting_on(fetch)
        if cursor is not None and not self._still_made(fetch.key, cursor):
            self._forget((fetch.key, fetch.stream))
            return None
        return cursor

    def _page_read(self, fetch: Fetch, cursor: Cursor, page: Any, error: BaseException | None, more: bool,
                   calls: list[Call]) -> None:
        """A page delivered, or failed: read the next one, or end the catch-up."""
        cursor.awaits_marker = False  # (a read planned without it failed: the publisher is away)
        if error is not None:
            if not isinstance(error, NumbersTooMany) and self._retry(fetch, cursor, error):
                return  # (still catching up: the live frames are held on)
            log.warning("cannot replay stream %s from %s: %s", fetch.stream[:8], fetch.node_id[:8], error)
            self.stats.add("pubsub", "replay_failed")
            more = False
            cursor.forget_map()
        else:
            cursor.failures, cursor.failing_since = 0, None
            if cursor.map_from is not None:  # (the rest of ``next``, and the rows kept meanwhile: `Cursor.map_piece`)
                self._read(cursor, Fetch(cursor.node_id, fetch.key, cursor.stream, cursor.rest_of_map(fetch.request)))
                return
            # a look at the numbers alone that finds the history further than the cursor (a
            # frame lost on the way) reads what followed before the frames held are let go:
            # let go first, they would take what the history has for missed
            # (not a look for `tidy_at`: frames kept coming, and those on their way would
            # make the history look further every time, read again for nothing)
            more = more or (fetch.request.get("n") == 0 and not cursor.tidying
                            and cursor.behind(page.get("next") or {}))
        if more:
            self._read(cursor, Fetch(cursor.node_id, fetch.key, cursor.stream, cursor.request(fetch.key[0])))
            return
        if cursor.tidying:  # (a look at the numbers once the publisher is quiet, as ever: `QUIET_LOOK_S`)
            cursor.tidying = False
            self.rereads.look_at((fetch.key, fetch.stream), time.monotonic() + QUIET_LOOK_S, True)
        cursor.catching_up, cursor.reading = False, None
        if cursor.left_to_live is not None:  # (rows left to live frames: read again by a later catch-up, if they never came)
            cursor.pos, cursor.left_to_live = min(cursor.pos, cursor.left_to_live), None
        if error is None and not cursor.from_start:
            self._read_through(cursor, fetch.request, page.get("next"))
        held = cursor.take_held()
        if held is None:  # more came live than could be held: fetch them too
            if error is None:
                self._catch_up(fetch.key, cursor)
            return
        while held:
            self._take(fetch.key, cursor.options, cursor, held.popleft(), calls, settled=True, final=error is not None)
        if error is None and not cursor.live_seen and cursor.tail_looks < len(TAIL_LOOKS_S):
            self.rereads.look_at((fetch.key, fetch.stream), time.monotonic() + TAIL_LOOKS_S[cursor.tail_looks], False)

    def _read_through(self, cursor: Cursor, request: dict[str, Any], reached: Any) -> None:
        """A cursor that began mid-stream (``replay`` in seconds, or a durable subscription's
        first start without ``"all"``: its reads went from where it began, `Cursor.request`)
        has read its publisher's history through, up to
        ``reached`` (the page's ``next``: the number every topic had reached), by the read
        ``request``: from now on it follows every topic from its start (`Cursor.from_start`).
        A topic it got no row of is expected where the read found it (what came before was
        older than it replays), or from its first live frame held, if before (`Cursor.met_at`:
        it came live, published after the subscription reached the publisher); one begun
        since, or missing from the numbers, is expected from its start, so a live frame
        numbered past it is a jump the history fills.
        (Before, such a frame was taken for where the topic began: what was published of it
        after the read and before the live subscription reached the publisher, or dropped
        at a high-water mark, was neither delivered nor reported.) A durable subscription
        records where it expects those topics (`DurablePlaces.begun_at`): restarted, it
        resumes from where it handled its messages, and took a topic it had no place in
        for one to follow from its start (a message of a topic all older than the seconds
        it replays, published while it was down, came with all those older ones counted
        missed in ``msg.gap``), and forgets where it began mid-stream
        (`DurablePlaces.read_through`, written with the places of the topics it met, or at
        once if it met none): restarted, it follows every topic from its start, and a
        stream of which it had nothing to record (no topic kept under its prefix yet) is
        resumed all the same by the run it followed (`_follow_run`), from the start of the
        history (before, restarted, it began again as its ``replay`` said: with ``"new"``,
        what was published while it was down was lost, unreported).

        A page without ``next`` (a read that failed over, malformed) leaves the cursor as it
        was, and so does a look at the numbers alone (``"n": 0``, no rows): the live frames
        held while it was read, of topics the cursor has no number for, may have been
        published before it was answered, numbered below what it says and not in it as
        rows; expected from there, they were dropped as delivered (a durable subscription's
        first start with ``replay="new"``, asked at a restarted publisher's first frame, lost
        the 300 messages of a topic it had not met that came right after, unreported)."""
        if type(reached) is not dict or request.get("n") == 0:
            return
        prefix = request["p"]  # (a topic outside it, or no str, is a stranger's word: not kept as a place)
        begun = {topic: cursor.met_at(topic, number) for topic, number in reached.items()
                 if type(topic) is str and topic.startswith(prefix) and topic not in cursor.next and storable(number)}
        met = bool(cursor.next)  # (topics it has messages of: their places go with them, before they are handled)
        cursor.next.update(begun)
        cursor.from_start = True
        name = cursor.options.durable_name
        begun = {topic: number for topic, number in begun.items() if number > 0}  # (0: the start, as from no place)
        if name is None or self.places is None:
            return
        self.places.read_through(name, cursor.stream)  # (where it began goes with the places of the topics met)
        if begun:
            self.places.begun_at(name, cursor.stream, begun, cursor.pos)
        if begun or not met:
            self.flush()

    def _retry(self, fetch: Fetch, cursor: Cursor, error: BaseException) -> bool:
        """Whether a failed read of a history is to be tried again (`FETCH_RETRIES_S` while
        its publisher is present, `AWAY_HOLD_S` while it is away); if so, it is planned."""
        now = time.monotonic()
        first = cursor.failing_since is None
        since = now if cursor.failing_since is None else cursor.failing_since
        present = self._publisher(cursor) is not None
        if not present:
            cursor.away = True  # (asked where it is once back: `sync`)
        if present and cursor.failures < len(FETCH_RETRIES_S):
            delay = FETCH_RETRIES_S[cursor.failures]
            cursor.failures += 1
        elif not present and now - since < AWAY_HOLD_S:
            delay = _AWAY_LOOK_S
        else:  # given up: the next failure starts counting afresh
            cursor.failures, cursor.failing_since = 0, None
            return False
        if first or present:
            log.info("reading the history of stream %s failed (%s): trying again in %.1f s",
                     fetch.stream[:8], error, delay)
        cursor.failing_since = since
        self.rereads.retry_at((fetch.key, fetch.stream), now + delay, fetch)
        return True

    def _starts(self, cursor: Cursor, starts: dict[str, Any]) -> None:
        """Where the numbering of topics began, as a page says (``"start"``, for those that
        began past 0: numbered after topics whose messages all expired were forgotten), or
        a topic's first live frame (``"s"``: `_said_start`). A topic new to the cursor is
        expected from there (nothing missed before it); one it knows below there was
        forgotten and numbered anew: logged and counted
        (``stats()["pubsub"]["renumbered"]``), and followed from there. (What of the old
        numbering the history dropped before the subscription read it cannot be counted:
        the publisher no longer knows how much that was.)"""
        for topic, start in starts.items():
            if not storable(start):
                raise ValueError(f"a start of {start!r}")
            expected = cursor.next.get(topic)
            if expected is None:
                if cursor.from_start:
                    cursor.next[topic] = start
            elif expected < start:
                self.stats.add("pubsub", "renumbered")
                log.info("stream %s, topic %r: numbered anew from %d (this subscription was at %d; everything "
                         "kept of it had expired)", cursor.stream[:8], topic, start, expected)
                cursor.next[topic] = start

    def _forget_topics(self, cursor: Cursor, numbered: dict[str, Any]) -> None:
        """Forget the topics the cursor's publisher no longer numbers, as a look at the
        numbers alone says (``numbered``: all its topics under the prefix), and ask it again
        at `CURSOR_TOPICS` topics or twice those kept, if more (`tidy_at`). Counted
        (``stats()["pubsub"]["cursor_topics_forgotten"]``).

        A topic the look lacks was forgotten before it was answered (or, of a look that
        came in pieces, before the piece of its range was read): nothing of it was kept
        any more, and the numbers it is given afterwards begin past every number given
        before (the publisher's floor). The cursor delivered nothing numbered after
        the answer: it was asked while no page was being read and no row delivered, and
        the live frames of its publisher are held until the answer is applied (here). So
        no message the cursor delivered can come again, from the history or live (a
        message published on the topic later is a new topic's, the cursor told where it
        began: ``"start"`` or ``"s"``).

        A durable subscription's places in those topics go from its store too (flushed
        first), but for topics with messages still being handled (their place still
        moves), and but for one that holds the stream's place if no other row would (its
        position lowered to the cursor's if past it): a restarted subscription reads on
        from the lowest position kept, and a stream with no row left would start afresh."""
        gone = [t for t in cursor.next.keys() | cursor.upto.keys() if t not in numbered]
        for topic in [t for t in cursor.kept_next if t not in numbered]:
            del cursor.kept_next[topic]
        name = cursor.options.durable_name
        if gone and name is not None and self.places is not None:
            gone = self.places.forget_topics(name, cursor.stream, gone, cursor.pos)
        for topic in gone:
            cursor.next.pop(topic, None)
            cursor.upto.pop(topic, None)
        cursor.plan_tidy()
        if gone:
            self.stats.add("pubsub", "cursor_topics_forgotten", len(gone))

    # -- durable subscriptions ----------------------------------------------------------------

    def before_handling(self, calls: list[Call]) -> None:
        """Record, before a burst is handled, the highest number each durable subscription
        reaches in it (a crash then redelivers up to there, marked: `DurablePlaces`)."""
        if self.places is not None:
            self.places.before_handling(calls)

    def recording(self) -> bool:
        """Whether durable subscriptions have messages handed out and not yet handled, or
        places not yet written: then `before_handling` and `flush` have work, even once
        every replaying subscription was dropped (the calls already gathered still run)."""
        return self.places is not None and self.places.unwritten()

    def handled(self, mark: CursorMark) -> None:
        """A durable subscription's handler finished with a message (whatever the outcome)."""
        if self.places is not None:
            self.places.handled(mark)

    def passed_over(self, mark: CursorMark) -> None:
        """A durable subscription's message was not handed to its handler, unsubscribed
        meanwhile (`DurablePlaces.passed_over`)."""
        if self.places is not None:
            self.places.passed_over(mark)

    def flush(self) -> None:
        """Commit what the durable subscriptions handled since the last flush."""
        if self.places is not None:
            self.places.flush()

