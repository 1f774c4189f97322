"""A node's topic subscriptions, the subscriber's side of pub/sub: the prefixes its SUB
socket takes, the handlers each topic name reaches, and the publications lost on the way
(a gap in a publisher's numbers).

The handlers of a topic name are looked up once and cached until the registry changes
(`Subscriptions.handlers`, called per frame received); replaying subscriptions are
named apart, for `Replays` sequences their messages. Each replaying subscription also
subscribes a replay marker of its own right after its prefix (`Subscriptions.markers`):
each publisher that keeps topics answers it with the position from which everything it
keeps comes live (`MARKER_PREFIX`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from ..._mesh.directory import Directory
from ..._mesh.registry import Registry, SubscribeOptions
from ..._stats import LogThrottle, Stats
from ..._wire.frames import replay_marker
from ..pubsub import GapCounter

__all__ = ["MAX_CACHED_TOPICS", "PrefixIndex", "Subscriptions"]

log = logging.getLogger("zmqmesh.inbox")

_LOST_LOG_S = 10.0  # publications lost at a high-water mark (a gap in a topic's numbers) are logged at most this often
MAX_CACHED_TOPICS = 4096  # topic names whose handlers are cached (past it, the cache starts afresh)

TopicHandlers = tuple[str, list[Callable[..., Any]], list[tuple[Any, Any]]]
"""``(topic, handlers, replaying subscriptions)``: see `Subscriptions.handlers`."""


class PrefixIndex:
    """The prefixes of a node's subscriptions, by length: the prefixes a topic name starts
    with are found with a lookup per distinct length, not a look at each subscription
    (a subscriber of thousands of prefixes meets a new topic name at that cost)."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        self._order = {prefix: i for i, prefix in enumerate(prefixes)}
        by_length: dict[int, set[str]] = {}
        for prefix in self._order:
            by_length.setdefault(len(prefix), set()).add(prefix)
        self._by_length = sorted(by_length.items())

    def matching(self, topic: str) -> list[str]:
        """The prefixes ``topic`` starts with, in the order they were given."""
        found = [head for length, prefixes in self._by_length if (head := topic[:length]) in prefixes]
        if len(found) > 1:
            found.sort(key=self._order.__getitem__)
        return found


class Subscriptions:
    """The topics this node subscribes to, as the registry has them (the inbox's owner
    thread only): the SUB socket's prefixes (`apply`), each topic's handlers (`handlers`),
    and the publications lost on the way (`gaps`, `lost`)."""

    def __init__(self, registry: Registry, directory: Directory, stats: Stats) -> None:
        self.registry = registry
        self.stats = stats
        self.gaps = GapCounter(directory)
        self.subscribed: set[str] = set()
        """The prefixes the SUB socket takes, as of the last `apply`."""
        self._topic_cache: dict[bytes, TopicHandlers] = {}
        self._cache_version = -1
        self._prefixes = PrefixIndex({})  # the registry's topic prefixes, as of `_cache_version`
        self._lost_log = LogThrottle(_LOST_LOG_S)  # (`lost`)
        self.markers: dict[bytes, tuple[tuple[str, Callable[..., Any]], SubscribeOptions]] = {}
        """The replay markers the SUB socket takes, as of the last `apply`: the replaying
        subscription (its key and options) each follows."""
        self._node_id = directory.node_id
        self._numbered = 0  # the markers made so far (each new one is numbered past them)

    def apply(self, sub: zmq.Socket[Any]) -> bool:
        """Bring the subscriptions of ``sub`` in line with the registry; whether they changed
        (the socket was used: its descriptor may not signal what it holds). Raises
        `zmq.ZMQError` if ``sub`` is closed."""
        wanted = set(self.registry.topics)
        added = wanted - self.subscribed
        for prefix in added:
            sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        if added:  # (a gap in their numbers since they were last received is no loss)
            self.gaps.forget_topics([p.encode() for p in added], [p.encode() for p in wanted & self.subscribed])
        for prefix in self.subscribed - wanted:
            sub.setsockopt(zmq.UNSUBSCRIBE, prefix.encode())
        changed = wanted != self.subscribed
        self.subscribed = wanted
        return self._apply_markers(sub) or changed

    def _apply_markers(self, sub: zmq.Socket[Any]) -> bool:
        """Subscribe a replay marker of its own for each replaying subscription new since
        the last call, after its prefix (the SUB sends it to each publisher after it), and
        unsubscribe those of the subscriptions dropped or made anew; whether any changed."""
        replays = self.registry.replays
        followed = {key: (options, marker) for marker, (key, options) in self.markers.items()}
        changed = False
        for marker, (key, options) in list(self.markers.items()):
            if replays.get(key) is not options:
                sub.setsockopt(zmq.UNSUBSCRIBE, marker)
                del self.markers[marker]
                changed = True
        for key, options in replays.items():
            known = followed.get(key)
            if known is None or known[0] is not options:
                self._numbered += 1
                marker = replay_marker(self._node_id, self._numbered)
                sub.setsockopt(zmq.SUBSCRIBE, marker)
                self.markers[marker] = (key, options)
                changed = True
        return changed

    def handlers(self, name_b: bytes) -> TopicHandlers:
        """``(topic, handlers, replaying subscriptions)`` for a topic (cached until the
        registry changes): replaying subscriptions are sequenced by `Replays`, not here."""
        registry = self.registry
        if self._cache_version != registry.version:
            self._topic_cache.clear()
            self._prefixes = PrefixIndex(registry.topics)
            self._cache_version = registry.version
        elif len(self._topic_cache) > MAX_CACHED_TOPICS:
            self._topic_cache.clear()
        hit = self._topic_cache.get(name_b)
        if hit is None:
            topic = name_b.decode("utf-8", "replace")
            replays = registry.replays
            topics = registry.topics
            handlers = [h for prefix in self._prefixes.matching(topic) for h in topics[prefix]
                        if (prefix, h) not in replays]
            replaying = [(key, options) for key, options in replays.items() if topic.startswith(key[0])]
            hit = self._topic_cache[name_b] = (topic, handlers, replaying)
        return hit

    def lost(self, lost: int, name_b: bytes, sender: bytes) -> None:
        """Count ``lost`` publications of topic ``name_b`` from ``sender`` (a uuid) that never came
        (a gap in the topic's numbers: dropped at a high-water mark, the publisher's or this
        node's) in ``pubsub.dropped``, and log them at most every `_LOST_LOG_S`; not those
        of a topic only replaying subscriptions take (they read them from the history)."""
        self.stats.pattern["pubsub"]["dropped"] += lost
        if not self.handlers(name_b)[1]:
            return
        said = self._lost_log.due(lost)
        if said:
            log.warning("%d publication(s) lost at a high-water mark since the last such line (this subscriber "
                        "fell behind its publishers: handlers too slow, or pub_hwm/recv_hwm too low), the last of "
                        "%r from %s; counted in pubsub.dropped; said again at most every %g s",
                        said, name_b.decode("utf-8", "replace"), sender.hex()[:8], _LOST_LOG_S)

    def durable_only(self, frames: list[bytes]) -> bool:
        """Whether a publication (its ``frames``) goes to durable subscriptions only: left
        unread at a stop, it comes again after a restart (the subscriptions read it from
        the history)."""
        _topic, handlers, replaying = self.handlers(frames[0])
        return not handlers and any(options.durable_name is not None for _key, options in replaying)
