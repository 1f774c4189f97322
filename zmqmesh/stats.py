"""Counters a node keeps and `Node.stats()` reports: per pattern, per peer, and rejects by reason.

Each counter is written by one thread (the one owning the socket it counts), and read as a
snapshot; no lock is taken on the hot path.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

__all__ = ["Stats", "PATTERNS"]

PATTERNS = ("pubsub", "pipeline", "request", "service", "zre")
_FIELDS = ("sent", "received", "dropped", "errors")


class Stats:
    """Mutable counters. ``stats.pattern["pipeline"]["sent"] += n`` and friends."""

    def __init__(self) -> None:
        self.pattern: dict[str, dict[str, int]] = {p: dict.fromkeys(_FIELDS, 0) for p in PATTERNS}
        self.peer_received: defaultdict[str, int] = defaultdict(int)
        self.rejected: defaultdict[str, int] = defaultdict(int)
        self.membership: defaultdict[str, int] = defaultdict(int)

    def reject(self, reason: str, count: int = 1) -> None:
        """Count an input dropped for ``reason`` (malformed, oversized, unknown sender...)."""
        self.rejected[reason] += count

    def snapshot(self) -> dict[str, Any]:
        """A plain-dict copy: ``{pattern: {sent, received, dropped, errors}, peers, rejected, membership}``."""
        return {
            **{p: dict(c) for p, c in self.pattern.items()},
            "peers": {pid: {"received": n} for pid, n in list(self.peer_received.items())},
            "rejected": dict(self.rejected),
            "membership": dict(self.membership),
        }
