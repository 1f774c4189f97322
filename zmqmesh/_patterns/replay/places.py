"""Where durable subscriptions are, per name, publisher stream and topic: loaded from the
node's store, moved as handlers finish, and written back (`DurablePlaces`).

A durable subscription keeps, in the node's store, the last number handled per publisher
stream and topic, so that a restarted subscriber resumes right after it. Before a burst
is handled the highest number it reaches is recorded too: after a crash, messages up to
it are delivered again marked ``redelivered`` (they may have been handled). A name keeps
its places in at most `MAX_DURABLE_STREAMS` streams: past them, those in the streams of
publishers gone make way for a new one (`DurablePlaces.room`). It also keeps the run
(store opening) of each stream's publisher it followed last (`Replays._check_run`), and,
in a stream it began mid-stream (``replay="new"`` or in seconds) and has not yet read
through, where it began (`DurablePlaces.began_mid_stream`): restarted, it resumes
mid-stream from there, not from the start of the history.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..._stats import LogThrottle, Stats
from ..calls import Call, CursorMark
from .cursor import Cursor, Key

if TYPE_CHECKING:
    from ..._store.store import Store

__all__ = ["DurablePlaces", "FORGET_RETRY_S", "FORGOTTEN_LOG_S", "MAX_DURABLE_STREAMS", "RECORD_FAILED_LOG_S"]

log = logging.getLogger("zmqmesh.replay")

MAX_DURABLE_STREAMS = 4_096
"""Publisher streams a durable subscription name keeps its places in (in memory and in its
store). A new stream past them makes the places in the streams of publishers not present
go, least recently followed first (`DurablePlaces.room`): each run of a publisher on a
fresh store is a new stream, and a long-lived subscriber kept every one it met for good
(10 runs left 10 streams' places, 20 left 20). If too few can go, the new stream's frames
are delivered plainly, counted (``rejected["durable_streams_full"]``)."""
FORGOTTEN_LOG_S = 10.0
"""Streams whose places a durable subscription forgot are logged at most this often (and
so is a store's refusal to forget them)."""
FORGET_RETRY_S = 1.0
"""After a store refused to forget the places of streams gone (`DurablePlaces.room`),
how long new streams past the bound are delivered plainly before it is asked again (not
once per frame: a frame of such a stream asks for room each time)."""
RECORD_FAILED_LOG_S = 10.0
"""A store that refuses to record where durable subscriptions are (full: ``store_max_bytes``
or the disk) is logged at most this often (each refusal is counted all the same)."""

Place = tuple[int, int, int]  # (the last number handled, the highest perhaps handled, the history position)
Began = tuple[int, float | None]  # (the history position, the time: where the reads of a cursor that began mid-stream go from)
Mark = tuple[str, str, str]  # (name, stream, topic)


class DurablePlaces:
    """The places of the durable subscriptions of one node, over its store (the inbox's
    thread only)."""

    def __init__(self, store: Store, stats: Stats) -> None:
        self.store = store
        self.stats = stats
        self._places: dict[str, dict[str, dict[str, Place]]] = {}  # name -> stream -> topic -> place (as stored)
        self._dirty: dict[Mark, list[int]] = {}  # -> [seq, upto, pos], to be written at the next `flush`
        self._runs: dict[str, dict[str, str]] = {}  # name -> stream -> the publisher run followed last (stored)
        self._dirty_runs: dict[tuple[str, str], str] = {}
        self._began: dict[str, dict[str, Began]] = {}  # name -> stream -> where it began mid-stream (stored)
        self._dirty_began: dict[tuple[str, str], Began | None] = {}  # (None: forgotten, a read went through)
        # name -> the streams it keeps places in (stored, written, or followed), least recently
        # followed first: those loaded from the store, then in the order last written or followed
        self._followed: dict[str, dict[str, None]] = {}
        self._forgotten_log = LogThrottle(FORGOTTEN_LOG_S)  # (`room`)
        self._forget_refused_log = LogThrottle(FORGOTTEN_LOG_S)
        self._forget_refused_until = 0.0  # (monotonic: the store refused to forget streams, `room`)
        self._record_failed_log = LogThrottle(RECORD_FAILED_LOG_S)  # (`_save`)
        # the numbers handed out and not yet handled, in order; and of those, the ones handled
        # ahead of the first (how many times each: `handled`)
        self._pending: dict[Mark, deque[int]] = {}
        self._finished: dict[Mark, dict[int, int]] = {}

    # -- reading --------------------------------------------------------------------------

    def stored(self, name: str, stream: str) -> dict[str, Place]:
        """The places of ``name`` in ``stream``, per topic, as last written (loaded from the
        store the first time ``name`` is asked for; damaged rows are counted,
        ``rejected["store_damaged"]``, and logged once). Raises `StoreError` if they cannot
        be loaded."""
        if name not in self._places:
            self._places[name], damaged = self.store.cursors.load_counting(name)
            if damaged:  # (once per name and start: no flood)
                self.stats.reject("store_damaged", damaged)
                log.error("durable subscription %r: %d stored place(s) damaged (counted in "
                          "rejected.store_damaged): those topics are read again from the start of the history "
                          "(a place whose topic or stream cannot be read: the streams it may be of)",
                          name, damaged)
            self._runs[name] = self.store.cursors.load_runs(name)
            self._began[name] = self.store.cursors.load_began(name)
            self._followed[name] = dict.fromkeys([*self._places[name], *self._runs[name], *self._began[name]])
        return self._places[name].get(stream, {})

    def known(self, name: str, stream: str) -> bool:
        """Whether ``name`` has a record of ``stream`` (loaded by `stored` first), if only a
        stream listed with no place in any topic (its rows were damaged:
        `Cursors.load_counting`), the run of its publisher it followed (`Replays._follow_run`)
        or where it began mid-stream (`began`)."""
        return (stream in self._places.get(name, {}) or stream in self._runs.get(name, {})
                or stream in self._began.get(name, {}))

    def began(self, name: str, stream: str) -> Began | None:
        """Where ``name`` began in ``stream`` (loaded by `stored` first), if it began
        mid-stream there and has not yet read its history through, as written:
        ``(pos, since)``, the history position and the time (or None) its reads go from."""
        return self._began.get(name, {}).get(stream)

    def run(self, name: str, stream: str) -> str | None:
        """The run of the publisher of ``stream`` that ``name`` followed last, as written."""
        return self._runs.get(name, {}).get(stream)

    def streams(self, name: str) -> dict[str, dict[str, Place]]:
        """The places of ``name`` in memory, per stream and topic (as last written)."""
        return self._places.get(name, {})

    def runs(self, name: str) -> dict[str, str]:
        """The run followed last in each stream of ``name``, in memory (as last written)."""
        return self._runs.get(name, {})

    def followed(self, name: str) -> list[str]:
        """The streams ``name`` keeps places in, least recently followed first."""
        return list(self._followed.get(name, {}))

    def runs_to_write(self) -> dict[tuple[str, str], str]:
        """The runs followed since the last `flush`, per (name, stream): written by it."""
        return dict(self._dirty_runs)

    # -- what a stream of a name is at ---------------------------------------------------------

    def follow_run(self, name: str, stream: str, run: str) -> None:
        """Record, at the next `flush`, that ``name`` follows ``run`` of ``stream``'s publisher."""
        self._dirty_runs[(name, stream)] = run

    def began_mid_stream(self, name: str, stream: str, pos: int, since: float | None) -> None:
        """Record, at the next `flush`, that ``name`` began mid-stream in ``stream`` (its
        first start there, ``replay="new"`` or in seconds) and reads its history from
        position ``pos`` and the time ``since`` (None: none) until a read goes through
        (`read_through`): restarted before, it resumes mid-stream from there in every topic
        it has no place in (`began`), not from the start of the history."""
        self._dirty_began[(name, stream)] = (pos, since)

    def read_through(self, name: str, stream: str) -> bool:
        """Record, at the next `flush`, that ``name`` follows every topic of ``stream`` from
        its start now (a read of its history went through, or it reads it all again):
        where it began mid-stream is forgotten. Whether it had such a record."""
        mark = (name, stream)
        if stream not in self._began.get(name, {}) and self._dirty_began.get(mark) is None:
            return False
        self._dirty_began[mark] = None
        return True

    def touch(self, name: str, stream: str) -> None:
        """Count ``stream`` as the one the durable subscription ``name`` followed last."""
        followed = self._followed.setdefault(name, {})
        followed.pop(stream, None)
        followed[stream] = None

    def room(self, name: str, stream: str, present: set[str], cursors: Mapping[tuple[Key, str], Cursor],
             forget: Callable[[tuple[Key, str]], None]) -> bool:
        """Whether the durable subscription ``name`` may follow ``stream`` (it then counts as
        followed last), within `MAX_DURABLE_STREAMS` streams: for a new one past them, the
        places in as many streams as it takes go, least recently followed first (streams
        loaded from the store and not followed since are the oldest), of those whose
        publisher is not ``present``, that no cursor of ``name`` is reading (catching up:
        ``cursors``, all of the node's), and with no message being handled. They go from
        memory, with their cursors (``forget``), and from the store, in one transaction;
        counted (``rejected["durable_streams_forgotten"]``) and logged at most every
        `FORGOTTEN_LOG_S`. A publisher of one that comes back is followed as a new stream,
        as the subscription's ``replay`` says. False, nothing forgotten, if too few can go
        or the store refuses (logged at most every `FORGOTTEN_LOG_S`, and not asked again
        for `FORGET_RETRY_S`). Raises `StoreError` if the places of ``name`` cannot be
        loaded."""
        self.stored(name, stream)  # (loaded, if they were not)
        followed = self._followed.setdefault(name, {})
        over = len(followed) + 1 - MAX_DURABLE_STREAMS
        if stream in followed or over <= 0:
            self.touch(name, stream)
            return True
        if time.monotonic() < self._forget_refused_until:
            return False  # (the store refused a moment ago: not asked again per frame)
        handling = {s for n, s, _topic in self._pending if n == name}
        candidates = [s for s in followed if s not in present and s not in handling]
        if len(candidates) < over:
            return False
        reading: set[str] = set()
        places: dict[str, list[tuple[Key, str]]] = {}
        for place, cursor in cursors.items():
            if cursor.options.durable_name == name:
                if cursor.catching_up:
                    reading.add(place[1])
                else:
                    places.setdefault(place[1], []).append(place)
        doomed = [s for s in candidates if s not in reading][:over]
        if len(doomed) < over:
            return False
        try:
            self.store.cursors.forget_streams(name, doomed)
        except Exception as exc:  # (kept, in memory too: the new stream is delivered plainly)
            self._forget_refused_until = time.monotonic() + FORGET_RETRY_S
            refused = self._forget_refused_log.due()
            if refused:
                log.error("cannot forget where the durable subscription %r was in streams of publishers gone: %s "
                          "(%d time(s); said again at most every %g s)", name, exc, refused, FORGOTTEN_LOG_S)
            return False
        gone = set(doomed)
        stored, runs, began = self._places.get(name, {}), self._runs.get(name, {}), self._began.get(name, {})
        for s in doomed:
            del followed[s]
            stored.pop(s, None)
            runs.pop(s, None)
            began.pop(s, None)
            for place in places.get(s, ()):
                forget(place)
        for unwritten in self._unwritten_tables():  # (never written back)
            for mark in [m for m in unwritten if m[0] == name and m[1] in gone]:
                del unwritten[mark]
        self.stats.reject("durable_streams_forgotten", len(doomed))
        said = self._forgotten_log.due(len(doomed))
        if said:
            log.warning("forgot where durable subscriptions were in %d stream(s) of publishers not present (the last "
                        "of %r, past its %d streams; counted in rejected.durable_streams_forgotten, said again at "
                        "most every %g s): a publisher of one that comes back is followed afresh, as replay says",
                        said, name, MAX_DURABLE_STREAMS, FORGOTTEN_LOG_S)
        followed[stream] = None
        return True

    def from_start(self, name: str, stream: str, uptos: dict[str, int]) -> None:
        """Record that ``name`` reads the topics of ``uptos`` of ``stream`` again from the
        start of the history, what is numbered up to each marked redelivered: its finishes
        still pending no longer move those places (written at the next `flush`)."""
        self.stored(name, stream)  # (loaded, if it was not)
        for topic, upto in uptos.items():
            mark = (name, stream, topic)
            self._pending.pop(mark, None)
            self._finished.pop(mark, None)
            self._dirty[mark] = [-1, upto, 0]  # (into `_places` too at the flush)

    def begun_at(self, name: str, stream: str, numbers: dict[str, int], pos: int) -> None:
        """Record that ``name`` follows the topics of ``numbers`` of ``stream`` from those
        numbers on, at history position ``pos``: it began mid-stream and read the history
        through, and had no message of them (all older than it replays:
        `Replays._read_through`). Not a topic it has a place in or messages of handed out
        (written at the next `flush`)."""
        stored = self.stored(name, stream)  # (loaded, if it was not)
        for topic, number in numbers.items():
            mark = (name, stream, topic)
            if topic not in stored and mark not in self._dirty and mark not in self._pending:
                self._dirty[mark] = [number - 1, number - 1, pos]

    def forget_topics(self, name: str, stream: str, topics: list[str], pos: int) -> list[str]:
        """Forget the stored places of ``name`` in ``topics`` of ``stream`` (the cursor,
        at history position ``pos``, forgets them: `Replays._forget_topics`), flushed
        first; the topics forgotten. Those with messages still being handled stay (their
        place still moves), and so does one that holds the stream's place if no other row
        would (its position lowered to ``pos`` if past it): a restarted subscription reads
        on from the lowest position kept, and a stream with no row left would start
        afresh. A store that refuses is logged: the topics stay, forgotten at a later look."""
        self.flush()
        topics = [t for t in topics if (name, stream, t) not in self._pending]
        stored = self._places.get(name, {}).get(stream, {})
        doomed = {t for t in topics if t in stored}
        left = [place for t, (_seq, _upto, place) in stored.items() if t not in doomed]
        if doomed and (not left or min(left) > pos):  # (the stream's place stays)
            keep = max(doomed, key=lambda t: stored[t][2])
            doomed.discard(keep)
            topics.remove(keep)
            seq, upto, at = stored[keep]
            if at > pos:
                self._dirty[(name, stream, keep)] = [seq, upto, pos]
                self.flush()
        if doomed:
            try:
                self.store.cursors.forget(name, stream, sorted(doomed))
            except Exception as exc:  # (kept, in memory too: forgotten at a later look)
                log.error("cannot forget where durable subscriptions were in topics no longer numbered: %s", exc)
                return [t for t in topics if t not in doomed]
            for topic in doomed:
                del stored[topic]
                self._dirty.pop((name, stream, topic), None)  # (a flush refused before: not to be written back)
        return topics

    # -- handling -------------------------------------------------------------------------

    def unwritten(self) -> bool:
        """Whether numbers handed out wait to be handled, or places to be written (`flush`)."""
        return bool(self._pending) or any(self._unwritten_tables())

    def pending(self, name: str, stream: str, topic: str) -> deque[int]:
        """The numbers of ``topic`` handed to ``name``'s handler and not yet `handled`, in
        order: the caller appends each it hands out (its place moves once it and those
        before it are handled)."""
        return self._pending.setdefault((name, stream, topic), deque())

    def before_handling(self, calls: Iterable[Call]) -> None:
        """Record, before a burst is handled, the highest number each durable subscription
        reaches in it (a crash then redelivers up to there, marked). A topic it has no
        place in yet is placed just before the first number it gets of it (from position
        0: that message's row is read again): restarted, it resumes there, not from the
        topic's start (before, a subscription that began mid-stream, killed while it
        handled its first message of a topic, got that topic's older messages after the
        restart, marked ``redelivered``, never handed out before)."""
        reached: dict[Mark, int] = {}
        first: dict[Mark, int] = {}
        for call in calls:
            mark = call.route
            if isinstance(mark, CursorMark):
                key = (mark.name, mark.stream, mark.topic)
                reached[key] = mark.seq
                first.setdefault(key, mark.seq)
        if not reached:
            return
        for key, seq in reached.items():
            state = self._dirty.get(key) or self._saved(*key)
            if state[0] < 0 and state[1] < 0:  # (no place yet)
                state[0] = first[key] - 1
            state[1] = max(state[1], seq)  # (the position moves only with what was handled)
            self._dirty[key] = state
        self.flush()

    def handled(self, mark: CursorMark) -> None:
        """A durable subscription's handler finished with a message (whatever the outcome)."""
        key = (mark.name, mark.stream, mark.topic)
        pending = self._pending.get(key)
        if not pending:
            return
        # handlers may finish out of order (a pool), and a number may be pending twice: handed
        # out again by a cursor made anew (a subscription dropped and made again) while the
        # first delivery was being handled. So finishes are counted, each taking one entry,
        # and the place recorded never goes back.
        finished = self._finished.setdefault(key, {})
        finished[mark.seq] = finished.get(mark.seq, 0) + 1
        last = None
        while pending and pending[0] in finished:
            last = pending.popleft()
            if finished[last] == 1:
                del finished[last]
            else:
                finished[last] -= 1
        if not pending:  # (each number finished took its entry: none is left over)
            del self._pending[key], self._finished[key]
        if last is not None:
            state = self._dirty.get(key) or self._saved(*key)
            state[0], state[2] = max(state[0], last), max(state[2], mark.pos)
            self._dirty[key] = state

    def passed_over(self, mark: CursorMark) -> None:
        """A message handed out to a durable subscription was not handled (its handler was
        unsubscribed first): it no longer waits to be (`pending`), and its place does not
        move past it (those after it were not handled either), so that a subscription that
        takes the name again gets it, marked redelivered (`before_handling` reached it)."""
        key = (mark.name, mark.stream, mark.topic)
        pending = self._pending.get(key)
        if pending and mark.seq in pending:
            pending.remove(mark.seq)
            if not pending:
                del self._pending[key]
                self._finished.pop(key, None)

    def release(self, in_use: set[str]) -> None:
        """Let go of the places held in memory for the names no subscription uses now (not
        in ``in_use``) and with no message handed out and not yet handled, once written
        (`flush`; not if the store refused): a subscription that takes such a name again
        loads them from the store, as after a restart. (Held, a node that subscribed under
        ever-new names and dropped each grew by about 10 KB per name of 50 topics, 20 MB
        for 2,000 names, until it stopped.)"""
        if not self.flush():
            return
        busy = {name for name, _stream, _topic in self._pending}
        for name in [n for n in {*self._places, *self._runs, *self._followed} if n not in in_use and n not in busy]:
            self._places.pop(name, None)
            self._runs.pop(name, None)
            self._began.pop(name, None)
            self._followed.pop(name, None)

    def flush(self) -> bool:
        """Commit what the durable subscriptions handled, the runs they followed, and where
        they began mid-stream (or read through), since the last flush; False if the store
        refused (`_save`)."""
        if not any(self._unwritten_tables()):
            return True
        dirty, self._dirty = self._dirty, {}
        runs, self._dirty_runs = self._dirty_runs, {}
        began, self._dirty_began = self._dirty_began, {}
        for (name, stream), run in runs.items():
            self._runs.setdefault(name, {})[stream] = run
        for (name, stream), bound in began.items():
            if bound is None:
                self._began.get(name, {}).pop(stream, None)
            else:
                self._began.setdefault(name, {})[stream] = bound
        rows = []
        for (name, stream, topic), (seq, upto, pos) in dirty.items():
            rows.append((name, stream, topic, seq, max(upto, seq), pos))
            self._places.setdefault(name, {}).setdefault(stream, {})[topic] = (seq, max(upto, seq), pos)
        for name, stream in {*runs, *began, *((name, stream) for name, stream, _topic in dirty)}:  # (once a stream)
            self.touch(name, stream)
        if self._save(rows, [(name, stream, run) for (name, stream), run in runs.items()],
                      [(name, stream, *bound) for (name, stream), bound in began.items() if bound is not None],
                      [mark for mark, bound in began.items() if bound is None]):
            return True
        # refused: all of it is written with the next flush, but what was set again since.
        # Where a subscription began mid-stream, the run it follows, a read through and the
        # places it found (`begun_at`) are set once, not again as messages are handled (before,
        # lost: restarted with places recorded later and none of those, it read the history
        # of the topics it had not met from their start, or took their next for a gap)
        refused_tables: tuple[dict[Any, Any], ...] = (dirty, runs, began)  # (in `_unwritten_tables`' order)
        for unwritten, refused in zip(self._unwritten_tables(), refused_tables):
            for mark, value in refused.items():
                unwritten.setdefault(mark, value)
        return False

    def _unwritten_tables(self) -> tuple[dict[Any, Any], ...]:
        """What waits for the next `flush`: places, runs followed, where names began mid-stream."""
        return self._dirty, self._dirty_runs, self._dirty_began

    def _saved(self, name: str, stream: str, topic: str) -> list[int]:
        seq, upto, pos = self._places.get(name, {}).get(stream, {}).get(topic, (-1, -1, 0))
        return [seq, upto, pos]

    def _save(self, rows: list[tuple[str, str, str, int, int, int]], runs: list[tuple[str, str, str]],
              began: list[tuple[str, str, int, float | None]], read_through: list[tuple[str, str]]) -> bool:
        """Record ``rows``, ``runs``, ``began`` and ``read_through`` (`Cursors.save`); whether it could. A store that refuses (full, failing)
        is counted (``stats()["pubsub"]["durable_record_failed"]``) and logged at most every
        `RECORD_FAILED_LOG_S` (before, once per burst of handlers: 92 errors in 2 s for a
        store full at 20,000 topics): a subscriber restarted then resumes from the place
        recorded before, and gets again what it handled since, not all of it marked
        ``redelivered`` (the highest numbers reached were not recorded either); nothing is
        skipped. What was refused is written with the next flush (`flush`)."""
        try:
            self.store.cursors.save(rows, runs, began, read_through)
        except Exception as exc:
            self.stats.add("pubsub", "durable_record_failed")
            said = self._record_failed_log.due()
            if said:
                log.error("cannot record where durable subscriptions are (%d time(s) since the last such line; "
                          "counted in pubsub.durable_record_failed; said again at most every %g s): %s; restarted, "
                          "a subscriber gets again what it handled since its place was last recorded",
                          said, RECORD_FAILED_LOG_S, exc)
            return False
        return True
