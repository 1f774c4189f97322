"""Kept topics, the publisher's side: what ``history=`` keeps, numbered for good.

A publisher with ``history={"logs.": 100_000}`` keeps, in its store, the frames it sends
on the topics under ``logs.``: each frame a row, committed before it is sent, so that what
any subscriber saw live is also in the history. The messages of a kept topic are numbered
from the store (the numbering goes on across restarts), so a subscriber can say where it
is in a topic and resume there. The store's stream id names the history across runs.

The numbering of a topic of which nothing is kept any more (its messages all expired)
stays for the `MAX_EMPTY_TOPICS` emptied last; past them it is forgotten: a publisher of
one topic per order id kept a number for each for good (400,000 topics: 32 MiB of store,
85 MiB of memory). A topic numbered afresh begins at the store's floor, past every number
a forgotten topic reached, so that no number of a topic is ever given twice; a replay
learns where it began from the topic's first live frame when that carries headers
(`began`), or else a page of the history (``"start"``).

`History` decides and records (the loop's thread); subscribers read it through the
built-in service ``\\x00history`` (`page`), answered on the inbox's thread.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .._stats import LogThrottle, Stats
from ..config import HistoryPolicy

if TYPE_CHECKING:
    from .._store.store import Store

__all__ = ["History", "PAGE_ROWS"]

log = logging.getLogger("zmqmesh.history")

PAGE_ROWS = 2048
"""Frames in one page of a replay, at most."""
_TRIM_SLACK = 0.05  # a topic is trimmed once it holds this much more than its limit
_MAX_CACHED_TOPICS = 65_536
FAILURE_LOG_S = 10.0
"""A history that keeps failing (a full store) logs one error at first, then one at most
this often, with what it could not keep meanwhile (each failure is counted all the same)."""
MAX_EMPTY_TOPICS = 65_536
"""Topics of which nothing is kept any more (every message expired) whose numbering is kept
(a replay then sees what it missed of them as a gap); past them, the numbering of those
emptied longest ago is forgotten (counted: ``history_topics_forgotten``)."""


class History:
    """The kept topics of one publisher (loop thread, but `page`, which any thread may call)."""

    def __init__(self, store: Store, policies: tuple[HistoryPolicy, ...], stats: Stats) -> None:
        self.store = store
        self.policies = policies
        self.stats = stats
        self.stream_id = store.stream_id
        self.runs = store.runs  # (this run's token first: see `Store.runs`)
        self._policy_of: dict[bytes, HistoryPolicy | None] = {}
        state = store.history.state()
        self._first = {t.encode(): first for t, (first, _next) in state.items()}  # (may lag: trims go by it)
        self._next = {t.encode(): nxt for t, (_first, nxt) in state.items()}
        try:  # (the numbering of topics with nothing kept, left by a version before this or a crash)
            self._forget(*store.history.forget_emptied(MAX_EMPTY_TOPICS))
        except Exception as exc:  # (a full disk: forgotten at the next expiry instead)
            log.warning("cannot forget the numbering of topics no longer kept: %s", exc)
            self._floor = store.history.floor()
        self._rows: list[tuple[int, str, int, int, float, bytes, bytes | None]] = []
        self.upcoming = store.history.last_position() + 1
        """The history position the next frame `record` keeps is given (its publisher says
        it on the frame's meta frame, ``"p"``, built before the frame is kept)."""
        self.began = False
        """Set by `number` when it numbered a topic afresh from a floor above 0, for its
        publisher to say so on the topic's first frame (and to clear)."""
        self._fresh: set[bytes] = set()  # topics numbered afresh since the last commit
        self._failures_log = LogThrottle(FAILURE_LOG_S)  # (`_failed`)

    def policy(self, topic: bytes) -> HistoryPolicy | None:
        """The policy that keeps ``topic``, if any."""
        try:
            return self._policy_of[topic]
        except KeyError:
            pass
        name = topic.decode("utf-8", "replace")
        found = next((p for p in self.policies if name.startswith(p.prefix)), None)
        if len(self._policy_of) >= _MAX_CACHED_TOPICS:
            self._policy_of.clear()
        self._policy_of[topic] = found
        return found

    def number(self, topic: bytes, count: int) -> int:
        """The number of the first of ``count`` messages about to be sent on a kept topic;
        a topic numbered afresh begins at the floor (past 0: `began` set)."""
        seq = self._next.get(topic)
        if seq is None:
            seq = self._first[topic] = self._floor
            self.began = seq > 0
            self._fresh.add(topic)
        self._next[topic] = seq + count
        return seq

    def record(self, topic: bytes, seq: int, count: int, payload: bytes, meta: bytes | None) -> None:
        """Keep a frame about to be sent (committed by `commit`, before it is sent), at the
        position `upcoming`, which then goes on to the next."""
        self._rows.append((self.upcoming, topic.decode("utf-8", "replace"), seq, count, time.time(), payload, meta))
        self.upcoming += 1

    def commit(self) -> bool:
        """Store the recorded frames in one transaction, then trim what grew past its
        limit. False if the store refused them (full, failing): then their numbers are
        taken back, and so are their positions, and they must not be sent (logged, counted
        as ``history_failed``), so that no subscriber ever sees a message its publisher's
        history lacks. A topic they began is numbered afresh again, and says so on its next
        first frame."""
        rows, self._rows = self._rows, []
        fresh, self._fresh = self._fresh, set()
        if not rows:
            return True
        try:
            self.store.history.keep_placed(rows)
        except Exception as exc:
            self.upcoming = rows[0][0]  # (the transaction gave none of them: the store is this node's alone)
            for _pos, topic, seq, *_rest in rows:
                key = topic.encode()
                if key in fresh:
                    self._next.pop(key, None)
                else:
                    self._next[key] = min(self._next.get(key, seq), seq)
            self._failed(sum(r[3] for r in rows), exc)
            return False
        for topic in {r[1] for r in rows}:
            self._trim(topic.encode())
        return True

    def _failed(self, count: int, exc: Exception) -> None:
        """Count ``count`` messages the history could not keep; log it, at most once per
        `FAILURE_LOG_S` (a full store refuses every commit, one or more a pass of the loop)."""
        self.stats.add("pubsub", "history_failed", count)
        said = self._failures_log.due(count)
        if said:
            log.error("cannot keep %d published message(s) in the history, not sent (counted in "
                      "pubsub.history_failed; said again at most every %g s): %s", said, FAILURE_LOG_S, exc)

    def _trim(self, topic: bytes) -> None:
        policy = self.policy(topic)
        if policy is None:
            return
        first, nxt = self._first.get(topic, 0), self._next.get(topic, 0)
        if nxt - first <= policy.max_messages * (1 + _TRIM_SLACK):
            return
        keep_from = nxt - policy.max_messages
        try:
            self.store.history.trim(topic.decode("utf-8", "replace"), keep_from)
            self._first[topic] = keep_from
        except Exception as exc:
            log.error("cannot trim the history of %r: %s", topic, exc)

    def expire(self) -> None:
        """Forget what is older than the policies keep (called every second or so); a topic
        under a longer prefix follows that prefix's rule only."""
        now = time.time()
        for policy in self.policies:
            if policy.max_age_s is not None:
                longer = [p.prefix for p in self.policies if len(p.prefix) > len(policy.prefix)
                          and p.prefix.startswith(policy.prefix)]
                try:
                    self._forget(*self.store.history.expire(policy.prefix, now - policy.max_age_s, longer,
                                                            keep_empty=MAX_EMPTY_TOPICS))
                except Exception as exc:
                    log.error("cannot expire the history under %r: %s", policy.prefix, exc)

    def _forget(self, forgotten: list[str], floor: int) -> None:
        """The store forgot the numbering of the topics ``forgotten``, of which nothing was
        kept any more, past `MAX_EMPTY_TOPICS` (a topic per order id kept its numbers for
        good). A topic numbered again begins at ``floor``, past every number given before,
        and says so to a replay (``"start"``): no subscriber takes new messages for ones
        it saw."""
        self._floor = floor
        if not forgotten:
            return
        log.info("forgot the numbering of %d topic(s) of which nothing was kept any more (past %d such "
                 "topics); numbered again, they begin at %d", len(forgotten), MAX_EMPTY_TOPICS, floor)
        for topic in forgotten:
            key = topic.encode()
            self._next.pop(key, None)
            self._first.pop(key, None)
        self.stats.add("pubsub", "history_topics_forgotten", len(forgotten))

    def page(self, prefix: str, after_pos: int, since_ts: float | None, max_bytes: int,
             max_rows: int = PAGE_ROWS, next_from: str | None = None) -> dict[str, Any]:
        """One page of a replay (the reply of ``\\x00history``): ``{"rows": [(pos, topic, seq,
        count, ts, payload, meta), ...], "more": bool}`` (each row travels as a msgpack
        array) with at most ``max_rows`` rows (none: a look at ``next`` alone); the last page
        (``more`` false) also has ``"next": {topic: the number of the next message}``, as it
        was when its rows were read. (The pages before it leave ``next`` out: a reader
        applies it once caught up, and with many topics it outweighed the rows.) ``"start":
        {topic: number}`` says where the numbering of the topics of its rows began, for
        those that began past 0 (numbered after others were forgotten: `_forget`).

        Given ``next_from`` (a reader that takes ``next`` in pieces), ``next`` holds only
        the topics from that one on, in order, in what ``max_bytes`` leaves of the rows (one
        at least), and ``"next_from"`` names the first topic left out, if one was: the
        reader asks for the rest from there. Without it, ``next`` is whole, however large
        (a reader before pieces takes a map that lacks a topic for one forgotten). Raises
        `StoreError`."""
        if max_rows <= 0:
            if next_from is None:
                return {"rows": [], "more": False, "next": self.store.history.numbering(prefix)}
            piece, rest = self.store.history.numbering_piece(prefix, next_from, max_bytes)
            return _with_rest({"rows": [], "more": False, "next": piece}, rest)
        rows, nxt, starts, rest = self.store.history.read(prefix, after_pos, since_ts, min(max_rows, PAGE_ROWS),
                                                          max_bytes, next_from)
        page: dict[str, Any] = {"rows": rows, "more": True} if nxt is None else {"rows": rows, "more": False, "next": nxt}
        if starts:
            page["start"] = starts
        return _with_rest(page, rest)


def _with_rest(page: dict[str, Any], rest: str | None) -> dict[str, Any]:
    """``page``, with ``"next_from"``: ``rest``, if its ``next`` is a piece that more follow."""
    if rest is not None:
        page["next_from"] = rest
    return page
