"""The numbers a replaying subscription got plainly from streams it could not follow: the
streams of a durable name past its bound (`DurablePlaces.room`), or past the node's
cursors (`Replays._cursor`). Once such a stream is followed (room was made), its history
is read as the subscription's ``replay`` says, and what came plainly comes again: marked
``redelivered``, as a durable subscription marks what it may have handled before a crash
(`Cursor.upto`), not as duplicates no handler could tell.

Bounded: the streams noted last, at most `MAX_STREAMS` (the oldest noted go first), each
with at most `MAX_TOPICS` topics; what is not noted, past them, is counted
(``rejected["replay_plain_unnoted"]``): it would come again unmarked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._stats import Stats

if TYPE_CHECKING:
    from .cursor import Key

__all__ = ["PlainlyDelivered", "MAX_STREAMS", "MAX_TOPICS"]

MAX_STREAMS = 1_024
"""Streams (times subscriptions) whose plain deliveries are noted."""
MAX_TOPICS = 4_096
"""Topics noted per stream and subscription."""


class PlainlyDelivered:
    """The highest number delivered plainly, per subscription, stream and topic (the inbox's
    thread only)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        # (subscription, stream) -> (its options, topic -> the highest number), oldest noted first
        self._last: dict[tuple[Key, str], tuple[Any, dict[str, int]]] = {}

    def note(self, key: Key, options: Any, stream: str, topic: str, last: int) -> None:
        """Messages of ``topic`` up to number ``last`` of ``stream`` went plainly to the
        subscription ``key`` made with ``options`` (one made anew has options of its own)."""
        place = (key, stream)
        noted = self._last.pop(place, None)  # (noted last now: the oldest go first)
        if noted is None or noted[0] is not options:
            if len(self._last) >= MAX_STREAMS:
                oldest = next(iter(self._last))
                self.stats.reject("replay_plain_unnoted", len(self._last.pop(oldest)[1]))
            noted = (options, {})
        self._last[place] = noted
        topics = noted[1]
        if topic in topics or len(topics) < MAX_TOPICS:
            topics[topic] = max(topics.get(topic, -1), last)
        else:
            self.stats.reject("replay_plain_unnoted")

    def take(self, key: Key, options: Any, stream: str) -> dict[str, int]:
        """What went plainly of ``stream`` to the subscription ``key`` made with
        ``options``, per topic (the highest number), now forgotten: the stream is followed
        from here on."""
        noted = self._last.pop((key, stream), None)
        return noted[1] if noted is not None and noted[0] is options else {}

    def forget_unless(self, still_made: Callable[[Key, Any], bool]) -> None:
        """Forget what went to the subscriptions no longer made (``still_made`` says which are)."""
        for place in [p for p, (options, _topics) in self._last.items() if not still_made(p[0], options)]:
            del self._last[place]
