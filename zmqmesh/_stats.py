"""Counters a node keeps and `Node.stats()` reports: per pattern, per name (topic, queue,
service), per peer, rejects by reason, and request latencies per service.

Each counter in `Stats.pattern` is written by one thread only: the event loop's (the
outbound sockets, membership, the requests of coroutines) or the inbox's (what arrives).
Those are plain ``+=`` on the hot paths. What other threads count (rejects, the requests
of the sync `Node`'s calling threads) goes, under a lock, into counters of their own:
through `Stats.add` and `Stats.reject`, or gathered by the calling thread's driver in a
`RequestTally` and added in one go (`Stats.add_tally`); `snapshot` adds the two up, and
what the tallies it tracks (`Stats.track`) hold meanwhile. Counts
per name go to a `NameCounts` per pattern and direction, added to per frame by its one
writer thread (or under the lock, from callers' threads); latencies are recorded per call,
under the lock, or gathered in a `RequestTally` too.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

__all__ = ["Stats", "RequestTally", "LogThrottle", "PATTERNS", "TALLY_FOLD_AT"]

PATTERNS = ("pubsub", "pipeline", "request", "service", "zre")
_FIELDS = ("sent", "received", "dropped", "errors")
MAX_NAMES = 256
"""Names counted per pattern and direction (a received topic may be any under a prefix
subscribed to); past it, their counts go to the name ``"(other)"``."""
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)
"""Upper bounds (seconds) of the request latency histogram's buckets (and +Inf)."""
OTHER = "(other)"
REQUEST_OUTCOMES = ("received", "errors", "abandoned")
"""The request pattern's counters of how each request sent ended, once each: a reply
reached its caller (``received``); none will (``errors``: it timed out, its provider left,
the node stopped); its caller stopped waiting first (``abandoned``: a coroutine cancelled,
a blocking call interrupted by a signal, the requests of a ``request_many`` still in
flight when one of its items failed). ``sent``
is their sum, plus the requests in flight. (``dropped`` counts replies that reached
nobody: a late reply, one to an abandoned request; not requests.)"""
_IN_ORDER_FROM = 8
"""Samples from which `_observe` sorts them and counts each bucket's share by one bisection
of them (`_count_in_order`), rather than one bisection of the bounds per sample: five
comparisons of Python floats each (a tally's 256: 1,500 instructions a sample, 330 in
order; one by one is the cheaper below 5 samples, and 8 leaves a margin)."""
TALLY_FOLD_AT = 256
"""Requests a calling thread's tally gathers before its driver adds them to the stats
(`Stats.add_tally`; added after each request, they took 10 us of a 200 us round trip
here). Meanwhile `Stats.snapshot` counts what the tracked tally holds."""


class NameCounts:
    """Messages per name (topic, queue or service, as text or UTF-8 bytes), written by
    one thread; past `MAX_NAMES` names, counted under ``"(other)"``. (It holds a plain
    dict, ``counts``: a dict subclass's subscript goes through a slot wrapper, at five
    times a plain dict's cost, and a provider counts every request it serves here.)"""

    __slots__ = ("counts",)

    def __init__(self, counts: dict[str | bytes, int] | None = None) -> None:
        self.counts: dict[str | bytes, int] = {} if counts is None else counts  # (held, not copied)

    def add(self, name: str | bytes, count: int) -> None:
        """Count ``count`` messages under ``name``."""
        counts = self.counts
        try:
            counts[name] += count
        except KeyError:
            if len(counts) >= MAX_NAMES:
                name = OTHER
            counts[name] = counts.get(name, 0) + count

    def copy(self) -> dict[str | bytes, int]:
        """The counts so far, in a plain dict (one C call: safe while the writer thread adds)."""
        return self.counts.copy()


class RequestTally:
    """Requests sent and how long their callers waited, per service, and the request
    pattern's counters (``counts``: requests sent and replies received), gathered by one
    driver's thread without a lock (a lock per request cost more than the rest of a
    pipelined request's bookkeeping), for `Stats.add_tally` to add up every
    `TALLY_FOLD_AT` requests sent (`Stats.count_sent`)."""

    __slots__ = ("sent", "waited", "counts")

    def __init__(self) -> None:
        # (defaultdicts: a request adds to its service's entry without a `get` first)
        self.sent: defaultdict[str, int] = defaultdict(int)
        self.waited: defaultdict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.sent or self.waited or self.counts)


