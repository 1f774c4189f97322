"""At-least-once queues: the pusher's side.

A queue whose pullers announce ``at_least_once`` is not sent over PUSH/PULL. The pusher
deals batches to the pullers itself, over a DEALER to each puller's service ROUTER,
keeping every batch until the puller acknowledges it. A puller acknowledges a batch once
its handler has returned for every message of it. When a puller leaves (crash,
shutdown, silence), what it had not acknowledged goes back to the front of the queue,
marked as redelivered, and is dealt to the remaining pullers. So every message is
handled at least once, and at most ``ack_window`` messages per lost puller are handled
twice.

Frames: request ``["\\x00queue/<name>", batch_id, body]`` where ``body`` is a batch of
msgpack arrays ``[redelivered, data]``; reply ``[batch_id, status, b""]`` (status as for
requests; 0x02 means the node no longer pulls the queue).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import zmq

from . import wire
from .sockets import close_watched, has_input, send_frames

if TYPE_CHECKING:
    from .core import MeshCore

__all__ = ["ReliableSender", "QUEUE_SERVICE_PREFIX", "wrap_item"]

log = logging.getLogger("zmqmesh.reliable")

QUEUE_SERVICE_PREFIX = "\x00queue/"
_BATCH = wire.MAX_BATCH_ITEMS
_TRUE, _FALSE, _ARRAY2 = b"\xc3", b"\xc2", b"\x92"


def wrap_item(body: bytes, redelivered: bool) -> bytes:
    """The msgpack array ``[redelivered, data]`` around an already encoded payload."""
    return _ARRAY2 + (_TRUE if redelivered else _FALSE) + body


class ReliableSender:
    """Deals the at-least-once queues of one node; runs on the node's loop."""

    def __init__(self, core: MeshCore) -> None:
        self.core = core
        self.window = core.config.ack_window
        self.redeliver: dict[str, deque[bytes]] = {}
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self.inflight: dict[bytes, tuple[str, str, list[bytes], list[bool]]] = {}
        self.inflight_count: dict[str, int] = {}
        self._batch_ids = itertools.count(1)
        self._rr = itertools.count()

    def pending(self) -> int:
        """Messages sent but not yet acknowledged, plus those waiting to be resent."""
        return sum(len(v[2]) for v in self.inflight.values()) + sum(len(q) for q in self.redeliver.values())

    def flush(self, queue: str, q: deque[bytes]) -> bool:
        """Deal what is queued to pullers with room in their window; True if some had to wait."""
        core = self.core
        pullers = [i for i in core.offers["ackqueues"].get(queue, ()) if core.offers_endpoint(i)]
        again = self.redeliver.setdefault(queue, deque())
        if not pullers:
            return bool(q or again)
        name = (QUEUE_SERVICE_PREFIX + queue).encode()
        start = next(self._rr)
        progress = True
        while (q or again) and progress:
            progress = False
            for k in range(len(pullers)):
                puller = pullers[(start + k) % len(pullers)]
                room = self.window - self.inflight_count.get(puller, 0)
                share = max(1, (len(q) + len(again)) // len(pullers))
                n = min(room, _BATCH, share)
                if n <= 0:
                    continue
                bodies: list[bytes] = []
                flags: list[bool] = []
                while len(bodies) < n and again:
                    bodies.append(again.popleft())
                    flags.append(True)
                while len(bodies) < n and q:
                    bodies.append(q.popleft())
                    flags.append(False)
                if not bodies:
                    break
                batch_id = next(self._batch_ids).to_bytes(8, "big")
                payload = b"".join(wrap_item(b, f) for b, f in zip(bodies, flags))
                try:
                    send_frames(self._socket(puller), [name, batch_id, payload])
                except zmq.ZMQError:
                    for body in reversed(bodies):
                        again.appendleft(body)
                    continue
                self.inflight[batch_id] = (queue, puller, bodies, flags)
                self.inflight_count[puller] = self.inflight_count.get(puller, 0) + len(bodies)
                core.stats.pattern["pipeline"]["sent"] += len(bodies)
                progress = True
        for puller in pullers:  # sending may have consumed the edge that announces acks
            sock = self.sockets.get(puller)
            if sock is not None and has_input(sock):
                core.loop.call_soon(self._on_acks, puller)
        return bool(q or again)

    def _socket(self, puller: str) -> zmq.Socket[Any]:
        sock = self.sockets.get(puller)
        if sock is None:
            endpoint, key = self.core.offers_endpoint(puller)  # type: ignore[misc]
            sock = self.core.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, self.core.uuid + b"\xff\xff\xff\xff")
            sock.setsockopt(zmq.SNDHWM, 0)
            self.core.connect(sock, endpoint, key)
            self.sockets[puller] = sock
            self.core.loop.add_reader(sock.FD, self._on_acks, puller)
            self.core.loop.call_soon(self._on_acks, puller)
        return sock

    def _on_acks(self, puller: str) -> None:
        sock = self.sockets.get(puller)
        freed = False
        while sock is not None:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            entry = self.inflight.pop(frames[0], None) if len(frames) == 3 else None
            if entry is None:
                continue
            queue, owner, bodies, _flags = entry
            self.inflight_count[owner] -= len(bodies)
            freed = True
            if frames[1] != wire.STATUS_OK:  # the puller stopped pulling: deal them again
                self.redeliver.setdefault(queue, deque()).extendleft(reversed(bodies))
        if freed:
            self.core.wake_flush()

    def peer_gone(self, puller: str) -> None:
        """Put back what a departed puller had not acknowledged, marked as redelivered."""
        lost = [(bid, e) for bid, e in self.inflight.items() if e[1] == puller]
        for batch_id, (queue, _owner, bodies, _flags) in reversed(lost):
            del self.inflight[batch_id]
            self.redeliver.setdefault(queue, deque()).extendleft(reversed(bodies))
            self.core.stats.pattern["pipeline"]["redelivered"] = (
                self.core.stats.pattern["pipeline"].get("redelivered", 0) + len(bodies)
            )
        if lost:
            log.warning("puller %s left with %d unacknowledged message(s): redelivering",
                        puller[:8], sum(len(e[2]) for _, e in lost))
        self.inflight_count.pop(puller, None)
        sock = self.sockets.pop(puller, None)
        if sock is not None:
            close_watched(self.core.loop, sock)
        self.core.wake_flush()

    def close(self) -> int:
        """Close every socket; returns how many messages were still unacknowledged."""
        left = self.pending()
        for puller in list(self.sockets):
            close_watched(self.core.loop, self.sockets.pop(puller))
        return left
