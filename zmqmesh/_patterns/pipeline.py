"""push/pull: one PUSH socket per queue name, connected to every puller of that queue.

Callers append encoded messages to the queue's send queue; the loop sends what has
accumulated, several messages to a frame, split so that ZeroMQ's round-robin spreads
what is queued now over every puller. At-least-once queues go through `ReliableSender` instead.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice, repeat, starmap
from time import monotonic
from typing import Any

import zmq

from .._io.reactor import EventLoop
from .._io.sockets import (
    PeerConnections,
    can_send,
    close_watched,
    new_socket,
    send_frames,
)
from .._mesh.directory import Directory
from .._stats import LogThrottle, Stats
from .._wire.frames import (
    BATCH_BYTES,
    LARGE_FRAME,
    MAX_BATCH_ITEMS,
    RAW_PUSH_PROTOCOL,
    Headed,
    RawPayload,
    wire_size,
)
from ..config import NodeConfig
from ..errors import MeshTimeoutError, ZmqMeshError
from .pubsub import fit_within, meta_frame

__all__ = ["Pusher", "MAX_PUSH_SOCKETS", "TOO_LARGE_LOG_S", "TOTAL_QUEUES_DEFAULT", "next_batch", "cut_frames", "drop_front", "bytes_queued"]

log = logging.getLogger("zmqmesh.pipeline")


MAX_PUSH_SOCKETS = 512
"""PUSH sockets (one per queue pushed to) a node keeps open at most."""
TOTAL_QUEUES_DEFAULT = 10
"""``send_queue_total_max`` when it is None: this many times ``send_queue_max``."""


TOO_LARGE_LOG_S = 10.0
"""At most one log line per this many seconds for the pushes dropped as larger than a
puller takes (`Pusher._drop_too_large`): one per message would flood the log."""

_FIRST_LOOK = 16  # (plain payloads `next_batch` looks at first)
_GAUGE_MAX_AGE_S = 0.5  # (how long `Pusher.queued_bytes` answers what it counted last)


def next_batch(q: deque[Any], limit: int) -> tuple[list[Any], int, Any]:
    """The messages at the front of ``q`` (not empty) that go in one frame, their wire
    size, and the frame's body: their payloads joined (a lone one as it is, a `RawPayload`
    too). At most ``limit`` (at least one), within `BATCH_BYTES` unless one alone is
    larger; a `RawPayload` goes alone, and messages with headers (`Headed`) share a frame
    only with each other (the meta frame is theirs). They stay in ``q``: the caller takes
    them off once the frame went (`Pusher.flush`), so a frame the socket cannot take
    leaves ``q`` as it was, and callers, who append to ``q`` only while it is shorter than
    ``send_queue_max``, never see it shortened by a frame that then comes back. (Callers'
    threads append while the loop runs this: it looks at the front in one C call,
    ``islice``, under the GIL, which no append can interrupt.)"""
    head = q[0]
    if type(head) is RawPayload:  # (alone, whatever the limit)
        return [head], len(head), head
    wanted = min(limit, len(q))
    # the common case, checked at C speed: plain payloads that all could fit, were they the head's size
    if type(head) is bytes and BATCH_BYTES // max(1, len(head)) >= wanted:
        # (a few first, then the rest: where headed and plain ones alternate, a frame looks
        # at a few past its end only)
        bodies: list[Any] = []
        looks = ((0, wanted),) if wanted <= _FIRST_LOOK else ((0, _FIRST_LOOK), (_FIRST_LOOK, wanted))
        for start, stop in looks:
            more = list(islice(q, start, stop))
            types = list(map(type, more))
            if types.count(bytes) < len(types):  # (their leading run: a headed one or a large payload ends it)
                bodies += more[:_plain_run(types)]
                break
            bodies += more
        size = sum(map(len, bodies))  # (before they are joined: those past the head may be large)
        if size <= BATCH_BYTES:
            return bodies, size, b"".join(bodies)
    bodies = []
    size = 0
    headed = type(head) is Headed
    for item in list(islice(q, limit)):  # (one C call, as above: a deque cannot be walked while appended to)
        grown = size + wire_size(item)
        if bodies and (len(bodies) >= limit or grown > BATCH_BYTES or type(item) is RawPayload
                       or (type(item) is Headed) is not headed):
            break
        bodies.append(item)
        size = grown
    return bodies, size, bodies[0] if len(bodies) == 1 else b"".join(bodies)


def bytes_queued(queues: Iterable[deque[Any]]) -> int:
    """The bytes ``queues`` hold, headers included (any thread: each queue is copied in one
    C call first, as callers' threads may append meanwhile)."""
    return sum(sum(map(wire_size, list(q))) for q in queues)


def _plain_run(types: list[type]) -> int:
    """How many of ``types`` (of a send queue's messages) are plain ``bytes`` before the first that is not."""
    for i, kind in enumerate(types):
        if kind is not bytes:
            return i
    return len(types)


def drop_front(q: deque[Any], n: int) -> None:
    """Take the first ``n`` messages off ``q`` (it holds that many at least) in one C loop,
    ``starmap`` calling ``popleft``: 5 against 12 ns a message from a Python loop."""
    deque(starmap(q.popleft, repeat((), n)), 0)


def cut_frames(q: deque[Any], pullers: int) -> Iterator[tuple[list[Any], int, Any]]:
    """The frames to send what ``q`` holds in, each cut (`next_batch`) when the last one
    went: the caller takes each frame's messages off ``q`` before it asks for the next
    (or stops, leaving them at the front). ZeroMQ deals whole frames round-robin, so a
    frame holds at most a ``pullers``-th of what is queued, to spread it over them all;
    callers' threads go on queueing while the frames go out (each send lets them in), so
    the frames grow with the queue. (A
    limit fixed when the first frame was cut kept every frame as small as that queue
    was: both sides then paid a frame's cost per few messages, and in some runs the rate
    fell by half.)"""
    limit = 1
    while q:
        limit = max(limit, min(MAX_BATCH_ITEMS, len(q) // pullers))
        yield next_batch(q, limit)


class Pusher:
    """The PUSH sockets and send queues of one node. Loop only, but for appending to a queue.

    ``wake`` asks the loop to flush (a socket can take more again).

    Every queue holds ``send_queue_max`` messages at most, and all of them together
    `held_max`: callers append only while `held` is below it, and add to `held` what they
    appended (an integer add, no lock); the loop sets it to what the queues hold after
    each flush, so a count two threads raced on is set right at the next.

    Their bytes are bounded the same way (`held_bytes`, below `max_bytes`: a message of
    1 MiB weighs as much as 16,000 of 64 B): callers add what they append, and after a
    flush the loop takes off what it sent or dropped (each frame's size is known once
    it is cut: no sum per frame), sets it to 0 once the queues are empty, and counts it
    exactly if it still reached `max_bytes`, again only once something was added or
    taken off. (Counting at every flush of queues full of 64 KiB payloads, 1,000 of
    them, was about a third of the loop's time a message.) The count sets right what
    the loop does not take off (the messages of at-least-once queues, which `Reliable`
    takes); so callers may be held back only by bytes that are really queued. A
    ``push_many`` measures the room, takes it and counts it in one step (`take`), so that
    callers together go past the bounds by a message each at most.
    """

    def __init__(self, *, ctx: zmq.Context[Any], loop: EventLoop, config: NodeConfig, stats: Stats,
                 uuid: bytes, directory: Directory,
                 connect: Callable[[zmq.Socket[Any], str, str | None], None], wake: Callable[[], None]) -> None:
        self.ctx = ctx
        self.loop = loop
        self.config = config
        self.stats = stats
        self._sent_names = stats.names("pipeline", "sent")  # (written on the loop only)
        self.uuid = uuid
        self.directory = directory
        self.connect = connect
        self.wake = wake
        self.queues: dict[str, deque[Any]] = {}  # encoded bodies (`Headed` ones too), `RawPayload`s
        self.held = 0
        """What every send queue holds (callers add, the loop recounts: `count_held`)."""
        self.held_max: int = config.send_queue_total_max or TOTAL_QUEUES_DEFAULT * config.send_queue_max
        self.held_bytes = 0
        """The bytes every send queue holds, headers included, at least (callers add, the loop counts again: `count_held`)."""
        self.max_bytes: int = config.send_queue_max_bytes
        self._counted: tuple[int, int] | None = None  # (`held`, `held_bytes`) when last counted exactly
        self._taken_off = 0  # (loop only: the bytes sent or dropped since `count_held`)
        self.stalled: dict[str, int] = {}
        """The queues whose socket refused their last frame: ZeroMQ holds all it takes for
        their pullers (written on the loop: a frame refused adds it, one taken removes it);
        and the at-least-once queues whose flush left messages waiting, their pullers'
        windows (or sockets) full (`Outbound.flush`). Each with the `refusals` count of its
        last refusal: a mark older than a wait for room is no answer to it (the pullers
        may have taken everything since, the loop not yet having tried again)."""
        self.refusals = 0  # (loop only: how many refusals `refused` marked)
        self._taking = threading.Lock()  # (`take`: two that measured the room at once each took all of it)
        self._gauge = (0, -_GAUGE_MAX_AGE_S)  # (`queued_bytes` as last counted, and when)
        self._queue_max = config.send_queue_max
        self._sequence = 0  # numbers the messages this node pushes (their ids)
        self._sockets: dict[str, zmq.Socket[Any]] = {}
        self._pullers: dict[str, PeerConnections] = {}  # queue -> its socket's connections to its pullers
        self._synced: dict[str, tuple[str, ...]] = {}  # queue -> its pullers when its connections were last synced
        # queues whose messages wait with nobody pulling (their pullers left after they were
        # queued): until when they wait for one to come (`push_timeout_s`)
        self._unpulled: dict[str, float] = {}
        self._too_large_log = LogThrottle(TOO_LARGE_LOG_S)  # (`_drop_too_large`)

    def queue_of(self, queue: str) -> deque[bytes] | None:
        """The send queue of ``queue`` once its socket exists (any thread)."""
        return self.queues.get(queue)

    def queued(self) -> int:
        """Messages waiting in every send queue."""
        return sum(map(len, list(self.queues.values())))

    def queued_bytes(self) -> int:
        """The bytes waiting in every send queue, headers included, counted at most every
        half second (any thread; `held_bytes` is the callers' estimate). (Counting takes
        3.5 ms for 100,000 messages, and any peer may ask for the stats.)"""
        counted, at = self._gauge
        now = monotonic()
        if now - at >= _GAUGE_MAX_AGE_S:
            counted = bytes_queued(list(self.queues.values()))
            self._gauge = (counted, now)
        return counted

    def take(self, q: deque[Any], bodies: list[Any]) -> int:
        """Queue on the send queue ``q`` the first of ``bodies`` (all carrying headers, or
        none: one call's) that fit in what all queues may still hold, in messages and bytes
        (one at least), counted; how many it took (callers' threads, one at a time)."""
        weigh = wire_size if type(bodies[0]) is Headed else len
        with self._taking:
            chunk, size = fit_within(bodies[:max(1, self.held_max - self.held)], weigh, self.max_bytes - self.held_bytes)
            q.extend(chunk)
            self.held += len(chunk)
            self.held_bytes += size
        return len(chunk)

    def put_back(self, q: deque[Any], bodies: list[Any]) -> None:
        """Put ``bodies`` back at the front of the send queue ``q``, in order, counted in
        `held_bytes` (loop only: messages to deal again, older than those queued)."""
        size = sum(map(wire_size, bodies))  # (first: callers' threads add to the count meanwhile)
        q.extendleft(reversed(bodies))
        self.held_bytes += size

    def count_held(self) -> None:
        """Recount `held` (loop only, after a flush): what the callers added, less what went;
        take off `held_bytes` what went, and count it when the queues are empty or it still
        reaches `max_bytes`, unless nothing was added or taken off since it was last counted
        (the queues wait for their sockets, and the loop retries every few ms: counting
        90,000 messages at each retry took half a core)."""
        queues = list(self.queues.values())
        self.held = held = sum(map(len, queues))
        taken_off, self._taken_off = self._taken_off, 0
        if not held:
            self.held_bytes = 0
            self._counted = None
            return
        if taken_off:
            self.held_bytes -= taken_off  # (no call between the read and the write: see `Publisher`)
        if self.held_bytes >= self.max_bytes and (held, self.held_bytes) != self._counted:
            # (one appended after `held` was summed makes the next count differ, and recount)
            counted = bytes_queued(queues)
            self.held_bytes = counted
            self._counted = (held, counted)

    def full(self, q: deque[Any]) -> bool:
        """Whether a push to the send queue ``q`` must wait: ``q`` holds ``send_queue_max``
        messages, or all send queues together `held_max`, or `max_bytes` (any thread)."""
        return len(q) >= self._queue_max or self.held >= self.held_max or self.held_bytes >= self.max_bytes

    def refusal(self, queue: str, q: deque[Any]) -> tuple[str, MeshTimeoutError]:
        """For a push to ``queue`` (send queue ``q``) that found no room in time: the
        ``pipeline`` counter to count it in, and the error naming the bound it met."""
        counter, bound = self.bound_met(queue, q)
        return counter, MeshTimeoutError(f"{bound}: the receivers are not keeping up")

    def bound_met(self, queue: str, q: deque[Any]) -> tuple[str, str]:
        """For a push to ``queue`` (send queue ``q``) that finds no room: the ``pipeline``
        counter of the bound it met (``refused_queue_full``: ``q``'s own; else
        ``refused_node_full``), and what is full, naming the option."""
        if len(q) >= self._queue_max:
            return "refused_queue_full", f"send queue of {queue!r} full ({len(q)} messages, send_queue_max={self._queue_max})"
        if self.held_bytes >= self.max_bytes:
            held = f"{self.held_bytes} bytes together (send_queue_max_bytes={self.max_bytes})"
        else:
            held = f"{self.held} messages together (send_queue_total_max={self.held_max})"
        return "refused_node_full", f"send queues full, this node's queues hold {held}"

    def ensure_socket(self, queue: str) -> None:
        """Create and connect the PUSH socket of ``queue``. Past `MAX_PUSH_SOCKETS`, the
        sockets of idle queues (no puller, nothing queued) are released first; raises
        `ZmqMeshError` if none is idle."""
        if queue in self._sockets:
            return
        if len(self._sockets) >= MAX_PUSH_SOCKETS:
            for idle in [q for q in self._sockets if not self.queues[q] and not self.directory.providers("queues", q)]:
                self.release(idle)
            if len(self._sockets) >= MAX_PUSH_SOCKETS:
                raise ZmqMeshError(f"this node already pushes to {MAX_PUSH_SOCKETS} queues with pullers or "
                                   "messages waiting; push to fewer queue names")
        sock = new_socket(self.ctx, zmq.PUSH, {zmq.SNDHWM: self.config.queue_hwm})
        self._sockets[queue] = sock
        self._pullers[queue] = PeerConnections(sock, self.connect, self._drain_ms)
        self.queues[queue] = deque()
        self._sync(queue, None)
        self.loop.add_reader(sock.FD, self._on_socket, sock)
        self.wake()

    def release(self, queue: str) -> None:
        """Close the socket of ``queue`` if nothing waits in its send queue and nobody pulls
        it (a push that found no puller leaves nothing behind)."""
        q = self.queues.get(queue)
        if q is None or q or self.directory.providers("queues", queue):
            return
        close_watched(self.loop, self._sockets.pop(queue), 0)
        del self._pullers[queue]
        del self._synced[queue]
        del self.queues[queue]
        self.stalled.pop(queue, None)
        self._unpulled.pop(queue, None)

    def refused(self, queue: str) -> None:
        """Mark ``queue`` `stalled`: its pullers took all they take for now (loop only)."""
        self.refusals += 1
        self.stalled[queue] = self.refusals

    def pulled(self, queue: str) -> None:
        """``queue`` has pullers now (those `flush` does not see: at-least-once ones)."""
        if self._unpulled:
            self._unpulled.pop(queue, None)

    def sync_connections(self, changed: Iterable[str] | None = None) -> None:
        """Connect every queue's socket to that queue's pullers, and only to them.

        With ``changed`` (ids: the peers come, changed or gone since the last call,
        `Directory.touched`), only the pullers that came or went since the last sync are
        looked at, those among ``changed`` (an endpoint or key may be new) and those that
        could not be connected; every puller if None. (Each join looked at every puller of
        every queue: 166 us at 127 peers pulling two queues.)"""
        look = None if changed is None else set(changed)
        for queue in self._sockets:
            self._sync(queue, look)

    def _sync(self, queue: str, changed: set[str] | None) -> None:
        pullers = self.directory.providers("queues", queue)
        connections = self._pullers[queue]
        if changed is not None and self._synced[queue] == pullers and not connections.unreached and \
                changed.isdisjoint(pullers):
            return
        now = set(pullers)
        if changed is None:
            look = connections.reached.keys() | now
        elif self._synced[queue] == pullers:
            look = changed & now
        else:
            look = (connections.reached.keys() ^ now) | (changed & now)
        self._synced[queue] = pullers
        directory = self.directory
        endpoint_of = directory.endpoint_of
        connections.update_from(directory.in_joined_order(look | connections.unreached),
                                lambda i: endpoint_of(i, "pull") if i in now else None)

    def _drain_ms(self, endpoint: str) -> int:
        """How long a connection to ``endpoint`` that this node lets go sends on what ZeroMQ
        still holds for it (a backlog, under load): ``linger_s`` if a peer still there
        pulls at that endpoint (its puller withdrew the queue, stopping or unpulling, and
        reads on meanwhile), else nothing (its node is gone, and what it held with it: a
        linger would only keep trying it, and the context's end would wait for that)."""
        for peer in self.directory.mesh_peers():
            live = self.directory.endpoint_of(peer.id, "pull")
            if live is not None and live[0] == endpoint:
                return int(self.config.linger_s * 1000)
        return 0

    def _on_socket(self, sock: zmq.Socket[Any]) -> None:
        # The descriptor stays readable until someone reads ZMQ_EVENTS: with nothing queued
        # no send does, and the loop would spin. Reading it rearms the descriptor.
        if not sock.closed and can_send(sock) and any(self.queues.values()):
            self.wake()

    def flush(self, queue: str, q: deque[bytes], until: float, keep: bool = False) -> bool:
        """Send what ``q`` holds, until the monotonic clock reads ``until`` (a frame at
        least; the caller flushes again while more is queued); True if the socket could not
        take it all now. With no puller, what is queued waits for one (`_wait_for_puller`;
        for good if ``keep``: an at-least-once queue's)."""
        sock = self._sockets.get(queue)
        if sock is None or not q:
            return False
        pullers = len(self.directory.providers("queues", queue))
        if not pullers:
            if not keep:
                self._wait_for_puller(queue, q)
            return False  # (nothing to retry: a puller that comes wakes the flush, and so does the deadline)
        if self._unpulled:
            self._unpulled.pop(queue, None)
        name = queue.encode()
        uuid = self.uuid
        counters = self.stats.pattern["pipeline"]
        read_raw: bool | None = None  # (whether the pullers read `RawPayload`s as they are: asked once a flush)
        # (a payload past every puller's announced limit is dropped here: sent, it would close the connection
        # of the puller ZeroMQ deals it to; one that some puller takes goes, to be dealt to any)
        most = self.directory.widest_limit(self.directory.providers("queues", queue)) \
            if self.directory.narrower else None
        for bodies, size, payload in cut_frames(q, pullers):
            n = len(bodies)
            if most is not None and size > most and self._drop_too_large(queue, q, n, most):
                continue  # (the frame is cut again from what is left)
            headed = type(bodies[0]) is Headed  # (then all are: `next_batch`)
            if type(payload) is RawPayload:  # (alone)
                if read_raw is None:
                    read_raw = self._all_read_raw(queue)
                if read_raw:
                    frames = [name, uuid, b"", payload.data]
                else:  # (encoded once: if the socket cannot take it now, it waits encoded)
                    payload = q[0] = payload.encoded()
                    frames = [name, uuid, payload]
            else:
                frames = [name, uuid, payload]
            if headed:
                frames.append(meta_frame(bodies, self._sequence))
            try:
                send_frames(sock, frames, copy=size < LARGE_FRAME)
            except zmq.ZMQError as exc:  # (what it held is still at the front of ``q``, in order)
                if isinstance(exc, zmq.Again):
                    self.refused(queue)
                else:
                    log.error("push to %r failed: %s", queue, exc)
                return True
            if self.stalled:
                self.stalled.pop(queue, None)
            drop_front(q, n)  # (sent: taken off the queue now, not before: `next_batch`)
            self._taken_off += size
            self._sequence += n
            counters["sent"] += n
            self._sent_names.add(queue, n)
            if monotonic() >= until:
                break
        return False

    def _drop_too_large(self, queue: str, q: deque[Any], n: int, most: int) -> int:
        """Drop, of the first ``n`` messages of ``q``, those whose payload is larger than
        ``most`` (the largest ``max_message_bytes`` the pullers of ``queue`` announced, each
        below this node's: every one of them would refuse it, and the frame carrying it
        would end the connection it went on, with whatever followed it); they are counted
        (``pipeline.dropped`` and ``dropped_too_large``) and logged at most every
        `TOO_LARGE_LOG_S`. How many were dropped."""
        front = [q.popleft() for _ in range(n)]
        kept = [body for body in front if len(body) <= most]  # (`len`: the payload encoded, as a puller bounds it)
        q.extendleft(reversed(kept))
        dropped = n - len(kept)
        if not dropped:
            return 0
        self._taken_off += sum(wire_size(body) for body in front if len(body) > most)
        self.stats.add("pipeline", "dropped", dropped)
        self.stats.add("pipeline", "dropped_too_large", dropped)
        said = self._too_large_log.due(dropped)
        if said:
            log.warning("dropped %d message(s) pushed to %r (since the last such line): each larger than a puller "
                        "of it takes (max_message_bytes %d); counted in pipeline.dropped_too_large; said again at "
                        "most every %g s", said, queue, most, TOO_LARGE_LOG_S)
        return dropped

    def _wait_for_puller(self, queue: str, q: deque[Any]) -> None:
        """Messages queued for ``queue`` while it had pullers, who all left since (a crash is
        seen only after a while): they wait `push_timeout_s` for one to come, as `push`
        waits for one, then are dropped, counted (``pipeline.dropped``) and logged, and the
        queue's socket is released (a push waiting for room then starts again: `_push_plan`)."""
        now = monotonic()
        until = self._unpulled.get(queue)
        if until is None:
            until = self._unpulled[queue] = now + self.config.push_timeout_s
            self.loop.call_later(self.config.push_timeout_s, self.wake)
        if now < until:
            return
        del self._unpulled[queue]
        dropped = 0
        while q:  # (a caller's thread may append meanwhile, from what it read before they left)
            self._taken_off += wire_size(q.popleft())
            dropped += 1
        self.stats.pattern["pipeline"]["dropped"] += dropped
        log.warning("dropped %d message(s) queued for %r: its pullers left and none came back within %.1f s",
                    dropped, queue, self.config.push_timeout_s)
        self.release(queue)

    def _all_read_raw(self, queue: str) -> bool:
        """Whether every puller of ``queue`` reads a large payload in a frame of its own
        (protocol 5): ZeroMQ deals a message to any of them."""
        speaks = self.directory.speaks
        return all(speaks(i, RAW_PUSH_PROTOCOL) for i in self.directory.providers("queues", queue))

    def close(self, linger_ms: int) -> None:
        """Close every PUSH socket; what they hold may go out for ``linger_ms``."""
        for sock in self._sockets.values():
            close_watched(self.loop, sock, linger_ms)
        self._sockets.clear()