class Stats:
    """Mutable counters. ``stats.pattern["pipeline"]["sent"] += n`` from the counter's one
    writer thread; ``stats.add("request", "sent")`` where several threads write."""

    def __init__(self) -> None:
        self.pattern: dict[str, dict[str, int]] = {p: dict.fromkeys(_FIELDS, 0) for p in PATTERNS}
        self.pattern["request"].update(dict.fromkeys(REQUEST_OUTCOMES, 0))
        self.peer_received: defaultdict[str, int] = defaultdict(int)
        self.rejected: defaultdict[str, int] = defaultdict(int)
        self.membership: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._shared: dict[tuple[str, str], int] = {}
        self._names: dict[tuple[str, str], NameCounts] = {}
        self._latency: dict[str, list[float]] = {}  # service -> per-bucket counts, then sum, count
        self._tracked: list[RequestTally] = []

    def add(self, pattern: str, counter: str, count: int = 1) -> None:
        """Add ``count`` to a pattern's counter from any thread (under a lock)."""
        with self._lock:
            key = (pattern, counter)
            self._shared[key] = self._shared.get(key, 0) + count

    def reject(self, reason: str, count: int = 1) -> None:
        """Count an input dropped for ``reason`` (malformed, oversized, unknown sender...)."""
        with self._lock:
            self.rejected[reason] += count

    def names(self, pattern: str, direction: str) -> NameCounts:
        """The counts per name of ``pattern`` messages sent or received (``direction``),
        for their one writer thread to `NameCounts.add` to."""
        with self._lock:
            return self._names_of(pattern, direction)

    def count_name(self, pattern: str, direction: str, name: str | bytes, count: int = 1) -> None:
        """Add ``count`` messages under ``name`` from any thread (under the lock)."""
        with self._lock:
            self._names_of(pattern, direction).add(name, count)

    def _names_of(self, pattern: str, direction: str) -> NameCounts:
        counts = self._names.get((pattern, direction))
        if counts is None:
            counts = self._names[(pattern, direction)] = NameCounts()
        return counts

    def observe_request(self, service: str, seconds: float) -> None:
        """Record how long a call of ``service`` took, until its answer."""
        with self._lock:
            _observe(self._latency, service, (seconds,))

    def count_sent(self, tally: RequestTally, count: int) -> None:
        """Count ``count`` requests sent into ``tally`` (from its writer thread), and add it
        up (`add_tally`) once it holds `TALLY_FOLD_AT` of them. Every request a tally records
        was sent, so this bounds what it holds."""
        counts = tally.counts
        sent = counts["sent"] = counts.get("sent", 0) + count
        if sent >= TALLY_FOLD_AT:
            self.add_tally(tally)

    def add_tally(self, tally: RequestTally) -> None:
        """Add up what ``tally`` gathered (requests sent per service, latencies, the request
        pattern's counters), and empty it: from its writer thread, or from another once that
        thread is done with it (`untrack`)."""
        with self._lock:  # (emptied under the lock too: a snapshot never counts it twice)
            _fold(tally, self._names_of("request", "sent"), self._latency, self._shared)
            tally.sent.clear()
            tally.waited.clear()
            tally.counts.clear()

    def track(self, tally: RequestTally) -> None:
        """Count what ``tally`` holds in every `snapshot`, before it is added up: for a
        tally its thread adds only now and then (`TALLY_FOLD_AT`)."""
        with self._lock:
            self._tracked.append(tally)

    def untrack(self, tally: RequestTally) -> None:
        """Add up what ``tally`` still holds, and stop tracking it (its thread is done with
        it)."""
        self.add_tally(tally)
        with self._lock:
            if tally in self._tracked:
                self._tracked.remove(tally)

    def forget_peer(self, peer_id: str) -> None:
        """Drop the counters kept for a departed peer (a stranger's fresh ids must not
        pile up)."""
        self.peer_received.pop(peer_id, None)

    def snapshot(self) -> dict[str, Any]:
        """A plain-dict copy: ``{pattern: {sent, received, dropped, errors, ...}, peers,
        rejected, membership, names, latency}`` (safe to take from any thread)."""
        with self._lock:
            shared, all_names, all_latency = self._shared, self._names, self._latency
            if self._tracked:  # what tracked tallies hold, on copies (their threads write them meanwhile)
                shared, all_names, all_latency = dict(shared), dict(all_names), {
                    service: list(b) for service, b in all_latency.items()}
                kept = all_names.get(("request", "sent"))
                sent = all_names[("request", "sent")] = NameCounts(None if kept is None else kept.copy())
                for tally in self._tracked:
                    _fold(tally, sent, all_latency, shared)
            patterns = {p: dict(c) for p, c in self.pattern.items()}
            for (pattern, counter), count in shared.items():
                patterns[pattern][counter] = patterns[pattern].get(counter, 0) + count
            names: dict[str, dict[str, dict[str, int]]] = {}
            for (pattern, direction), counts in list(all_names.items()):
                copied = counts.copy()
                shown = names.setdefault(pattern, {})[direction] = {}
                for n, c in copied.items():  # (added up: names of bytes that read alike, as U+FFFD, are one)
                    text = n.decode("utf-8", "replace") if isinstance(n, bytes) else n
                    shown[text] = shown.get(text, 0) + c
            latency = {service: {"buckets": [[bound, int(c)] for bound, c in zip((*LATENCY_BOUNDS, "+Inf"), b)],
                                 "sum": b[-2], "count": int(b[-1])}
                       for service, b in all_latency.items()}
            return {
                **patterns,
                "peers": {pid: {"received": n} for pid, n in list(self.peer_received.items())},
                "rejected": dict(self.rejected),
                "membership": dict(self.membership),
                "names": names,
                "latency": latency,
            }


