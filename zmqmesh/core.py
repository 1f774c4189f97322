"""The engine under `Node` and `AsyncNode`: one implementation, driven by one event loop.

For `AsyncNode` the loop is the caller's asyncio loop; for `Node` it is a `Reactor` on a
background I/O thread. The core uses only the callback API both loops share (readers,
timers, ``call_soon``), so it never imports asyncio itself. It owns membership (ZRE),
the outbound pattern sockets (XPUB and one PUSH per queue, connected to what peers offer
as they come and go), the request sockets of coroutines, and the waits callers block on. The inbound sockets belong to the inbox
(see `inbox`), which runs where the handlers run.

Publishing and pushing never cross threads per message: callers encode and append to a
queue, and the loop sends whatever has accumulated, several messages to one frame, as
soon as it gets to it (it never waits for a batch to fill).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid as uuid_module
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from concurrent import futures
from typing import Any, NamedTuple, Protocol

import zmq

from . import __version__ as _version
from . import wire
from .codec import Codec
from .config import NodeConfig
from .discovery import BeaconSocket
from .errors import MeshTimeoutError, NodeClosedError, NoProviderError, ZmqMeshError
from .inbox import Call, Inbox
from .membership import HEADER, OFFER_PREFIXES, Membership, MembershipEvents, PeerState
from .message import Message, Peer
from .netif import (
    LOOPBACK_ADDRESS,
    LOOPBACK_BROADCAST,
    interface_addresses,
    is_loopback,
)
from .reactor import run_on
from .reliable import ReliableSender
from .reqrep import ThreadRequester
from .security import (
    KeyPair,
    ZapHandler,
    check_key,
    make_client,
    make_server,
    read_secret_key,
)
from .sockets import can_send, close_watched, has_input, send_frames
from .stats import Stats

__all__ = ["MeshCore", "Registry", "Provider", "no_provider"]

log = logging.getLogger("zmqmesh.node")

_BATCH_MESSAGES = wire.MAX_BATCH_ITEMS
_BATCH_BYTES = 64 * 1024
_LARGE_FRAME = 64 * 1024
_RETRY_S = 0.002
_GOODBYE_LINGER_MS = 200
_MAX_TRACKED_TOPICS = 65_536
_OFFER_KINDS = ("services", "queues", "topics", "ackqueues", "idempotent")


class Waiter(Protocol):
    """What waits on a condition: an asyncio or a concurrent.futures future."""

    def done(self) -> bool: ...
    def set_result(self, result: None) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class Provider(NamedTuple):
    """A node offering something, the endpoint to reach that offer, and its CURVE key."""

    id: str
    endpoint: str
    key: str | None = None


class Registry:
    """The handlers registered on a node. Replaced copy-on-write so other threads read safely."""

    def __init__(self) -> None:
        self.topics: dict[str, list[Callable[..., Any]]] = {}
        self.queues: dict[str, Callable[..., Any]] = {}
        self.services: dict[str, Callable[..., Any]] = {}
        self.callbacks: dict[str, list[Callable[..., Any]]] = {"join": [], "leave": [], "whisper": [], "shout": []}
        self.ack_queues: frozenset[str] = frozenset()
        self.idempotent: frozenset[str] = frozenset()
        self.version = 0

    def offers(self) -> dict[str, frozenset[str]]:
        """What this node offers, by kind."""
        return {
            "services": frozenset(self.services),
            "queues": frozenset(self.queues),
            "topics": frozenset(self.topics),
            "ackqueues": frozenset(self.queues) & self.ack_queues,
            "idempotent": frozenset(self.services) & self.idempotent,
        }

    def add(self, kind: str, name: str, handler: Callable[..., Any]) -> None:
        """Register ``handler`` for a topic prefix, queue or service. Raises `ValueError` on a clash."""
        if kind == "topics":
            topics = dict(self.topics)
            topics[name] = [*topics.get(name, []), handler]
            self.topics = topics
        else:
            table = dict(getattr(self, kind))
            if name in table and table[name] is not handler:
                what = "queue" if kind == "queues" else "service"
                raise ValueError(f"this node already has a handler for the {what} {name!r}")
            table[name] = handler
            setattr(self, kind, table)
        self.version += 1

    def remove(self, kind: str, name: str, handler: Callable[..., Any] | None = None) -> bool:
        """Remove the handler(s) of a name; True if anything was removed."""
        table = dict(getattr(self, kind))
        if name not in table:
            return False
        if kind == "topics" and handler is not None:
            left = [h for h in table[name] if h is not handler]
            if len(left) == len(table[name]):
                return False
            if left:
                table[name] = left
            else:
                del table[name]
        elif handler is not None and kind != "topics" and table[name] is not handler:
            return False
        else:
            del table[name]
        setattr(self, kind, table)
        self.version += 1
        return True

    def remove_handler(self, handler: Callable[..., Any]) -> bool:
        """Remove ``handler`` wherever it is registered; True if it was."""
        found = False
        for kind in ("services", "queues", "topics"):
            for name, entry in list(getattr(self, kind).items()):
                if entry is handler or (isinstance(entry, list) and handler in entry):
                    found |= self.remove(kind, name, handler)
        for callbacks in self.callbacks.values():
            if handler in callbacks:
                callbacks.remove(handler)
                found = True
        return found


class MeshCore(MembershipEvents):
    """State and sockets of one node, driven by one event loop.

    ``inbox_type`` says where handlers run (`ThreadInbox` for `Node`, the asyncio
    ``LoopInbox`` for `AsyncNode`); ``requester_type``, if given, makes the requester of
    coroutines (``LoopRequester``). Threads use `thread_requester` instead.
    """

    def __init__(self, name: str, config: NodeConfig, registry: Registry,
                 inbox_type: type[Inbox], requester_type: Callable[[MeshCore], Any] | None = None) -> None:
        self.uuid = uuid_module.uuid4().bytes
        self.node_id = self.uuid.hex()
        self.name = name or f"node-{self.node_id[:6]}"
        self.config = config
        self.registry = registry
        self._inbox_type = inbox_type
        self._requester_type = requester_type
        self.codec = Codec(config.max_message_bytes)
        self.stats = Stats()
        self.loop: Any = None  # the Reactor or the asyncio loop, set by start
        self.loop_thread = 0
        self.ctx: zmq.Context[Any] = None  # type: ignore[assignment]
        self.closed = True
        self.started = False
        self.membership: Membership = None  # type: ignore[assignment]
        self.inbox: Any = None  # a ThreadInbox or a LoopInbox
        self.requester: Any = None  # a LoopRequester, for AsyncNode
        self.endpoints: dict[str, str] = {}
        self.inproc: dict[str, str] = {}
        self.alive_ids: frozenset[str] = frozenset()
        self.membership_epoch = 0
        self.offers: dict[str, dict[str, tuple[str, ...]]] = {k: {} for k in _OFFER_KINDS}
        self._peer_index: dict[str, PeerState] = {}
        self._user_groups: set[str] = set()
        self._rr = itertools.count()
        self._skip: dict[tuple[str, str], float] = {}
        self._waiters: list[tuple[Callable[[], bool], Waiter]] = []
        # outbound
        self._xpub: zmq.Socket[Any] | None = None
        self._xpub_connected: set[str] = set()
        self._sub_counts: defaultdict[bytes, int] = defaultdict(int)
        self._pub_q: deque[tuple[bytes, bytes]] = deque()
        self._pub_seq: dict[bytes, int] = {}
        self._push_q: dict[str, deque[bytes]] = {}
        self._push_socks: dict[str, zmq.Socket[Any]] = {}
        self._push_connected: dict[str, set[str]] = {}
        self._flush_scheduled = False
        self._retry_handle: Any = None
        self._space = threading.Condition()
        self._space_waiters = 0
        self.space_event: Any = None  # set() whenever queues drain; AsyncNode's waits install one
        self._thread_requesters: list[ThreadRequester] = []
        self._requester_local = threading.local()
        self.keys: KeyPair | None = None
        self._rebuild_pending = False
        self._zap: ZapHandler | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, loop: Any) -> None:
        """Create the context and sockets, bind, and begin discovery (on ``loop``'s thread)."""
        self.loop = loop
        self.loop_thread = threading.get_ident()
        cfg = self.config
        if cfg.interface:
            address, broadcast = interface_addresses(cfg.interface)
        else:
            address, broadcast = LOOPBACK_ADDRESS, LOOPBACK_BROADCAST
        bind_address = cfg.bind_address or address
        advertise = cfg.advertise_address or (address if bind_address == "0.0.0.0" else bind_address)
        if advertise == "0.0.0.0":
            raise ZmqMeshError("advertise_address must be an address peers can reach, not 0.0.0.0")
        beacon_target = cfg.beacon_address or broadcast
        secret = cfg.curve_secret_key
        if cfg.curve_key_file is not None:
            secret = read_secret_key(cfg.curve_key_file)
        self.keys = KeyPair.from_secret(secret) if secret is not None else None
        allowed = frozenset(check_key(k, "public key in curve_allow") for k in cfg.curve_allow)
        self.ctx = zmq.Context(io_threads=1)
        try:
            if self.keys is not None:  # the ZAP handler must exist before any socket binds
                self._zap = ZapHandler(self.ctx, self.loop, self.keys, allowed, self.stats)
            self._open_sockets(bind_address)
            beacon = None
            if cfg.discovery:
                beacon = BeaconSocket(beacon_target, cfg.beacon_port, loopback_only=is_loopback(advertise))
            self.membership = Membership(
                loop=self.loop,
                ctx=self.ctx,
                config=cfg,
                uuid=self.uuid,
                name=self.name,
                codec=self.codec,
                stats=self.stats,
                events=self,
                bind_address=bind_address,
                advertise_address=advertise,
                beacon=beacon,
                keys=self.keys,
                allowed=allowed,
            )
            self.membership.bind()
        except Exception:
            self.ctx.destroy(linger=0)
            raise
        headers = {
            HEADER["version"]: _version,
            HEADER["mesh"]: cfg.mesh,
            HEADER["pub"]: self._advertised("pub", advertise),
            HEADER["sub"]: self._advertised("sub", advertise),
            HEADER["pull"]: self._advertised("pull", advertise),
            HEADER["service"]: self._advertised("service", advertise),
            HEADER["host"]: socket.gethostname(),
            HEADER["pid"]: str(os.getpid()),
        }
        if self.keys is not None:
            headers[HEADER["key"]] = self.keys.public
        if self._requester_type is not None:
            self.requester = self._requester_type(self)
        self.reliable = ReliableSender(self)
        self.inbox.start()
        self.closed = False
        self.started = True
        self._rebuild()
        self.membership.start(headers, self._own_groups())
        self.loop.add_reader(self._xpub.FD, self._on_xpub)  # type: ignore[union-attr]
        self.loop.call_soon(self._on_xpub)  # descriptors are edge-triggered: look once now
        log.info("node %s (%s) started, mailbox %s", self.name, self.node_id[:8], self.membership.endpoint)

    def _advertised(self, key: str, advertise: str) -> str:
        return "tcp://{}:{}".format(advertise, self.endpoints[key].rsplit(":", 1)[1])

    def _open_sockets(self, bind_address: str) -> None:
        cfg = self.config
        ctx = self.ctx
        limit = cfg.max_message_bytes + 4096
        sockets: dict[str, zmq.Socket[Any]] = {}
        for key, kind in (("sub", zmq.SUB), ("pull", zmq.PULL), ("service", zmq.ROUTER), ("pub", zmq.XPUB)):
            sock = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, cfg.recv_hwm)
            sock.setsockopt(zmq.SNDHWM, cfg.send_hwm)
            sock.setsockopt(zmq.MAXMSGSIZE, limit)
            if kind == zmq.ROUTER:
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if kind == zmq.XPUB:
                sock.setsockopt(zmq.XPUB_VERBOSER, 1)
            if self.keys is not None:
                make_server(sock, self.keys)
            sock.bind(f"tcp://{bind_address}:*")
            self.endpoints[key] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if kind != zmq.XPUB:
                self.inproc[key] = f"inproc://zmqmesh-{self.node_id}-{key}"
                sock.bind(self.inproc[key])
            sockets[key] = sock
        self._xpub = sockets["pub"]
        self._xpub.connect(self.inproc["sub"])  # the publisher's own subscriptions
        self.inbox = self._inbox_type(self, sockets["sub"], sockets["pull"], sockets["service"])

    # The stop sequence, in steps: the node kinds run them in this order, each step where it
    # belongs (``loop``: on the loop's thread), and wait between them in their own way.
    #   deadline = begin_stop(timeout)          loop; None if already stopping
    #   while send_queued(deadline): pause 5 ms  loop
    #   close_outbound()                        loop
    #   inbox.stop(timeout)                     blocking for ThreadInbox, awaited for LoopInbox
    #   close_sockets(deadline)                 loop
    #   ctx.destroy(0)                          off the loop: waits out the lingers

    def begin_stop(self, timeout: float) -> float | None:
        """Refuse new work; the deadline for draining queued sends (None if already stopping)."""
        if self.closed or not self.started:
            return None
        self.closed = True
        return time.monotonic() + min(self.config.linger_s, timeout)

    def send_queued(self, deadline: float) -> bool:
        """Send what is queued; True while some remains and ``deadline`` has not passed."""
        if not self._queued():
            return False
        self._flush()
        return bool(self._queued()) and time.monotonic() < deadline

    def close_outbound(self) -> None:
        """Count what could not be sent, say goodbye, fail the waits and outstanding requests."""
        left = self._queued()
        if left:
            self.stats.pattern["pipeline"]["dropped"] += left
            log.warning("node %s stopped with %d queued message(s) unsent (no room or no puller)", self.name, left)
        self.reliable.close()
        self.membership.say_goodbye()
        for _predicate, waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_exception(NodeClosedError("the node stopped"))
        if self.requester is not None:
            self.requester.close()

    def close_sockets(self, deadline: float) -> None:
        """Close membership and the outbound sockets; what they hold may go out until ``deadline``."""
        # bounded: dead peers cannot hold up the stop beyond the deadline; the goodbyes (and
        # a greeting still in flight) get a moment even when draining used the deadline up
        linger_ms = max(0, int((deadline - time.monotonic()) * 1000))
        self.membership.close(max(linger_ms, min(_GOODBYE_LINGER_MS, int(self.config.linger_s * 1000))))
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        for sock in [self._xpub, *self._push_socks.values()]:
            if sock is not None:
                close_watched(self.loop, sock, linger_ms)
        self._push_socks.clear()
        with self._space:
            self._space.notify_all()
        for requester in list(self._thread_requesters):
            requester.close()
        if self._zap is not None:
            self._zap.close()

    def destroy_context(self) -> None:
        """Terminate the ZeroMQ context (off the loop: it waits out the lingers set above)."""
        self.ctx.destroy(0)
        log.info("node %s (%s) stopped", self.name, self.node_id[:8])

    def _queued(self) -> int:
        queued = len(self._pub_q) + sum(len(q) for q in self._push_q.values())
        return queued + (self.reliable.pending() if self.started else 0)

    # -- offers, providers and waiting ---------------------------------------------------------

    def _own_groups(self) -> set[str]:
        groups = set(self._user_groups)
        for kind, names in self.registry.offers().items():
            groups.update(OFFER_PREFIXES[kind] + name for name in names)
        return groups

    def _rebuild(self) -> None:
        """Recompute the offer tables and connections after any membership or registry change."""
        offers: dict[str, defaultdict[str, list[str]]] = {k: defaultdict(list) for k in _OFFER_KINDS}
        for kind, names in self.registry.offers().items():
            for name in names:
                offers[kind][name].append(self.node_id)
        index: dict[str, PeerState] = {}
        for peer in self.membership.ready_peers():
            index[peer.id] = peer
            if peer.is_zmqmesh:
                for kind in _OFFER_KINDS:
                    for name in peer.offers(kind):
                        offers[kind][name].append(peer.id)
        self._peer_index = index
        self.offers = {k: {n: tuple(ids) for n, ids in v.items()} for k, v in offers.items()}
        self.alive_ids = frozenset(index) | {self.node_id}
        self.membership_epoch += 1
        self._sync_connections()
        self._check_waiters()

    def _endpoint_of(self, node_id: str, key: str) -> tuple[str, str | None] | None:
        """The endpoint of a node's pattern socket, and the node's CURVE key."""
        if node_id == self.node_id:
            return self.inproc[key], None
        peer = self._peer_index.get(node_id)
        endpoint = peer.endpoint_of(key) if peer is not None else None
        return (endpoint, peer.key) if endpoint is not None else None  # type: ignore[union-attr]

    def offers_endpoint(self, node_id: str) -> tuple[str, str | None] | None:
        """The service endpoint (which also takes at-least-once queues) of a node, and its key."""
        return self._endpoint_of(node_id, "service")

    def may_retry(self, service: str, lost_id: str, deadline: float) -> bool:
        """Whether a request to ``service`` lost with provider ``lost_id`` is to be resent.

        The lost provider is gone from the offer tables by now, so this asks whether the
        remaining providers declare the service idempotent (and time is left).
        """
        if not self.offers["idempotent"].get(service) or time.monotonic() >= deadline:
            return False
        log.info("provider %s of idempotent %r left: retrying elsewhere", lost_id[:8], service)
        return True

    def connect(self, sock: zmq.Socket[Any], endpoint: str, peer_key: str | None) -> None:
        """Connect ``sock``, as a CURVE client of ``peer_key`` when this node is secure."""
        if self.keys is not None and not endpoint.startswith("inproc://"):
            make_client(sock, self.keys, peer_key or self.keys.public)
        sock.connect(endpoint)

    def _sync_connections(self) -> None:
        if self._xpub is not None:
            wanted = {
                ep: p.key for p in self._peer_index.values() if p.is_zmqmesh and (ep := p.endpoint_of("sub")) is not None
            }
            self._reconnect(self._xpub, self._xpub_connected, wanted)
        for queue, sock in self._push_socks.items():
            targets = (self._endpoint_of(i, "pull") for i in self.offers["queues"].get(queue, ()))
            self._reconnect(sock, self._push_connected[queue], dict(t for t in targets if t is not None))

    def _reconnect(self, sock: zmq.Socket[Any], connected: set[str], wanted: dict[str, str | None]) -> None:
        for endpoint in connected - set(wanted):
            try:
                sock.disconnect(endpoint)
            except zmq.ZMQError:
                pass
            connected.discard(endpoint)
        for endpoint, key in wanted.items():
            if endpoint in connected:
                continue
            try:
                self.connect(sock, endpoint, key)
                connected.add(endpoint)
            except zmq.ZMQError as exc:
                log.warning("cannot connect to %s: %s", endpoint, exc)

    def providers(self, kind: str, name: str) -> tuple[str, ...]:
        """Ids of the nodes (this one included) offering ``name`` of ``kind``."""
        return self.offers[kind].get(name, ())

    def pick_provider(self, service: str, only: str | None = None) -> Provider | None:
        """One provider of ``service`` (``only`` that node, if given), round-robin, skipping
        those that just refused it."""
        ids = self.offers["services"].get(service, ())
        if only is not None:
            builtin = service.startswith("\x00") and only in self.alive_ids
            ids = (only,) if only in ids or builtin else ()
        if not ids:
            return None
        candidates: Any = ids
        if self._skip:
            now = time.monotonic()
            candidates = [i for i in ids if self._skip.get((service, i), 0) < now] or ids
            if len(self._skip) > 1024:
                self._skip = {k: t for k, t in self._skip.items() if t > now}
        start = next(self._rr)
        for k in range(len(candidates)):
            node_id = candidates[(start + k) % len(candidates)]
            target = self._endpoint_of(node_id, "service")
            if target is not None:
                return Provider(node_id, *target)
        return None

    def skip_provider(self, service: str, node_id: str) -> None:
        """Avoid ``node_id`` for ``service`` for a moment (it said it no longer offers it)."""
        self._skip[(service, node_id)] = time.monotonic() + 2.0

    def wait_for_provider_sync(self, service: str, deadline: float, only: str | None = None) -> Provider:
        """A provider of ``service``, waiting until ``deadline`` (from any thread but the loop's)."""
        provider = self.pick_provider(service, only)
        while provider is None:
            self.ensure_running()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise no_provider(service, only)
            try:
                self.wait_until_sync(lambda: self.pick_provider(service, only) is not None, remaining)
            except MeshTimeoutError:
                raise no_provider(service, only) from None
            provider = self.pick_provider(service, only)
        return provider

    def add_waiter(self, predicate: Callable[[], bool], waiter: Waiter) -> None:
        """Complete ``waiter`` once ``predicate()`` holds, re-checked on every change (loop only).

        Only the loop completes waiters; one its caller gave up on is removed with
        `remove_waiter` (an asyncio future cancelled on the loop is skipped as done).
        """
        if waiter.done():
            return
        if self.closed:
            waiter.set_exception(NodeClosedError("the node is not running"))
            return
        try:
            if predicate():
                waiter.set_result(None)
                return
        except Exception as exc:
            waiter.set_exception(exc)
            return
        if len(self._waiters) >= 64:
            self._waiters = [entry for entry in self._waiters if not entry[1].done()]
        self._waiters.append((predicate, waiter))

    def remove_waiter(self, waiter: Waiter) -> None:
        """Forget ``waiter`` (after it completed or its caller gave up; loop only)."""
        self._waiters = [entry for entry in self._waiters if entry[1] is not waiter]

    def wait_until_sync(self, predicate: Callable[[], bool], timeout: float | None) -> None:
        """Block the calling thread (not the loop's) until ``predicate()`` holds on the loop.

        The condition is checked at least once, also with ``timeout=0``; ``None`` waits as
        long as the node runs. Raises `MeshTimeoutError` after ``timeout`` seconds,
        `NodeClosedError` if the node stops.
        """
        self.ensure_running()
        if threading.get_ident() == self.loop_thread:
            raise ZmqMeshError("a blocking Node call was made on the node's own I/O thread")
        if timeout is not None and timeout <= 0:
            if self.call_on_loop(predicate):
                return
            raise MeshTimeoutError("condition not met (timeout 0)")
        waiter: futures.Future[None] = futures.Future()  # completed by the loop thread only
        try:
            self.call_soon(self.add_waiter, predicate, waiter)
        except RuntimeError:  # the I/O loop is gone
            raise NodeClosedError("the node is not running") from None
        try:
            waiter.result(timeout)
        except futures.TimeoutError:
            try:
                self.call_soon(self.remove_waiter, waiter)
            except RuntimeError:
                pass
            if waiter.done():  # completed as the time ran out
                waiter.result()
                return
            raise MeshTimeoutError(f"condition not met within {timeout:.3g} s") from None

    def _check_waiters(self) -> None:
        done = False
        for predicate, waiter in list(self._waiters):
            if waiter.done():
                done = True
                continue
            try:
                if predicate():
                    waiter.set_result(None)
                    done = True
            except Exception as exc:
                waiter.set_exception(exc)
                done = True
        if done:
            self._waiters = [entry for entry in self._waiters if not entry[1].done()]

    def subscribers_ready(self, topic: str, n: int) -> bool:
        """True once ``n`` subscribers matching ``topic`` have their subscription at our XPUB.

        Counts the XPUB's subscription events (so subscribers from outside the mesh count
        too); a member subscribed with several matching prefixes is counted once.
        """
        topic_b = topic.encode()
        total = sum(c for p, c in self._sub_counts.items() if topic_b.startswith(p))
        per_node: Counter[str] = Counter()
        for prefix, ids in self.offers["topics"].items():
            if topic.startswith(prefix):
                per_node.update(ids)
        overcount = sum(k - 1 for k in per_node.values())
        return total - overcount >= n

    def call_on_loop(self, fn: Callable[..., Any], *args: Any, timeout: float | None = 10.0) -> Any:
        """Run ``fn(*args)`` on the loop from another thread and return its result."""
        if threading.get_ident() == self.loop_thread:
            raise ZmqMeshError("a blocking Node call was made on the node's own I/O thread")
        return run_on(self.loop, fn, *args, timeout=timeout)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the loop soon (from any thread)."""
        if threading.get_ident() == self.loop_thread:
            self.loop.call_soon(fn, *args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def ensure_running(self) -> None:
        """Raise `NodeClosedError` unless the node is running."""
        if self.closed:
            raise NodeClosedError("the node is not running (start it first, or it was stopped)")

    # -- peers ----------------------------------------------------------------------------------

    def lookup_peer(self, node_id: str) -> Peer | None:
        """The `Peer` with this id (this node included), or None."""
        if node_id == self.node_id:
            return self.self_peer()
        peer = self._peer_index.get(node_id)
        return peer.snapshot() if peer is not None else None

    def self_peer(self) -> Peer:
        """This node, described as its peers see it."""
        offers = self.registry.offers()
        groups = frozenset(self._own_groups())
        return Peer(
            id=self.node_id,
            name=self.name,
            address=self.membership.advertise_address if self.membership else "",
            endpoint=self.membership.endpoint if self.membership else "",
            groups=groups,
            services=offers["services"],
            queues=offers["queues"],
            topics=offers["topics"],
            headers=dict(self.membership.headers) if self.membership else {},
            last_seen=time.time(),
        )

    def peers(self) -> list[Peer]:
        """Snapshots of every ready peer."""
        return [p.snapshot() for p in list(self._peer_index.values())]

    # membership events (on the loop) ----------------------------------------------------------

    def peer_ready(self, peer: PeerState) -> None:
        self._rebuild()
        self._post("join", peer.snapshot())

    def peer_gone(self, peer: PeerState, reason: str) -> None:
        self._rebuild()
        if self.requester is not None:
            self.requester.peer_gone(peer.id)
        self.reliable.peer_gone(peer.id)
        self._post("leave", peer.snapshot())

    def peer_groups_changed(self, peer: PeerState) -> None:
        # at most one rebuild per loop turn: a burst of JOINs must not cost a rebuild each
        if not self._rebuild_pending:
            self._rebuild_pending = True
            self.loop.call_soon(self._deferred_rebuild)

    def _deferred_rebuild(self) -> None:
        self._rebuild_pending = False
        if not self.closed:
            self._rebuild()

    def zre_message(self, kind: str, peer: PeerState, group: str, frames: list[bytes]) -> None:
        msg = Message(kind, group, frames, peer.id, self.lookup_peer)
        self._post(kind, msg)

    def _post(self, event: str, arg: Any) -> None:
        callbacks = self.registry.callbacks[event]
        if callbacks and not self.inbox_stopped():
            self.inbox.post([Call(cb, arg, None, "zre") for cb in callbacks])

    def inbox_stopped(self) -> bool:
        """True once the inbox no longer takes work."""
        return self.inbox is None or self.inbox._stopping

    # -- registry and groups ----------------------------------------------------------------------

    def registry_changed(self) -> None:
        """Apply a handler registered or removed at run time (from any thread)."""
        if not self.closed:
            self.call_soon(self._apply_registry)

    def _apply_registry(self) -> None:
        if self.closed:
            return
        wanted = self._own_groups()
        current = set(self.membership.groups)
        for group in sorted(current - wanted):
            self.membership.leave(group)
        for group in sorted(wanted - current):
            self.membership.join(group)
        self.inbox.registry_changed()
        self._rebuild()

    def join_group(self, group: str) -> None:
        """Join a user ZRE group (loop only)."""
        if group.startswith("zmqmesh/"):
            raise ValueError("group names starting with 'zmqmesh/' are reserved")
        self._user_groups.add(group)
        self.membership.join(group)

    def leave_group(self, group: str) -> None:
        """Leave a user ZRE group (loop only)."""
        self._user_groups.discard(group)
        self.membership.leave(group)

    # -- publishing and pushing -------------------------------------------------------------------

    def push_queue(self, queue: str) -> deque[bytes] | None:
        """The send queue of ``queue`` once its PUSH socket exists."""
        return self._push_q.get(queue)

    def ensure_push_socket(self, queue: str) -> None:
        """Create and connect the PUSH socket of ``queue`` (loop only)."""
        if queue in self._push_socks:
            return
        self.ensure_running()
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        self._push_socks[queue] = sock
        self._push_connected[queue] = set()
        self._push_q[queue] = deque()
        self._sync_connections()
        self.loop.add_reader(sock.FD, self._on_push_socket, sock)
        self._wake_flush()

    def wait_for_room_sync(self, q: deque[Any], deadline: float) -> None:
        """Block while ``q`` is full (back-pressure); raises `MeshTimeoutError` at ``deadline``."""
        limit = self.config.send_queue_max
        with self._space:
            self._space_waiters += 1
            try:
                while len(q) >= limit:
                    self.ensure_running()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise MeshTimeoutError("send queue full: the receivers are not keeping up")
                    self._wake_flush()
                    self._space.wait(min(remaining, 0.1))
            finally:
                self._space_waiters -= 1

    def wake_flush(self) -> None:
        """Have the loop send what is queued, soon (from any thread)."""
        if not self._flush_scheduled:
            self._wake_flush()

    def _on_push_socket(self, sock: zmq.Socket[Any]) -> None:
        # The descriptor stays readable until someone reads ZMQ_EVENTS: with nothing queued
        # no send does, and the loop would spin. Reading it rearms the descriptor.
        if not sock.closed and can_send(sock) and any(self._push_q.values()):
            self._wake_flush()

    def _wake_flush(self) -> None:
        if self._flush_scheduled or self.loop is None:
            return
        self._flush_scheduled = True
        try:
            self.call_soon(self._flush)
        except RuntimeError:  # the loop is closed
            self._flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._xpub is None or self._xpub.closed:
            return
        blocked = False
        if self._pub_q:
            self._flush_pub()
        reliable = self.offers["ackqueues"]
        for queue, q in list(self._push_q.items()):
            try:
                if queue in reliable:
                    blocked |= self.reliable.flush(queue, q)
                elif q and self._flush_push(queue, q):
                    blocked = True
            except Exception:  # one queue's failure must not starve the others
                log.exception("sending on queue %r failed", queue)
                blocked = True
        if blocked and self._retry_handle is None:
            self._retry_handle = self.loop.call_later(_RETRY_S, self._retry)
        if self._space_waiters:
            with self._space:
                self._space.notify_all()
        if self.space_event is not None:
            self.space_event.set()

    def _retry(self) -> None:
        self._retry_handle = None
        self._flush()

    def _flush_pub(self) -> None:
        q = self._pub_q
        xpub = self._xpub
        assert xpub is not None
        uuid = self.uuid
        sent = 0
        while q:
            topic, body = q.popleft()
            bodies = [body]
            size = len(body)
            while q and q[0][0] == topic and len(bodies) < _BATCH_MESSAGES and size < _BATCH_BYTES:
                more = q.popleft()[1]
                bodies.append(more)
                size += len(more)
            seq = self._pub_seq.get(topic, 0)
            if len(self._pub_seq) >= _MAX_TRACKED_TOPICS and topic not in self._pub_seq:
                self._pub_seq.clear()  # subscribers take a restarted sequence as a new baseline
            self._pub_seq[topic] = seq + len(bodies)
            payload = body if len(bodies) == 1 else b"".join(bodies)
            try:
                send_frames(xpub, [topic, uuid + seq.to_bytes(8, "big"), payload], copy=size < _LARGE_FRAME)
                sent += len(bodies)
            except zmq.ZMQError:
                self.stats.pattern["pubsub"]["dropped"] += len(bodies)
        self.stats.pattern["pubsub"]["sent"] += sent
        if has_input(xpub):
            self.loop.call_soon(self._on_xpub)

    def _flush_push(self, queue: str, q: deque[bytes]) -> bool:
        sock = self._push_socks.get(queue)
        if sock is None:
            return False
        name = queue.encode()
        uuid = self.uuid
        counters = self.stats.pattern["pipeline"]
        # ZeroMQ deals whole frames round-robin: keep frames small enough that what is
        # queued now is spread over every puller.
        pullers = max(1, len(self.offers["queues"].get(queue, ())))
        limit = max(1, min(_BATCH_MESSAGES, len(q) // pullers))
        while q:
            n = 0
            size = 0
            bodies: list[bytes] = []
            # pop, never iterate: callers' threads append to q while the loop runs this
            while q and (n == 0 or (n < limit and size + len(q[0]) <= _BATCH_BYTES)):
                body = q.popleft()
                bodies.append(body)
                n += 1
                size += len(body)
            payload = bodies[0] if n == 1 else b"".join(bodies)
            try:
                send_frames(sock, [name, uuid, payload], copy=size < _LARGE_FRAME)
            except zmq.ZMQError as exc:
                q.extendleft(reversed(bodies))  # back at the front, in order
                if not isinstance(exc, zmq.Again):
                    log.error("push to %r failed: %s", queue, exc)
                return True
            counters["sent"] += n
        return False

    def _on_xpub(self) -> None:
        xpub = self._xpub
        if xpub is None or xpub.closed:
            return
        changed = False
        for _ in range(1024):
            try:
                event = xpub.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            if not event:
                continue
            prefix = event[1:]
            if len(prefix) > wire.MAX_NAME_BYTES:
                continue  # longer than any topic: it can match nothing we publish
            if event[0] == 1:
                self._sub_counts[prefix] += 1
            elif event[0] == 0:
                self._sub_counts[prefix] -= 1
                if self._sub_counts[prefix] <= 0:
                    del self._sub_counts[prefix]
            changed = True
        if changed:
            self._check_waiters()

    # -- requests from threads ------------------------------------------------------------------

    def thread_requester(self) -> ThreadRequester:
        """The calling thread's requester (created on first use)."""
        requester: ThreadRequester | None = getattr(self._requester_local, "requester", None)
        if requester is None or requester.core is not self:
            requester = ThreadRequester(self)
            self._requester_local.requester = requester
            self._thread_requesters.append(requester)
        return requester


def no_provider(service: str, only: str | None) -> NoProviderError:
    """The error for a service nobody (or not the node ``only``) offers."""
    where = f"node {only[:8]}" if only else "no node"
    return NoProviderError(f"{where} offers the service {service!r}")
