"""The send side of a node on its loop: when to flush the pub/sub, pipeline and
at-least-once queues, and what to do when a socket cannot take more.

Publishing and pushing never cross threads per message: callers encode and append to a
queue, and the loop sends whatever has accumulated, several messages to one frame, as
soon as it gets to it (it never waits for a batch to fill).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .._io.reactor import EventLoop
from .._mesh.directory import Directory
from .._mesh.waiters import Space
from .._patterns.pipeline import Pusher
from .._patterns.pubsub import Publisher
from .._patterns.reliable import ReliableSender
from ..errors import ZmqMeshError

if TYPE_CHECKING:
    from .._patterns.durable import DurableQueues

__all__ = ["Outbound"]

log = logging.getLogger("zmqmesh.node")

_RETRY_S = 0.002
_RETRY_MAX_S = 0.064
"""A flush that a socket (or a window) refused is tried again after `_RETRY_S`, and the
delay doubles, up to this, while the tries send nothing: ZeroMQ wakes the loop itself once
the socket takes again (`Pusher`'s reader of it), as acknowledgements do for windows; the
retry only covers what else may wait. Pushes of 1 MiB, of which ZeroMQ takes 50 at a time
(half of ``queue_hwm``) every 15 ms or so, came back to the full socket every 2 ms, in
vain 15 times out of 16: the loop's thread spent 45 us of CPU a message, 16 us now."""
FLUSH_SLICE_S = 0.01
"""How long one flush of the send queues goes on at most before the loop's other work
(timers, heartbeats, replies) gets its turn: callers that keep a queue full would otherwise
keep the loop sending for as long as they go on (0.8 s at a time was seen, pushing 64 KiB
payloads). What is left goes at the loop's next turn."""


class Outbound:
    """Schedules flushes of every outbound queue on the loop; `wake` works from any thread."""

    def __init__(self, loop: EventLoop, loop_thread: int, directory: Directory, space: Space) -> None:
        self.loop = loop
        self.loop_thread = loop_thread
        self.directory = directory
        self.space = space
        self.publisher: Publisher | None = None
        self.pusher: Pusher | None = None
        self.reliable: ReliableSender | None = None
        self.durable: DurableQueues | None = None
        self.handing_over = False  # a stopping node deals durable messages to keepers only
        self.scheduled = False
        """True from a `wake` until the flush it scheduled runs: another `wake` has nothing
        to do meanwhile (a caller on a hot path may look before calling it)."""
        self._retry: Any = None
        self._retry_s = _RETRY_S  # (the next retry's delay: `_RETRY_MAX_S`)
        # queues seen with at-least-once pullers: what waits for them is never dropped, however
        # long their pullers are away (a plain queue's is, `Pusher.flush`); pruned to the
        # queues with a socket
        self._at_least_once: set[str] = set()

    def attach(self, publisher: Publisher, pusher: Pusher, reliable: ReliableSender,
               durable: DurableQueues | None) -> None:
        """The pattern senders to flush (``durable`` only with a store)."""
        self.publisher, self.pusher, self.reliable, self.durable = publisher, pusher, reliable, durable

    def wake(self) -> None:
        """Have the loop send what is queued, soon (from any thread)."""
        if self.scheduled:
            return
        self.scheduled = True
        try:
            if threading.get_ident() == self.loop_thread:
                self.loop.call_soon(self.flush)
            else:
                self.loop.call_soon_threadsafe(self.flush)
        except RuntimeError:  # the loop is closed
            self.scheduled = False

    def queued(self) -> int:
        """Messages not yet sent, or sent at-least-once and not yet acknowledged; durable
        messages count while a puller is there to take them (the others are kept)."""
        if self.publisher is None or self.pusher is None or self.reliable is None:
            return 0

        def pulled(queue: str) -> bool:  # (a stopping node hands durable messages to keepers only)
            return not self.handing_over and bool(self.directory.providers("ackqueues", queue))

        deliverable = 0
        if self.durable is not None:  # stored, and a puller is there to take them
            deliverable = sum(len(q.buffer) for name, q in list(self.durable.queues.items())
                              if q.buffer and pulled(name))
        return len(self.publisher.queue) + self.pusher.queued() + self.reliable.pending(pulled) + deliverable

    def unsent_in_memory(self) -> int:
        """What `queued` counts that a stop would lose (durable messages stay stored)."""
        if self.publisher is None or self.pusher is None or self.reliable is None:
            return 0
        return len(self.publisher.queue) + self.pusher.queued() + self.reliable.pending_in_memory()

    def forget_queued(self) -> None:
        """Drop what waits in the in-memory send queues (the node stopped: they were counted)."""
        if self.publisher is not None:
            self.publisher.queue.clear()
            self.publisher.held_bytes = 0
        if self.pusher is not None:
            for q in list(self.pusher.queues.values()):
                q.clear()
            self.pusher.held = self.pusher.held_bytes = 0

    def flush(self) -> None:
        """Send what every queue holds; retry shortly where a socket could not take it all."""
        self.scheduled = False
        publisher, pusher, reliable = self.publisher, self.pusher, self.reliable
        if publisher is None or pusher is None or reliable is None or publisher.closed:
            return
        blocked = False
        sent = pusher.stats.pattern["pipeline"]["sent"]  # (whether anything went: the retry's delay)
        until = time.monotonic() + FLUSH_SLICE_S
        if publisher.queue:
            publisher.flush(until)
        at_least_once = self.directory.offers["ackqueues"]
        kept = self._at_least_once
        if len(kept) > len(pusher.queues):
            kept.intersection_update(pusher.queues)
        durable = self.durable.queues if self.durable is not None else {}
        for queue in [name for name in reliable.redeliver if name not in pusher.queues and name not in durable]:
            # messages to deal again of a queue whose socket went (a push that found no puller
            # gave up): dealt as the queue's are, once it has a puller
            if self.directory.providers("queues", queue) or queue in at_least_once:
                try:
                    pusher.ensure_socket(queue)
                except ZmqMeshError as exc:  # (past the sockets' bound: tried again at the next flush)
                    log.debug("no socket yet for the messages of %r to deal again: %s", queue, exc)
        for queue, q in list(pusher.queues.items()):
            try:
                if queue in at_least_once:
                    kept.add(queue)
                    pusher.pulled(queue)
                    if reliable.flush(queue, q):  # (its pullers' windows took all they take now: marked as ZeroMQ's refusal is)
                        blocked = True
                        pusher.refused(queue)
                    else:
                        pusher.stalled.pop(queue, None)
                    continue
                again = reliable.redeliver.get(queue)
                if again and self.directory.providers("queues", queue):
                    pusher.put_back(q, reliable.take_in_memory(queue))
                if q and pusher.flush(queue, q, until, keep=queue in kept or bool(again)):
                    blocked = True
            except Exception:  # one queue's failure must not starve the others
                log.exception("sending on queue %r failed", queue)
                blocked = True
        if self.durable is not None and not self.handing_over:
            try:
                buffers = self.durable.refill(also=reliable.redeliver)
            except Exception:
                log.exception("reading the store failed")
                buffers = {}
            for queue, buffer in buffers.items():
                try:
                    if (buffer or reliable.redeliver.get(queue)) and reliable.flush(queue, buffer, stored=True):
                        blocked |= bool(self.directory.providers("ackqueues", queue))
                except Exception:
                    log.exception("sending durable queue %r failed", queue)
                    blocked = True
            if buffers:
                self.durable.reckon(buffers, reliable.busy_queues)
        publisher.count_held()  # (before the waiting callers are told: they look at it)
        pusher.count_held()
        if not blocked:
            self._retry_s = _RETRY_S
        elif self._retry is None:
            went = pusher.stats.pattern["pipeline"]["sent"] != sent
            self._retry_s = _RETRY_S if went else min(2 * self._retry_s, _RETRY_MAX_S)
            self._retry = self.loop.call_later(self._retry_s, self._on_retry)
        if time.monotonic() >= until and (publisher.queue or any(pusher.queues.values())):
            self.wake()  # (the slice ran out: the rest goes at the loop's next turn)
        self.space.notify()

    def _on_retry(self) -> None:
        self._retry = None
        self.flush()

    def cancel(self) -> None:
        """Cancel a pending retry (the node stops)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