class LogThrottle:
    """At most one log line per ``every_s`` seconds for an event that may come at the
    message rate (a full store refuses every commit; a peer's limit refuses every large
    message): the caller counts each event as it comes, and says how many there were since
    the last line when `due` lets it. One owner (not thread-safe)."""

    __slots__ = ("every_s", "_unlogged", "_logged_at")

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._unlogged = 0
        self._logged_at = float("-inf")

    def due(self, count: int = 1) -> int:
        """Note ``count`` more events; how many to say in a line now (those since the last
        line, these included), or 0: a line was said less than ``every_s`` ago."""
        self._unlogged += count
        now = time.monotonic()
        if now - self._logged_at < self.every_s:
            return 0
        said, self._unlogged, self._logged_at = self._unlogged, 0, now
        return said


def _fold(tally: RequestTally, sent_names: NameCounts, latency: dict[str, list[float]],
          shared: dict[tuple[str, str], int]) -> None:
    """Add what ``tally`` holds to the counters given (the lock held). It is read in copies,
    each taken in one C call: its thread may write it meanwhile."""
    for service, count in tally.sent.copy().items():
        sent_names.add(service, count)
    for service, waited in list(tally.waited.items()):
        _observe(latency, service, waited.copy())
    for counter, count in tally.counts.copy().items():
        shared[("request", counter)] = shared.get(("request", counter), 0) + count


def _observe(latency: dict[str, list[float]], service: str, waited: Sequence[float]) -> None:
    """Add the calls of ``service`` that took ``waited`` seconds each to ``latency``'s buckets."""
    buckets = latency.get(service)
    if buckets is None:
        if len(latency) >= MAX_NAMES:
            service = OTHER
        buckets = latency.setdefault(service, [0.0] * (len(LATENCY_BOUNDS) + 3))
    if len(waited) < _IN_ORDER_FROM:
        bucket_of, bounds = bisect.bisect_left, LATENCY_BOUNDS  # (names looked up once)
        for seconds in waited:
            buckets[bucket_of(bounds, seconds)] += 1
    else:
        _count_in_order(buckets, sorted(waited))
    buckets[-2] += sum(waited)
    buckets[-1] += len(waited)


def _count_in_order(buckets: list[float], ordered: list[float]) -> None:
    """Add the samples ``ordered`` (sorted) to ``buckets``: each bucket's share is one
    bisection of them, from where the bucket before ended, up to the bucket of the longest."""
    placed, count = 0, len(ordered)
    for i, bound in enumerate(LATENCY_BOUNDS):
        if placed == count:
            return
        upto = bisect.bisect_right(ordered, bound, placed)  # (a bucket holds what is <= its bound)
        buckets[i] += upto - placed
        placed = upto
    buckets[len(LATENCY_BOUNDS)] += count - placed  # (+Inf)
