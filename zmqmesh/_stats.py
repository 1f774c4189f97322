"""Counters a node keeps and `Node.stats()` reports: per pattern, per peer, and rejects by reason.

Each counter in `Stats.pattern` is written by one thread only: the event loop's (the
outbound sockets, membership, the requests of coroutines) or the inbox's (what arrives).
Those are plain ``+=`` on the hot paths. What other threads count (the requests of the
sync `Node`'s calling threads, rejects) goes through `Stats.add` and `Stats.reject`, which
take a lock, into counters of their own; `snapshot` adds the two up.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

__all__ = ["Stats", "PATTERNS"]

PATTERNS = ("pubsub", "pipeline", "request", "service", "zre")
_FIELDS = ("sent", "received", "dropped", "errors")


class Stats:
    """Mutable counters. ``stats.pattern["pipeline"]["sent"] += n`` from the counter's one
    writer thread; ``stats.add("request", "sent")`` where several threads write."""

    def __init__(self) -> None:
        self.pattern: dict[str, dict[str, int]] = {p: dict.fromkeys(_FIELDS, 0) for p in PATTERNS}
        self.peer_received: defaultdict[str, int] = defaultdict(int)
        self.rejected: defaultdict[str, int] = defaultdict(int)
        self.membership: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._shared: dict[tuple[str, str], int] = {}

    def add(self, pattern: str, counter: str, count: int = 1) -> None:
        """Add ``count`` to a pattern's counter from any thread (under a lock)."""
        with self._lock:
            key = (pattern, counter)
            self._shared[key] = self._shared.get(key, 0) + count

    def reject(self, reason: str, count: int = 1) -> None:
        """Count an input dropped for ``reason`` (malformed, oversized, unknown sender...)."""
        with self._lock:
            self.rejected[reason] += count

    def forget_peer(self, peer_id: str) -> None:
        """Drop the counters kept for a departed peer (a stranger's fresh ids must not
        pile up)."""
        self.peer_received.pop(peer_id, None)

    def snapshot(self) -> dict[str, Any]:
        """A plain-dict copy: ``{pattern: {sent, received, dropped, errors}, peers, rejected, membership}``."""
        with self._lock:
            patterns = {p: dict(c) for p, c in self.pattern.items()}
            for (pattern, counter), count in self._shared.items():
                patterns[pattern][counter] = patterns[pattern].get(counter, 0) + count
            return {
                **patterns,
                "peers": {pid: {"received": n} for pid, n in list(self.peer_received.items())},
                "rejected": dict(self.rejected),
                "membership": dict(self.membership),
            }
