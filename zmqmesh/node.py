"""`Node`: the blocking API, its core driven by a `Reactor` on a background I/O thread.

`AsyncNode` (in `asyncnode`) has the same decorators and method names as coroutines, over
the same `MeshCore`; both share `_NodeBase` for registration and the read-only views.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .config import NodeConfig
from .core import MeshCore, Registry
from .errors import MeshTimeoutError, NodeClosedError, NoProviderError, ZmqMeshError
from .inbox import Inbox, ThreadInbox
from .message import Message, Peer
from .reactor import Reactor, run_on
from .wire import MAX_NAME_BYTES

__all__ = ["Node"]

log = logging.getLogger("zmqmesh.node")

Handler = TypeVar("Handler", bound=Callable[..., Any])


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or len(name.encode()) > MAX_NAME_BYTES or (kind != "topic" and not name):
        raise ValueError(f"a {kind} must be a string of at most {MAX_NAME_BYTES} bytes" + ("" if kind == "topic" else ", not empty"))
    return name


class _NodeBase(Generic[Handler]):
    """Registration of handlers and the read-only views shared by both node kinds."""

    _inbox_type: type[Inbox] = ThreadInbox
    _requester_type: Any = None

    def __init__(self, name: str | None = None, *, config: NodeConfig | None = None, **options: Any) -> None:
        self.config = NodeConfig.from_options(config, **options)
        self._registry = Registry()
        self._core = MeshCore(name or "", self.config, self._registry, self._inbox_type, self._requester_type)
        self._stopped = False
        self._topic_names: dict[str, bytes] = {}
        self._service_names: dict[str, bytes] = {"\x00stats": b"\x00stats"}

    def _encode_publication(self, topic: str, data: Any) -> tuple[bytes, bytes]:
        """``(topic, body)`` for the publish queue; raises for a stopped node or bad data."""
        core = self._core
        if core.closed:
            core.ensure_running()
        body = core.codec.encode(data)
        return self._topic_names.get(topic) or self._name_bytes(self._topic_names, "topic", topic), body

    def _service_name(self, service: str) -> bytes:
        """``service`` checked and encoded (remembered: requests repeat their service names)."""
        return self._service_names.get(service) or self._name_bytes(self._service_names, "service", service)

    def _encode_push(self, queue: str, data: Any) -> tuple[bytes, Any]:
        """The encoded body, and the send queue of ``queue`` if it takes it right now
        (None when the socket, a puller or room is missing: the caller's slow path)."""
        core = self._core
        if core.closed:
            core.ensure_running()
        body = core.codec.encode(data)
        q = core.push_queue(queue)
        if q is None or not core.offers["queues"].get(queue) or len(q) >= self.config.send_queue_max:
            return body, None
        return body, q

    @staticmethod
    def _name_bytes(cache: dict[str, bytes], kind: str, name: str) -> bytes:
        """``name`` checked and encoded, remembered in ``cache`` for the next call (bounded)."""
        encoded = _check_name(kind, name).encode()
        if len(cache) >= 4096:
            cache.clear()
        cache[name] = encoded
        return encoded

    # identity ------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """This node's ZRE UUID as 32 hex characters."""
        return self._core.node_id

    @property
    def name(self) -> str:
        """This node's name."""
        return self._core.name

    @property
    def endpoints(self) -> dict[str, str]:
        """The bound endpoints: ``mailbox`` (ZRE), ``pub`` (XPUB), ``sub``, ``pull``, ``service``."""
        core = self._core
        core.ensure_running()
        return {"mailbox": core.membership.endpoint, **{k: core._advertised(k, core.membership.advertise_address) for k in core.endpoints}}

    @property
    def running(self) -> bool:
        """True between `start` and `stop`."""
        return not self._core.closed

    # registration ---------------------------------------------------------------------------

    def _register(self, kind: str, name: str, handler: Callable[..., Any] | None) -> Any:
        def decorate(fn: Handler) -> Handler:
            if not callable(fn):
                raise TypeError("a handler must be callable")
            self._registry.add(kind, name, fn)
            self._core.registry_changed()
            return fn

        return decorate(handler) if handler is not None else decorate  # type: ignore[arg-type]

    def subscribe(self, prefix: str, handler: Callable[[Message], Any] | None = None) -> Any:
        """Handle every message whose topic starts with ``prefix`` (decorator or direct call).

        May be called before or while the node runs; peers learn of the subscription.
        Raises `ValueError` for a prefix longer than 200 bytes.
        """
        return self._register("topics", _check_name("topic", prefix), handler)

    def pull(self, queue: str, handler: Callable[[Message], Any] | None = None, *, at_least_once: bool = False) -> Any:
        """Take messages from the work queue ``queue``: each message goes to one puller.

        With ``at_least_once=True`` every message is acknowledged when the handler
        returns, and what a puller that dies had not acknowledged is redelivered to
        another (``msg.redelivered`` is then True). All pullers of a queue should agree.
        Raises `ValueError` if this node already pulls ``queue`` with another handler.
        """
        if at_least_once:
            self._registry.ack_queues = self._registry.ack_queues | {queue}
        return self._register("queues", _check_name("queue", queue), handler)

    def service(self, name: str, handler: Callable[[Message], Any] | None = None, *, idempotent: bool = False) -> Any:
        """Answer requests to service ``name``; the handler's return value is the reply.

        ``idempotent=True`` declares that running a request twice is harmless: a caller
        whose provider dies mid-request then retries on another provider instead of
        raising `PeerLostError`. Raises `ValueError` if this node already offers ``name``
        with another handler.
        """
        if idempotent:
            self._registry.idempotent = self._registry.idempotent | {name}
        return self._register("services", _check_name("service", name), handler)

    def unsubscribe(self, prefix: str, handler: Callable[..., Any] | None = None) -> bool:
        """Stop handling ``prefix`` (one handler, or all of them); True if anything was removed."""
        return self._unregister("topics", prefix, handler)

    def unpull(self, queue: str) -> bool:
        """Stop pulling ``queue``; True if this node pulled it."""
        return self._unregister("queues", queue, None)

    def unservice(self, name: str) -> bool:
        """Stop offering service ``name``; True if this node offered it."""
        return self._unregister("services", name, None)

    def remove_handler(self, handler: Callable[..., Any]) -> bool:
        """Remove ``handler`` wherever it is registered (topics, queues, services, callbacks)."""
        found = self._registry.remove_handler(handler)
        if found:
            self._core.registry_changed()
        return found

    def _unregister(self, kind: str, name: str, handler: Callable[..., Any] | None) -> bool:
        removed = self._registry.remove(kind, name, handler)
        if removed:
            self._core.registry_changed()
        return removed

    def _callback(self, event: str, handler: Any) -> Any:
        if not callable(handler):
            raise TypeError("a callback must be callable")
        self._registry.callbacks[event].append(handler)
        return handler

    def on_join(self, handler: Handler) -> Handler:
        """Call ``handler(peer)`` when a peer joins the mesh (decorator)."""
        return self._callback("join", handler)

    def on_leave(self, handler: Handler) -> Handler:
        """Call ``handler(peer)`` when a peer leaves, crashes or goes silent (decorator)."""
        return self._callback("leave", handler)

    def on_whisper(self, handler: Handler) -> Handler:
        """Call ``handler(msg)`` for each ZRE WHISPER; ``msg.data`` is the list of frames."""
        return self._callback("whisper", handler)

    def on_shout(self, handler: Handler) -> Handler:
        """Call ``handler(msg)`` for each ZRE SHOUT to a joined group (``msg.group``, ``msg.data`` frames)."""
        return self._callback("shout", handler)

    # views -------------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """The peers present now (snapshots): id, name, address, groups, offers, last seen."""
        return self._core.peers()

    def providers(self, service: str) -> list[Peer]:
        """The nodes offering ``service`` now, this one included (for scatter-gather)."""
        core = self._core
        found = (core.lookup_peer(i) for i in core.providers("services", service))
        return [p for p in found if p is not None]

    def stats(self) -> dict[str, Any]:
        """Counters: sent/received/dropped/errors per pattern, received per peer, rejects by reason."""
        return self._core.stats.snapshot()

    def _check_open(self) -> None:
        self._core.ensure_running()

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None and core.started and not getattr(self, "_stopped", True):
            warnings.warn(f"zmqmesh node {core.name!r} was garbage-collected without stop()", ResourceWarning, stacklevel=2)


def _peer_id(peer: str | Peer | None) -> str | None:
    return peer.id if isinstance(peer, Peer) else peer


def _frames(frames: tuple[bytes | str, ...]) -> list[bytes]:
    out = [f.encode() if isinstance(f, str) else bytes(f) for f in frames]
    if not out:
        raise ValueError("at least one frame is needed")
    return out


def stop_core(core: MeshCore, loop: Reactor, thread: threading.Thread, timeout: float) -> None:
    """Run the core's stop sequence from a caller's thread, then end the I/O thread (bounded).

    Never raises: a step that fails is logged and the later steps still run, so a half-dead
    node still releases its threads and sockets.
    """
    step = core.config.linger_s + 1  # no loop step takes long; this bounds a wedged loop

    def on_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return run_on(loop, fn, *args, timeout=step)

    def send_queued(deadline: float) -> None:
        while on_loop(core.send_queued, deadline):
            time.sleep(0.005)

    def attempt(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            log.warning("node %s: %s failed while stopping: %s", core.name, what, exc)
            return None

    deadline = attempt("starting the stop", on_loop, core.begin_stop, timeout)
    if deadline is not None:
        attempt("sending what is queued", send_queued, deadline)
        attempt("saying goodbye", on_loop, core.close_outbound)
        attempt("stopping the handlers", core.inbox.stop, timeout)
        attempt("closing the sockets", on_loop, core.close_sockets, deadline)
    loop.stop()
    thread.join(timeout)
    if deadline is None:
        return
    if thread.is_alive():  # a wedged loop may still use its sockets: leak them rather than crash
        log.warning("node %s: the I/O thread did not end; its ZeroMQ context is left open", core.name)
        return
    attempt("terminating the ZeroMQ context", core.destroy_context)


class Node(_NodeBase[Any]):
    """A mesh node with a blocking API; its core runs on a background I/O thread.

    ``def`` handlers run on the node's inbox thread, ``async def`` handlers on an asyncio
    loop of the node's own (started on first use), never on the I/O thread, so a slow
    handler delays only this node's deliveries, never its heartbeats. Every method is
    safe to call from any thread.

    Example::

        node = zmqmesh.Node("worker-1")

        @node.service("add")
        def add(msg):
            return msg.data["a"] + msg.data["b"]

        with node:
            node.request("add", {"a": 1, "b": 2}, timeout=2.0)   # -> 3
    """

    def __init__(self, name: str | None = None, *, config: NodeConfig | None = None, **options: Any) -> None:
        super().__init__(name, config=config, **options)
        self._loop: Reactor | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Node:
        """Bind, start discovery and handlers; returns the node. Raises `ZmqMeshError` on failure."""
        with self._lock:
            if self._thread is not None:
                if self._stopped:
                    raise NodeClosedError("a stopped node cannot be started again; create a new one")
                return self
            loop = Reactor()
            thread = threading.Thread(target=self._run_loop, args=(loop,), name=f"zmqmesh-io-{self.name}", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            try:
                run_on(loop, self._core.start, loop, timeout=30)
            except Exception as exc:
                self._stopped = True
                loop.stop()
                thread.join(5)
                if isinstance(exc, ZmqMeshError):
                    raise
                raise ZmqMeshError(f"node {self.name!r} failed to start: {exc}") from exc
        return self

    @staticmethod
    def _run_loop(loop: Reactor) -> None:
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain queued sends (up to ``linger_s``), say goodbye, close everything. Idempotent.

        Never hangs: each step is bounded, the whole by about ``linger_s + timeout`` seconds.
        Called from one of this node's own handlers, it starts the stop on another thread
        and returns at once (waiting there would wait for the handler itself).
        """
        with self._lock:
            if self._stopped or self._loop is None or self._thread is None:
                self._stopped = True
                return
            self._stopped = True
            loop, thread = self._loop, self._thread
        if threading.current_thread() is thread:
            raise ZmqMeshError("stop() cannot be called from the node's own I/O thread")
        if self._core.inbox is not None and self._core.inbox.runs_handlers_here():
            threading.Thread(target=stop_core, args=(self._core, loop, thread, timeout),
                             name=f"zmqmesh-stop-{self.name}", daemon=True).start()
            return
        stop_core(self._core, loop, thread, timeout)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # messaging ------------------------------------------------------------------------------------

    def publish(self, topic: str, data: Any) -> None:
        """Publish ``data`` on ``topic`` to every node subscribed to a prefix of it (this one too).

        Returns once queued; order per publisher is kept. Raises `TypeError` for data msgpack
        cannot encode, `NodeClosedError` if the node is not running.
        """
        item = self._encode_publication(topic, data)
        core = self._core
        q = core._pub_q
        if len(q) >= self.config.send_queue_max:
            core.wait_for_room_sync(q, time.monotonic() + self.config.push_timeout_s)
        q.append(item)
        core.wake_flush()

    def push(self, queue: str, data: Any, timeout: float | None = None) -> None:
        """Send ``data`` to exactly one node pulling ``queue`` (load-balanced round-robin).

        Waits up to ``timeout`` (default ``push_timeout_s``) for a puller to exist and for
        room in the send queue. Raises `NoProviderError` if nobody pulls ``queue``,
        `MeshTimeoutError` if the pullers do not keep up, `TypeError` for unencodable data.
        """
        body, q = self._encode_push(queue, data)
        if q is None:
            q = self._push_slow_path(queue, timeout)
        q.append(body)
        self._core.wake_flush()

    def _push_slow_path(self, queue: str, timeout: float | None) -> Any:
        """Create the queue's socket, wait for a puller, wait for room: whatever push lacks."""
        core = self._core
        deadline = time.monotonic() + (self.config.push_timeout_s if timeout is None else timeout)
        q = core.push_queue(queue)
        if q is None:
            core.call_on_loop(core.ensure_push_socket, _check_name("queue", queue))
            q = core.push_queue(queue)
            assert q is not None
        if not core.offers["queues"].get(queue):
            try:
                core.wait_until_sync(lambda: bool(core.offers["queues"].get(queue)), deadline - time.monotonic())
            except MeshTimeoutError:
                raise NoProviderError(f"no node pulls the queue {queue!r}") from None
        if len(q) >= self.config.send_queue_max:
            core.wait_for_room_sync(q, deadline)
        return q

    def request(self, service: str, data: Any = None, timeout: float | None = None, peer: str | Peer | None = None) -> Any:
        """Call ``service`` on one provider (round-robin, or the given ``peer``) and return its reply.

        Waits up to ``timeout`` (default ``request_timeout_s``) in all. Raises
        `NoProviderError` (nobody offers it), `MeshTimeoutError`, `PeerLostError` (the
        provider left mid-request, raised as soon as that is known), `RemoteError` (the
        handler raised), `TypeError` for unencodable data.
        """
        core = self._core
        core.ensure_running()
        if threading.get_ident() == core.loop_thread:
            raise ZmqMeshError("Node.request would block the node's own I/O thread")
        body = core.codec.encode(data)
        return core.thread_requester().request(
            service, self._service_name(service), body, self.config.request_timeout_s if timeout is None else timeout,
            _peer_id(peer),
        )

    def node_stats(self, peer: str | Peer, timeout: float = 5.0) -> dict[str, Any]:
        """Ask a zmqmesh peer (or this node) for its counters, as `stats` returns them there."""
        core = self._core
        core.ensure_running()
        result: dict[str, Any] = core.thread_requester().request(
            "\x00stats", b"\x00stats", core.codec.encode(None), timeout, _peer_id(peer))
        return result

    def whisper(self, peer_id: str, *frames: bytes | str) -> None:
        """Send a ZRE WHISPER (raw frames) to one peer, zmqmesh or plain ZRE."""
        self._call(self._whisper, peer_id, _frames(frames))

    def shout(self, group: str, *frames: bytes | str) -> int:
        """Send a ZRE SHOUT (raw frames) to every peer in ``group``; returns how many got it."""
        return int(self._call(self._shout, group, _frames(frames)))

    def join(self, group: str) -> None:
        """Join a ZRE group (to receive its shouts)."""
        self._call(self._join, group)

    def leave(self, group: str) -> None:
        """Leave a ZRE group."""
        self._call(self._leave, group)

    def _whisper(self, peer_id: str, frames: list[bytes]) -> None:
        self._core.membership.whisper(peer_id, frames)

    def _shout(self, group: str, frames: list[bytes]) -> int:
        return self._core.membership.shout(group, frames)

    def _join(self, group: str) -> None:
        self._core.join_group(group)

    def _leave(self, group: str) -> None:
        self._core.leave_group(group)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._core.ensure_running()
        return self._core.call_on_loop(fn, *args)

    # waiting ----------------------------------------------------------------------------------------

    def wait_for_peers(self, n: int, timeout: float = 10.0) -> list[Peer]:
        """Block until at least ``n`` peers are present; returns them. Raises `MeshTimeoutError`."""
        core = self._core
        core.ensure_running()
        core.wait_until_sync(lambda: len(core._peer_index) >= n, timeout)
        return self.peers()

    def wait_for_subscribers(self, topic: str, n: int, timeout: float = 10.0) -> None:
        """Block until ``n`` nodes' subscriptions matching ``topic`` are in place at this publisher.

        Uses the XPUB's subscription events, not a sleep: what is published afterwards
        reaches them. Raises `MeshTimeoutError`.
        """
        core = self._core
        core.ensure_running()
        core.wait_until_sync(lambda: core.subscribers_ready(topic, n), timeout)

    def wait_for_service(self, name: str, n: int = 1, timeout: float = 10.0) -> None:
        """Block until ``n`` nodes offer service ``name``. Raises `MeshTimeoutError`."""
        self._wait_offer("services", name, n, timeout)

    def wait_for_pullers(self, queue: str, n: int = 1, timeout: float = 10.0) -> None:
        """Block until ``n`` nodes pull ``queue``. Raises `MeshTimeoutError`."""
        self._wait_offer("queues", queue, n, timeout)

    def _wait_offer(self, kind: str, name: str, n: int, timeout: float) -> None:
        core = self._core
        core.ensure_running()
        core.wait_until_sync(lambda: len(core.providers(kind, name)) >= n, timeout)
