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
from collections.abc import Callable
from typing import Any

import zmq

from .._io.reactor import EventLoop
from .._io.sockets import close_watched, has_input, new_socket, send_frames
from .._mesh.directory import Directory
from .._stats import Stats
from .._wire.frames import (
    MAX_BATCH_ITEMS,
    STATUS_OK,
    acker_id,
    parse_reply,
    queue_service,
    wrap_item,
)
from ..config import NodeConfig

__all__ = ["ReliableSender"]

log = logging.getLogger("zmqmesh.reliable")


class ReliableSender:
    """Deals the at-least-once queues of one node; runs on the node's loop.

    ``wake`` asks the loop to flush (acknowledgements made room in a window).
    """

    def __init__(self, *, ctx: zmq.Context[Any], loop: EventLoop, config: NodeConfig, stats: Stats,
                 uuid: bytes, directory: Directory,
                 connect: Callable[[zmq.Socket[Any], str, str | None], None], wake: Callable[[], None]) -> None:
        self.ctx = ctx
        self.loop = loop
        self.stats = stats
        self.uuid = uuid
        self.directory = directory
        self.connect = connect
        self.wake = wake
        self.window = config.ack_window
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
        directory = self.directory
        pullers = [i for i in directory.providers("ackqueues", queue) if directory.endpoint_of(i, "service")]
        again = self.redeliver.setdefault(queue, deque())
        if not pullers:
            return bool(q or again)
        name = queue_service(queue)
        start = next(self._rr)
        progress = True
        while (q or again) and progress:
            progress = False
            for k in range(len(pullers)):
                puller = pullers[(start + k) % len(pullers)]
                room = self.window - self.inflight_count.get(puller, 0)
                share = max(1, (len(q) + len(again)) // len(pullers))
                n = min(room, MAX_BATCH_ITEMS, share)
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
                self.stats.pattern["pipeline"]["sent"] += len(bodies)
                progress = True
        for puller in pullers:  # sending may have consumed the edge that announces acks
            sock = self.sockets.get(puller)
            if sock is not None and has_input(sock):
                self.loop.call_soon(self._on_acks, puller)
        return bool(q or again)

    def _socket(self, puller: str) -> zmq.Socket[Any]:
        sock = self.sockets.get(puller)
        if sock is None:
            endpoint, key = self.directory.endpoint_of(puller, "service")  # type: ignore[misc]
            sock = new_socket(self.ctx, zmq.DEALER, {zmq.ROUTING_ID: acker_id(self.uuid), zmq.SNDHWM: 0})
            self.connect(sock, endpoint, key)
            self.sockets[puller] = sock
            self.loop.add_reader(sock.FD, self._on_acks, puller)
            self.loop.call_soon(self._on_acks, puller)
        return sock

    def _on_acks(self, puller: str) -> None:
        sock = self.sockets.get(puller)
        freed = False
        while sock is not None:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            reply = parse_reply(frames)
            entry = self.inflight.pop(reply[0], None) if reply is not None else None
            if entry is None or reply is None:
                continue
            queue, owner, bodies, _flags = entry
            self.inflight_count[owner] -= len(bodies)
            freed = True
            if reply[1] != STATUS_OK:  # the puller stopped pulling: deal them again
                self.redeliver.setdefault(queue, deque()).extendleft(reversed(bodies))
        if freed:
            self.wake()

    def peer_gone(self, puller: str) -> None:
        """Put back what a departed puller had not acknowledged, marked as redelivered."""
        lost = [(bid, e) for bid, e in self.inflight.items() if e[1] == puller]
        for batch_id, (queue, _owner, bodies, _flags) in reversed(lost):
            del self.inflight[batch_id]
            self.redeliver.setdefault(queue, deque()).extendleft(reversed(bodies))
            self.stats.pattern["pipeline"]["redelivered"] = (
                self.stats.pattern["pipeline"].get("redelivered", 0) + len(bodies)
            )
        if lost:
            log.warning("puller %s left with %d unacknowledged message(s): redelivering",
                        puller[:8], sum(len(e[2]) for _, e in lost))
        self.inflight_count.pop(puller, None)
        sock = self.sockets.pop(puller, None)
        if sock is not None:
            close_watched(self.loop, sock)
        self.wake()

    def close(self) -> int:
        """Close every socket; returns how many messages were still unacknowledged."""
        left = self.pending()
        for puller in list(self.sockets):
            close_watched(self.loop, self.sockets.pop(puller))
        return left
