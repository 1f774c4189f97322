"""Durable queues: the pusher's side. A durable push is committed to the node's store
before it returns; the loop deals stored messages to at-least-once pullers (through
`ReliableSender`) as they have room, oldest first, and forgets each one once a puller
acknowledged it. Messages still stored when the node starts (it was killed or stopped
before they were acknowledged) are dealt again, marked as redelivered.

A message whose handler failed comes back with one more attempt counted; the puller
names a dead-letter queue when it used up its deliveries, and the message moves there
(to the end of that durable queue) with headers saying why.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .._stats import Stats
from .._store.sqlite import Store, StoredMessage
from .._wire.codec import Codec
from .reliable import Failure

__all__ = ["DurableQueues", "DEAD_LETTER_HEADERS"]

log = logging.getLogger("zmqmesh.durable")

DEAD_LETTER_HEADERS = ("x-original-queue", "x-attempts", "x-last-error")
_BUFFER = 2048  # stored messages of one queue held in memory, ready to deal
_MAX_ERROR_CHARS = 1000


class DurableQueues:
    """The durable queues of one node: `submit` from any thread, everything else on the loop."""

    def __init__(self, store: Store, codec: Codec, stats: Stats, wake: Callable[[], None]) -> None:
        self.store = store
        self.codec = codec
        self.stats = stats
        self.wake = wake
        self.buffers: dict[str, deque[StoredMessage]] = {}
        self._loaded: dict[str, int] = {}
        self._generation: dict[str, int] = {}  # bumped by every submit: more may be stored
        self._clean: dict[str, int] = {}  # the generation up to which everything stored is loaded
        self._lock = threading.Lock()
        self._recovered_upto = 0

    def recover(self) -> int:
        """Note the messages left in the store by an earlier run; how many there are."""
        queues = self.store.queues()
        with self._lock:
            for queue in queues:
                self._generation[queue] = self._generation.get(queue, 0) + 1
        self._recovered_upto = self.store.last_seq()
        total = sum(q["messages"] for q in queues.values())
        if total:
            log.info("%d durable message(s) in %d queue(s) left from an earlier run", total, len(queues))
        return total

    def submit(self, queue: str, msg_id: str, timestamp: float, headers: bytes | None, body: bytes) -> None:
        """Commit one message to the store (any thread); the loop deals it. Raises
        `StoreFullError`, `StoreError`."""
        self.store.append([(queue, msg_id, timestamp, headers, body)])
        with self._lock:
            self._generation[queue] = self._generation.get(queue, 0) + 1
        self.wake()

    def backlog(self) -> int:
        """Stored messages loaded and waiting to be dealt."""
        return sum(len(b) for b in self.buffers.values())

    def refill(self) -> dict[str, deque[StoredMessage]]:
        """Top up each queue's buffer from the store, in order; the buffers (loop only)."""
        with self._lock:
            dirty = [(q, g) for q, g in self._generation.items() if self._clean.get(q) != g]
        for queue, generation in dirty:
            buffer = self.buffers.setdefault(queue, deque())
            room = _BUFFER - len(buffer)
            if room <= 0:
                continue
            rows = self.store.pending(queue, after=self._loaded.get(queue, 0), limit=room)
            if rows:
                self._loaded[queue] = rows[-1].seq
                recovered = self._recovered_upto
                buffer.extend(dataclasses.replace(r, recovered=True) if r.seq <= recovered else r for r in rows)
            if len(rows) < room:  # all that was stored when this generation began is loaded
                with self._lock:
                    self._clean[queue] = generation
        return self.buffers

    def settle(self, queue: str, items: list[Any], failures: list[Failure]) -> list[Any]:
        """A puller answered for a batch: forget what it handled, dead-letter what it gave
        up on, count an attempt on the rest and return them to be dealt again."""
        failed = {f.position: f for f in failures}
        done = [item.seq for i, item in enumerate(items) if isinstance(item, StoredMessage) and i not in failed]
        retry: list[Any] = []
        attempted: list[int] = []
        if done:
            self.store.acknowledge(done)
        for index, failure in failed.items():
            item = items[index]
            if not isinstance(item, StoredMessage):
                continue
            if failure.dead_letter:
                self._dead_letter(queue, item, failure)
            else:
                attempted.append(item.seq)
                retry.append(dataclasses.replace(item, attempts=item.attempts + 1))
        if attempted:
            self.store.count_attempt(attempted)
        return retry

    def _dead_letter(self, queue: str, item: StoredMessage, failure: Failure) -> None:
        headers: dict[str, str] = {}
        if item.headers:
            try:
                decoded = self.codec.decode(item.headers)
                headers = decoded if isinstance(decoded, dict) else {}
            except Exception:
                headers = {}
        headers.update({
            "x-original-queue": queue,
            "x-attempts": str(item.attempts + 1),
            "x-last-error": failure.error[:_MAX_ERROR_CHARS],
        })
        self.store.move(item.seq, failure.dead_letter or f"{queue}.dead", self.codec.encode(headers))
        with self._lock:
            dead = failure.dead_letter or f"{queue}.dead"
            self._generation[dead] = self._generation.get(dead, 0) + 1
        counters = self.stats.pattern["pipeline"]
        counters["dead_lettered"] = counters.get("dead_lettered", 0) + 1
        log.warning("message %s of %r dead-lettered to %r after %d attempt(s): %s",
                    item.id[:12], queue, failure.dead_letter, item.attempts + 1, failure.error[:200])
