"""`AsyncNode`: the coroutine API, its core driven by the caller's asyncio loop.

Same decorators and method names as `Node`, over the same `MeshCore`; the asyncio parts
it needs live in `aio`, so a program that only uses `Node` never imports asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .aio import LoopInbox, LoopRequester, wait_for_room, wait_until
from .errors import MeshTimeoutError, NodeClosedError, NoProviderError, ZmqMeshError
from .message import Peer
from .node import _check_name, _frames, _NodeBase, _peer_id

__all__ = ["AsyncNode"]

log = logging.getLogger("zmqmesh.node")


class AsyncNode(_NodeBase[Any]):
    """A mesh node for asyncio programs; its core runs on the caller's event loop.

    Same decorators and method names as `Node`; the calls are coroutines. ``async def``
    handlers are awaited on the loop, in arrival order; ``def`` handlers run on a worker
    thread so they never block the loop.

    Example::

        async with zmqmesh.AsyncNode("client") as node:
            print(await node.request("add", {"a": 1, "b": 2}))
    """

    _inbox_type = LoopInbox
    _requester_type = LoopRequester

    async def start(self) -> AsyncNode:
        """Bind, start discovery and handlers on the running loop; returns the node."""
        if self._core.started:
            if self._stopped:
                raise NodeClosedError("a stopped node cannot be started again; create a new one")
            return self
        try:
            self._core.start(asyncio.get_running_loop())
        except ZmqMeshError:
            self._stopped = True
            raise
        except Exception as exc:
            self._stopped = True
            raise ZmqMeshError(f"node {self.name!r} failed to start: {exc}") from exc
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """Drain queued sends, say goodbye, close everything. Idempotent and bounded."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await asyncio.wait_for(self._stop(timeout), timeout + self.config.linger_s + 1)
        except Exception as exc:  # never let stop() raise on a half-dead node
            log.warning("node %s did not stop cleanly: %s", self.name, exc)

    async def _stop(self, timeout: float) -> None:
        core = self._core
        deadline = core.begin_stop(timeout)
        if deadline is None:
            return
        try:  # the later steps run even if an earlier one fails or the stop times out
            while core.send_queued(deadline):
                await asyncio.sleep(0.005)
        finally:
            try:
                core.close_outbound()
                await core.inbox.stop(timeout)
            finally:
                core.close_sockets(deadline)
                await asyncio.get_running_loop().run_in_executor(None, core.destroy_context)

    async def __aenter__(self) -> AsyncNode:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def publish(self, topic: str, data: Any) -> None:
        """Publish ``data`` on ``topic`` (see `Node.publish`)."""
        item = self._encode_publication(topic, data)
        core = self._core
        q = core._pub_q
        if len(q) >= self.config.send_queue_max:
            await wait_for_room(core, q, time.monotonic() + self.config.push_timeout_s)
        q.append(item)
        core.wake_flush()

    async def push(self, queue: str, data: Any, timeout: float | None = None) -> None:
        """Send ``data`` to one puller of ``queue`` (see `Node.push`)."""
        body, q = self._encode_push(queue, data)
        if q is None:
            q = await self._push_slow_path(queue, timeout)
        q.append(body)
        self._core.wake_flush()

    async def _push_slow_path(self, queue: str, timeout: float | None) -> Any:
        """Create the queue's socket, wait for a puller, wait for room: whatever push lacks."""
        core = self._core
        deadline = time.monotonic() + (self.config.push_timeout_s if timeout is None else timeout)
        q = core.push_queue(queue)
        if q is None:
            core.ensure_push_socket(_check_name("queue", queue))
            q = core.push_queue(queue)
            assert q is not None
        if not core.offers["queues"].get(queue):
            try:
                await wait_until(core, lambda: bool(core.offers["queues"].get(queue)), max(deadline - time.monotonic(), 0))
            except MeshTimeoutError:
                raise NoProviderError(f"no node pulls the queue {queue!r}") from None
        if len(q) >= self.config.send_queue_max:
            await wait_for_room(core, q, deadline)
        return q

    async def request(self, service: str, data: Any = None, timeout: float | None = None, peer: str | Peer | None = None) -> Any:
        """Call ``service`` on one provider and return its reply (see `Node.request`)."""
        core = self._core
        core.ensure_running()
        body = core.codec.encode(data)
        return await core.requester.request(
            service, self._service_name(service), body, self.config.request_timeout_s if timeout is None else timeout,
            _peer_id(peer),
        )

    async def node_stats(self, peer: str | Peer, timeout: float = 5.0) -> dict[str, Any]:
        """Ask a zmqmesh peer (or this node) for its counters, as `stats` returns them there."""
        core = self._core
        core.ensure_running()
        result: dict[str, Any] = await core.requester.request(
            "\x00stats", b"\x00stats", core.codec.encode(None), timeout, _peer_id(peer))
        return result

    async def whisper(self, peer_id: str, *frames: bytes | str) -> None:
        """Send a ZRE WHISPER to one peer."""
        self._check_open()
        self._core.membership.whisper(peer_id, _frames(frames))

    async def shout(self, group: str, *frames: bytes | str) -> int:
        """Send a ZRE SHOUT to every peer in ``group``; returns how many got it."""
        self._check_open()
        return self._core.membership.shout(group, _frames(frames))

    async def join(self, group: str) -> None:
        """Join a ZRE group."""
        self._check_open()
        self._core.join_group(group)

    async def leave(self, group: str) -> None:
        """Leave a ZRE group."""
        self._check_open()
        self._core.leave_group(group)

    async def wait_for_peers(self, n: int, timeout: float = 10.0) -> list[Peer]:
        """Wait until at least ``n`` peers are present; returns them. Raises `MeshTimeoutError`."""
        core = self._core
        await wait_until(core, lambda: len(core._peer_index) >= n, timeout)
        return self.peers()

    async def wait_for_subscribers(self, topic: str, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` nodes' subscriptions matching ``topic`` are in place (see `Node`)."""
        core = self._core
        await wait_until(core, lambda: core.subscribers_ready(topic, n), timeout)

    async def wait_for_service(self, name: str, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``n`` nodes offer service ``name``."""
        core = self._core
        await wait_until(core, lambda: len(core.providers("services", name)) >= n, timeout)

    async def wait_for_pullers(self, queue: str, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``n`` nodes pull ``queue``."""
        core = self._core
        await wait_until(core, lambda: len(core.providers("queues", queue)) >= n, timeout)
