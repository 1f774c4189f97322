"""Durable queues: the pusher's side. A durable push is committed to the node's store
before it returns; the loop deals stored messages to at-least-once pullers (through
`ReliableSender`) as they have room, oldest first, and forgets each one once a puller
acknowledged it. Messages still stored when the node starts (it was killed or stopped
before they were acknowledged) are dealt again, marked as redelivered.

A freshly committed message also goes straight into its queue's buffer in memory, so
the loop reads the store only for what does not fit there: a backlog past `BUFFER`
messages, the messages of an earlier run, dead letters.

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

__all__ = ["DurableQueues", "BUFFER"]

log = logging.getLogger("zmqmesh.durable")

BUFFER = 4096
"""Stored messages of one queue held in memory, ready to deal."""
_REFILL_BELOW = BUFFER // 4
_MAX_ERROR_CHARS = 1000
_ACK_BATCH = 2048
_COALESCE_S = 0.001
_ACK_DELAY_S = 0.05


class _Queue:
    """One durable queue's buffer, and whether the store holds more than the buffer."""

    __slots__ = ("buffer", "loaded", "overflow")

    def __init__(self) -> None:
        self.buffer: deque[StoredMessage] = deque()
        self.loaded = 0  # the highest sequence number ever put in the buffer
        self.overflow = False  # the store holds messages after `loaded` not in the buffer


class DurableQueues:
    """The durable queues of one node: `submit` from any thread, everything else on the loop."""

    def __init__(self, store: Store, codec: Codec, stats: Stats, wake: Callable[[], None],
                 later: Callable[[float, Callable[[], None]], Any], wake_soon: Callable[[float], None]) -> None:
        self.store = store
        self.codec = codec
        self.stats = stats
        self.wake = wake
        self.later = later
        self.wake_soon = wake_soon
        self._wake_pending = False
        self._acked: list[int] = []
        self._ack_timer: Any = None
        self.queues: dict[str, _Queue] = {}
        self._lock = threading.Lock()
        self._recovered_upto = 0

    def _queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue()
        return queue

    def _overflowed(self, name: str) -> None:
        with self._lock:
            self._queue(name).overflow = True

    def recover(self) -> int:
        """Note the messages left in the store by an earlier run; how many there are."""
        stored = self.store.queues()
        for name in stored:
            self._overflowed(name)
        self._recovered_upto = self.store.last_seq()
        total = sum(q["messages"] for q in stored.values())
        if total:
            log.info("%d durable message(s) in %d queue(s) left from an earlier run", total, len(stored))
        return total

    def submit(self, name: str, entries: list[tuple[str, float, bytes | None, bytes]]) -> None:
        """Commit ``(id, timestamp, headers, body)`` messages to the store in one transaction
        (any thread); the loop deals them. Raises `StoreFullError`, `StoreError`."""
        # one lock around the commit and the buffer: the order of sequence numbers and the
        # buffer (and the loop's refill) can then never disagree
        with self._lock:
            seqs = self.store.append([(name, *entry) for entry in entries])
            queue = self._queue(name)
            if queue.overflow or len(queue.buffer) + len(seqs) > BUFFER:
                queue.overflow = True
            else:
                queue.buffer.extend(StoredMessage(seq, name, *entry, 0) for seq, entry in zip(seqs, entries))
                queue.loaded = seqs[-1]
        if not self._wake_pending:
            # the loop deals durable messages a moment later, several to a batch: a
            # producer that commits one at a time would otherwise get batches of one
            self._wake_pending = True
            self.wake_soon(_COALESCE_S)

    def refill(self) -> dict[str, deque[StoredMessage]]:
        """Top up from the store the buffers of queues it holds more of; every buffer (loop only)."""
        self._wake_pending = False
        if not self.queues:  # the common case on a node with a store: nothing durable yet
            return {}
        recovered = self._recovered_upto
        with self._lock:
            for name, queue in self.queues.items():
                if not queue.overflow or len(queue.buffer) >= _REFILL_BELOW:
                    continue
                room = BUFFER - len(queue.buffer)
                rows = self.store.pending(name, after=queue.loaded, limit=room)
                queue.buffer.extend(dataclasses.replace(r, recovered=True) if r.seq <= recovered else r
                                    for r in rows)
                if rows:
                    queue.loaded = rows[-1].seq
                if len(rows) < room:
                    queue.overflow = False  # everything stored is in the buffer now
            return {name: q.buffer for name, q in self.queues.items()}

    def settle(self, queue: str, items: list[Any], failures: list[Failure]) -> list[Any]:
        """A puller answered for a batch: forget what it handled, dead-letter what it gave
        up on, count an attempt on the rest and return them to be dealt again."""
        failed = {f.position: f for f in failures}
        done = [item.seq for i, item in enumerate(items) if isinstance(item, StoredMessage) and i not in failed]
        retry: list[Any] = []
        attempted: list[int] = []
        if done:
            self._acked.extend(done)
            if len(self._acked) >= _ACK_BATCH:
                self.flush_acknowledged()
            elif self._ack_timer is None:
                self._ack_timer = self.later(_ACK_DELAY_S, self.flush_acknowledged)
        for index, failure in failed.items():
            item = items[index]
            if not isinstance(item, StoredMessage):
                continue
            if failure.dead_letter:
                try:
                    self._dead_letter(queue, item, failure)
                    continue
                except Exception as exc:  # e.g. a full store: deal it again rather than strand it
                    log.error("cannot dead-letter message %s of %r: %s", item.id[:12], queue, exc)
            attempted.append(item.seq)
            retry.append(dataclasses.replace(item, attempts=item.attempts + 1))
        if attempted:
            try:
                self.store.count_attempt(attempted)
            except Exception as exc:  # the count is lost, the messages are not
                log.error("cannot count failed deliveries of %r: %s", queue, exc)
        return retry

    def flush_acknowledged(self) -> None:
        """Delete the acknowledged messages from the store, in one transaction.

        Acknowledgements are gathered for up to `_ACK_DELAY_S` (or `_ACK_BATCH` of them):
        one delete per message would halve the rate of durable pushes. A crash before the
        delete only means those messages are delivered again (marked redelivered).
        """
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._acked:
            acked, self._acked = self._acked, []
            try:
                self.store.acknowledge(acked)
            except Exception as exc:  # they stay stored and are delivered again after a restart
                log.error("cannot forget %d acknowledged message(s): %s", len(acked), exc)

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
        dead = failure.dead_letter or f"{queue}.dead"
        self.store.move(item.seq, dead, self.codec.encode(headers))
        self._overflowed(dead)
        counters = self.stats.pattern["pipeline"]
        counters["dead_lettered"] = counters.get("dead_lettered", 0) + 1
        log.warning("message %s of %r dead-lettered to %r after %d attempt(s): %s",
                    item.id[:12], queue, dead, item.attempts + 1, failure.error[:200])
