"""The engine under `Node` and `AsyncNode`: it composes the layers below and drives them
from one event loop, and it holds the one stop plan both node kinds follow.

For `AsyncNode` the loop is the caller's asyncio loop; for `Node` it is a `Reactor` on a
background I/O thread. The engine uses only the callback API both loops share (readers,
timers, ``call_soon``), so it never imports asyncio itself, and it never imports a
driver: the node hands it the driver's inbox and requester factories.

What it owns: the ZeroMQ context, membership (ZRE), the directory of offers, the
outbound senders (pub/sub, pipeline, at-least-once), the waiters, and the start and
stop of all of them. It turns membership events into directory rebuilds, connection
updates, and callbacks for the inbox to run.
"""

from __future__ import annotations

import _thread
import errno
import functools
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from .._ids import uuid4_bytes
from .._io import inherited
from .._io.beacon import BeaconSocket
from .._io.netif import (
    LOOPBACK_ADDRESS,
    LOOPBACK_BROADCAST,
    interface_addresses,
    is_loopback,
)
from .._io.reactor import EventLoop, run_on
from .._io.sockets import CONTROL_HWM, LISTEN_BACKLOG, new_socket
from .._membership.engine import MAX_PEERS, ZMQ_SOCKETS_PER_PEER, Membership
from .._membership.peer import PeerState
from .._mesh.directory import Directory, Provider
from .._mesh.registry import Registry
from .._mesh.waiters import Space, Waiters
from .._observe import tracing
from .._patterns.calls import Call
from .._patterns.pipeline import Pusher
from .._patterns.pubsub import Publisher
from .._patterns.reliable import ReliableSender
from .._stats import LogThrottle, Stats
from .._version import __version__ as _version
from .._wire.codec import Codec
from .._wire.frames import (
    ENDPOINT_KEYS,
    FRAME_HEADROOM,
    HEADER,
    OFFER_PREFIXES,
    PROTOCOL,
    inproc_endpoint,
    requester_id,
)
from ..config import NodeConfig
from ..errors import ConfigError, MeshTimeoutError, NodeClosedError, ZmqMeshError
from ..message import Message, Peer
from .outbound import Outbound

if TYPE_CHECKING:
    from .._io.curve import KeyPair, ZapHandler
    from .._observe.prometheus import MetricsServer
    from .._patterns.durable import DurableQueues
    from .._patterns.history import History
    from .._store.store import Store

__all__ = ["Engine", "Inbox", "Requests", "InboxFactory", "RequestsFactory"]

log = logging.getLogger("zmqmesh.node")

_GOODBYE_LINGER_MS = 200
_EXPIRE_EVERY_S = 1.0
_NO_SUCH_ADDRESS = frozenset({errno.ENODEV, errno.EADDRNOTAVAIL, errno.EINVAL})
"""What ZeroMQ's bind answers for an address no interface of this host has, or not an address."""
RESERVED_GROUP_PREFIX = "zmqmesh/"
"""ZRE groups whose names begin so are zmqmesh's own (its offers): not the user's to join, leave or shout to."""
_CHOSEN_BY = tuple(OFFER_PREFIXES[kind] for kind in ("services", "queues", "ackqueues", "idempotent"))


def _described(describe: weakref.WeakMethod[Callable[[], Any]]) -> list[Any]:
    """What the metrics server serves: the engine's snapshot, while there is an engine."""
    method = describe()
    return [] if method is None else [method()]


def _bound_at(endpoint: str) -> tuple[str, int]:
    """The address and port of a ZeroMQ TCP endpoint (``tcp://127.0.0.1:5670``, ``tcp://[::1]:5670``)."""
    host, port = endpoint.split("://", 1)[-1].rsplit(":", 1)
    return host, int(port)


def _end_abandoned(ctx: zmq.Context[Any], store: Store | None, metrics: MetricsServer | None, pid: int,
                   listening: list[tuple[str, int]]) -> None:
    """Let go of what an engine collected while it ran, never stopped (an `AsyncNode`
    whose event loop ended), holds beyond its sockets, on a thread of its own: its metrics
    server (its port stayed taken), its store (left open, its database stayed locked for
    the rest of the process), then its context, once its sockets are closed, each as it is
    collected. The record of its ports (``listening``: `inherited`) goes first, before any
    of them comes free (a child forked later would let go of whatever listened there then).
    Ended right in the collection
    (pyzmq's way, a context's own finalizer), the context waited for sockets that the
    collection had yet to close, and hung the collecting thread for ever. (In a child
    forked meanwhile, ``pid`` another than its own, both are the parent's: left alone.)"""
    if os.getpid() != pid:
        return

    def let_go() -> None:
        inherited.let_go(listening)
        if metrics is not None:
            metrics.close()
        try:
            if store is not None:
                store.close()
        except Exception as exc:
            log.warning("the store of a node collected while it ran did not close: %s", exc)
        try:
            ctx.term()
        except zmq.ZMQError as exc:
            log.warning("the ZeroMQ context of a node collected while it ran did not end: %s", exc)

    try:  # (a bare thread: `threading.Thread.start` waits for it under threading's own lock,
        # which the collecting thread may hold, as in another thread's start)
        _thread.start_new_thread(let_go, ())
    except RuntimeError:  # (the interpreter is exiting: no thread now, and pyzmq lets contexts be)
        pass


class Inbox(Protocol):
    """What the engine needs of the driver that runs handlers (`ThreadInbox`, `LoopInbox`)."""

    stopping: bool
    async_handlers: bool
    """Whether ``async def`` handlers run (a blocking call from one may hold their loop:
    `service_waits_for_caller`, looked at only then)."""

    def start(self) -> None: ...
    def discard(self) -> None: ...
    def post(self, calls: list[Call]) -> None: ...
    def post_peer_event(self, joined: bool, peer_id: str, calls: list[Call]) -> None: ...
    def post_frames(self, frames: list[bytes], count: int) -> None: ...
    def waits_for_caller(self) -> bool: ...
    def service_waits_for_caller(self, service: str) -> bool: ...
    def peers_changed(self) -> None: ...
    def registry_changed(self) -> None: ...


class Requests(Protocol):
    """What the engine needs of the driver's requesters."""

    def peer_gone(self, peer_id: str) -> None: ...
    def fail_outstanding(self) -> None: ...
    def close(self) -> None: ...


InboxFactory = Callable[["Engine", zmq.Socket[Any], zmq.Socket[Any], zmq.Socket[Any]], Inbox]
RequestsFactory = Callable[["Engine"], Requests]



def _curve_keys(cfg: NodeConfig) -> tuple[KeyPair | None, frozenset[str]]:
    """This node's CURVE keys (None: a plain node) and the public keys it admits, from
    ``cfg``. The CURVE module is loaded only for a node whose configuration names a key.
    Raises `ConfigError` for a malformed key or an unreadable key file."""
    if cfg.curve_secret_key is None and cfg.curve_key_file is None and not cfg.curve_allow \
            and not any(seed[40:41] == "@" for seed in cfg.seeds):
        return None, frozenset()
    from .._io.curve import KeyPair, check_key, read_secret_key

    secret = cfg.curve_secret_key
    if cfg.curve_key_file is not None:
        secret = read_secret_key(cfg.curve_key_file)
    keys = KeyPair.from_secret(secret) if secret is not None else None
    allowed = frozenset(check_key(k, "public key in curve_allow") for k in cfg.curve_allow)
    for seed in cfg.seeds:
        if seed[40:41] == "@":
            check_key(seed[:40], f"public key of seed {seed!r}")
    return keys, allowed


_ANNOUNCED_FIRST = (OFFER_PREFIXES["acktimeouts"], OFFER_PREFIXES["ackqueues"])
"""The groups a node joins before its others, in this order, and leaves after them, in the
reverse order (`_in_joining_order`, `_in_leaving_order`)."""


def _announcing_rank(group: str) -> int:
    """Where ``group`` comes among a node's joins: its place in `_ANNOUNCED_FIRST`, or after them."""
    for rank, prefix in enumerate(_ANNOUNCED_FIRST):
        if group.startswith(prefix):
            return rank
    return len(_ANNOUNCED_FIRST)


def _in_joining_order(groups: Iterable[str]) -> list[str]:
    """``groups`` in the order to join them: the queues' ack timeouts first, then their
    at-least-once groups, then the others (a queue's plain group among them);
    `_in_leaving_order` is the reverse. A peer applies a node's JOINs and LEAVEs as they
    come, so it sees a puller as announced so far: in a queue's plain group alone, it took
    it for a plain puller (the at-least-once group left first, a stopping puller was pushed
    plainly what waited to be dealt at-least-once: 1000 of 2000 messages lost, in 2 stops
    of 10); in the at-least-once group without its timeout, for a puller with none (the
    timeout joined after it, a pusher dealt batches without one in between, which, the
    puller unpulling while its handler was stuck, never timed out: the stuck message stayed
    with the puller, 2 runs in 40 of a test)."""
    return sorted(groups, key=lambda group: (_announcing_rank(group), group))


def _in_leaving_order(groups: Iterable[str]) -> list[str]:
    """``groups`` in the order to leave them: the reverse of `_in_joining_order` (a queue's
    plain group, then its at-least-once group, then its ack timeout)."""
    return sorted(groups, key=lambda group: (-_announcing_rank(group), group))


class Engine:
    """State and sockets of one node, driven by one event loop.

    ``inbox_factory`` builds the driver that runs handlers from the SUB, PULL and
    service ROUTER sockets; ``requests_factory`` the driver's requesters.
    """

    def __init__(self, name: str, config: NodeConfig, registry: Registry,
                 inbox_factory: InboxFactory, requests_factory: RequestsFactory) -> None:
        self.uuid = uuid4_bytes()
        self.node_id = self.uuid.hex()
        self.name = name or f"node-{self.node_id[:6]}"
        self.config = config
        self.registry = registry
        self._inbox_factory = inbox_factory
        self._requests_factory = requests_factory
        self.codec = Codec(config.max_message_bytes)
        self.stats = Stats()
        self.directory = Directory(self.node_id, self.stats, self.self_peer, loopback_only=True,
                                   max_message_bytes=config.max_message_bytes)
        self.waiters = Waiters()
        self.space = Space()
        self.loop: Any = None  # the Reactor or the asyncio loop, set by start
        self.loop_thread = 0
        self.ctx: zmq.Context[Any] = None  # type: ignore[assignment]
        self._abandoned: weakref.finalize[Any, Any] | None = None  # (set by start: `_end_abandoned`)
        self.closed = True
        self.started = False
        self.membership: Membership | None = None
        self.discovery = "not started"  # how this node looks for peers, for error messages
        self.metrics: MetricsServer | None = None
        self.inbox: Inbox | None = None
        self.requests: Requests | None = None
        self.outbound: Outbound | None = None
        self.publisher: Publisher | None = None
        self.pusher: Pusher | None = None
        self.reliable: ReliableSender | None = None
        self.store: Store | None = None
        self.durable: DurableQueues | None = None
        self.history: History | None = None
        self.keys: KeyPair | None = None
        self._advertise = ""
        self._bound: dict[str, str] = {}
        self._listening: list[tuple[str, int]] = []  # (the TCP addresses and ports this node listens at: `inherited`)
        self._user_groups: set[str] = set()
        self._rebuild_pending = False
        self._joined: list[PeerState] = []  # peers ready whose join waits for the pending rebuild
        self._changed: dict[str, PeerState] = {}  # peers come or changed, by id, not yet in the tables
        self._gone: set[str] = set()  # ids of peers gone, not yet out of the tables
        self._unsynced: set[str] = set()  # ids the tables took in, the connections not yet
        self._rebuild_log = LogThrottle(10.0)  # (`_rebuild`: an update or a sync that raised)
        self._registry_pending = False  # an `_apply_registry` is queued on the loop
        self._zap: ZapHandler | None = None
        # routing ids no stranger can guess (os.urandom: the OS's CSPRNG, which secrets wraps,
        # without the 4 ms of hashlib that importing secrets costs every process)
        self._dealer_serial = itertools.count(int.from_bytes(os.urandom(4), "big"))

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, loop: EventLoop) -> None:
        """Create the context and sockets, bind, and begin discovery (on ``loop``'s thread).

        Raises `ZmqMeshError` (or `ConfigError`) when an address, a key or a bind fails.
        """
        self.loop = loop
        self.loop_thread = threading.get_ident()
        cfg = self.config
        tracing.refresh()  # traces on if a tracer provider is set by now
        if cfg.interface:
            address, broadcast = interface_addresses(cfg.interface)
        else:
            address, broadcast = LOOPBACK_ADDRESS, LOOPBACK_BROADCAST
        bind_address = cfg.bind_address or address
        advertise = cfg.advertise_address or (address if bind_address == "0.0.0.0" else bind_address)
        if advertise == "0.0.0.0":
            raise ConfigError("advertise_address must be an address peers can reach, not 0.0.0.0")
        self._advertise = advertise
        self.directory.loopback_only = advertise.startswith("127.")
        self.keys, allowed = _curve_keys(cfg)
        if cfg.store is not None:  # first: a locked or foreign store stops the start cleanly
            # (imported here: a node without a store never loads the store's module)
            from .._store.store import Store

            self.store = Store(cfg.store, max_bytes=cfg.store_max_bytes, synchronous=cfg.store_synchronous)
            try:
                for queue, options in self.registry.pull_options.items():
                    if options.dedupe:  # the window stays bounded however often the node restarts
                        self.store.handled.trim(queue, options.dedupe_window)
            except BaseException:  # (e.g. a full disk: the start fails, and the store is let go)
                self.store.close()
                self.store = None
                raise
        if cfg.metrics_port is not None:  # before any socket: a port in use fails the start cleanly
            try:
                from .._observe.prometheus import MetricsServer

                # (through a weak reference: the server's thread must not keep a node that was
                # never stopped from being collected, `_end_abandoned`)
                self.metrics = MetricsServer(functools.partial(_described, weakref.WeakMethod(self.describe)),
                                             cfg.metrics_address, cfg.metrics_port)
            except Exception:
                if self.store is not None:
                    self.store.close()
                raise
        self.ctx = zmq.Context(io_threads=1)
        # (an engine collected while running lets go of them through this: `_end_abandoned`)
        self._abandoned = weakref.finalize(self, _end_abandoned, self.ctx, self.store, self.metrics, os.getpid(),
                                           self._listening)
        self._abandoned.atexit = False  # (at the interpreter's exit pyzmq lets contexts be)
        beacon = None
        try:
            # (libzmq's default of 1,023 sockets ran out at about 340 peers, long before MAX_PEERS)
            self.ctx.set(zmq.MAX_SOCKETS, ZMQ_SOCKETS_PER_PEER * MAX_PEERS + 1024)
            if self.keys is not None:  # the ZAP handler must exist before any socket binds
                # (a secure node only: `_curve_keys` loaded it)
                from .._io.curve import ZapHandler

                self._zap = ZapHandler(self.ctx, loop, self.keys, allowed, self.stats)
            sockets = self._open_sockets(bind_address)
            self.outbound = Outbound(loop, self.loop_thread, self.directory, self.space)
            if cfg.history and self.store is not None:  # (NodeConfig refuses a history without a store)
                from .._patterns.history import History

                self.history = History(self.store, cfg.history, self.stats)
                self.registry.kept_topics = frozenset(p.prefix for p in cfg.history)
            self.publisher = Publisher(
                loop=loop, stats=self.stats, uuid=self.uuid, xpub=sockets["pub"], directory=self.directory,
                connect=self.connect, on_subscriptions=self.waiters.check,
                local=lambda frames, count: self.inbox.post_frames(frames, count),  # type: ignore[union-attr]  # (made below)
                own_prefixes=lambda: self.registry.topics, queue_max=cfg.send_queue_max,
                max_bytes=cfg.send_queue_max_bytes, history=self.history,
            )
            senders = dict(ctx=self.ctx, loop=loop, config=cfg, stats=self.stats, uuid=self.uuid,
                           directory=self.directory, connect=self.connect, wake=self.outbound.wake)
            self.pusher = Pusher(**senders)  # type: ignore[arg-type]
            self.reliable = ReliableSender(codec=self.codec,
                                           routing_id=lambda: requester_id(self.uuid, next(self._dealer_serial)),
                                           **senders)  # type: ignore[arg-type]
            if self.store is not None:
                from .._patterns.durable import DurableQueues

                outbound = self.outbound
                self.durable = DurableQueues(
                    self.store, self.codec, self.stats, loop.call_later,
                    lambda delay: self.call_soon(loop.call_later, delay, outbound.wake),
                    max_buffered_bytes=cfg.durable_buffer_max_bytes,
                    offered=lambda: self.directory.offers["ackqueues"])
                self.reliable.settle = self.durable.settle
                self.durable.recover()
            self.outbound.attach(self.publisher, self.pusher, self.reliable, self.durable)
            self.inbox = self._inbox_factory(self, sockets["sub"], sockets["pull"], sockets["service"])
            if cfg.discovery:
                beacon = BeaconSocket(cfg.beacon_address or broadcast, cfg.beacon_port,
                                      loopback_only=is_loopback(advertise))
                self.discovery = f"beacons on {cfg.beacon_address or broadcast}:{cfg.beacon_port}"
            else:
                self.discovery = "beacons off"
            if cfg.seeds:
                self.discovery += f", seeds {', '.join(cfg.seeds)}"
            self.membership = Membership(
                loop=loop, ctx=self.ctx, config=cfg, uuid=self.uuid, name=self.name, codec=self.codec,
                stats=self.stats, events=self, bind_address=bind_address, advertise_address=advertise,
                beacon=beacon, keys=self.keys, allowed=allowed,
            )
            self.membership.bind()
            if self._zap is not None:
                self._zap.watch(self.membership.mailbox)
        except Exception:
            if self._zap is not None:  # (its sockets watched on the loop, which may be the caller's)
                self._zap.pause()
                self._zap = None
            if self.inbox is not None:  # (never started: what it made is let go, its waker's pipe)
                self.inbox.discard()
                self.inbox = None
            if beacon is not None:
                beacon.close()
            self._abandoned.detach()
            self.ctx.destroy(linger=0)
            if self.store is not None:
                self.store.close()
            if self.metrics is not None:
                self.metrics.close()
            raise
        headers = {
            HEADER["version"]: _version,
            HEADER["protocol"]: str(PROTOCOL),
            HEADER["mesh"]: cfg.mesh,
            **{HEADER[key]: self.advertised(key) for key in ENDPOINT_KEYS},
            HEADER["host"]: socket.gethostname(),
            HEADER["pid"]: str(os.getpid()),
            HEADER["max_message_bytes"]: str(cfg.max_message_bytes),
        }
        if self.keys is not None:
            headers[HEADER["key"]] = self.keys.public
        if self.history is not None:
            headers[HEADER["stream"]] = self.history.stream_id
            headers[HEADER["runs"]] = ",".join(self.history.runs)
        self.requests = self._requests_factory(self)
        self.inbox.start()
        self.closed = False
        self.started = True
        self._rebuild()
        self.membership.start(headers, self._own_groups())
        self.publisher.start()
        if self.history is not None:
            self.call_soon(self._expire_history)
        # (filled in place: the list `_end_abandoned` was given)
        self._listening[:] = [_bound_at(self.membership.mailbox.getsockopt_string(zmq.LAST_ENDPOINT)),
                              *(_bound_at(e) for e in self._bound.values())]
        if self.metrics is not None:
            self._listening.append((self.metrics.address, self.metrics.port))
        inherited.hold(self._listening)
        log.info("node %s (%s) started, mailbox %s", self.name, self.node_id[:8], self.membership.endpoint)

    def advertised(self, key: str) -> str:
        """The endpoint peers use to reach this node's pattern socket ``key``."""
        return "tcp://{}:{}".format(self._advertise, self._bound[key].rsplit(":", 1)[1])

    def endpoints(self) -> dict[str, str]:
        """Every endpoint peers reach this node at: ``mailbox`` and the pattern sockets."""
        self.ensure_running()
        assert self.membership is not None
        return {"mailbox": self.membership.endpoint, **{k: self.advertised(k) for k in ENDPOINT_KEYS}}

    def _open_sockets(self, bind_address: str) -> dict[str, zmq.Socket[Any]]:
        cfg = self.config
        sockets: dict[str, zmq.Socket[Any]] = {}
        # the marks, receiving and sending: a queue's PULL takes `queue_hwm`; subscriptions go
        # up a SUB and into an XPUB, under `CONTROL_HWM`
        for key, kind, rcvhwm, sndhwm in (("sub", zmq.SUB, cfg.recv_hwm, CONTROL_HWM),
                                          ("pull", zmq.PULL, cfg.queue_hwm, cfg.send_hwm),
                                          ("service", zmq.ROUTER, cfg.recv_hwm, cfg.send_hwm),
                                          ("pub", zmq.XPUB, CONTROL_HWM, cfg.pub_hwm or cfg.send_hwm)):
            options: dict[int, int | bytes] = {
                zmq.RCVHWM: rcvhwm, zmq.SNDHWM: sndhwm, zmq.MAXMSGSIZE: cfg.max_message_bytes + FRAME_HEADROOM,
                zmq.BACKLOG: LISTEN_BACKLOG,
            }
            if kind == zmq.ROUTER:
                options[zmq.ROUTER_MANDATORY] = 1
            if kind == zmq.XPUB:
                options[zmq.XPUB_VERBOSER] = 1
            sock = new_socket(self.ctx, kind, options)
            if self.keys is not None:
                # (a secure node only)
                from .._io.curve import make_server

                make_server(sock, self.keys)
            if self._zap is not None:
                self._zap.watch(sock)
            try:
                sock.bind(f"tcp://{bind_address}:*")
            except zmq.ZMQError as exc:
                if exc.errno in _NO_SUCH_ADDRESS:
                    raise ConfigError(f"cannot listen on {bind_address!r} (bind_address, or the interface's "
                                      f"address): {exc.strerror}; name an address or interface of this host") from None
                raise
            self._bound[key] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if kind != zmq.XPUB:
                own = inproc_endpoint(self.node_id, key)
                self.directory.own_endpoints[key] = own
                sock.bind(own)
            sockets[key] = sock
        return sockets

    def dealer_to(self, provider: Provider) -> zmq.Socket[Any]:
        """A DEALER connected to ``provider``'s service socket, under a fresh routing id."""
        cfg = self.config
        sock = new_socket(self.ctx, zmq.DEALER, {
            zmq.ROUTING_ID: requester_id(self.uuid, next(self._dealer_serial)),
            zmq.MAXMSGSIZE: cfg.max_message_bytes + FRAME_HEADROOM,
            zmq.SNDHWM: cfg.send_hwm,
            zmq.RCVHWM: cfg.recv_hwm,
        })
        self.connect(sock, provider.endpoint, provider.key)
        return sock

    def connect(self, sock: zmq.Socket[Any], endpoint: str, peer_key: str | None) -> None:
        """Connect ``sock``, as a CURVE client of ``peer_key`` when this node is secure."""
        if self.keys is None:
            sock.connect(endpoint)
            return
        # (a secure node only: a plain one never loads CURVE)
        from .._io.curve import connect

        connect(sock, endpoint, self.keys, peer_key)

    # The stop plan (see `stop_plan`): each step runs where it belongs, and the node kinds
    # wait between the steps in their own way.

    def begin_stop(self, timeout: float) -> float | None:
        """Refuse new work; the deadline for draining queued sends (None if already stopping)."""
        if self.closed or not self.started:
            return None
        self.closed = True
        return time.monotonic() + min(self.config.linger_s, timeout)

    def drain_deadline(self, deadline: float) -> float:
        """When a stop's drain (`send_queued`) gives way to the hand-over (`hand_over`), whose
        deadline is ``deadline``: half-way there when a keeper of a durable queue this node
        holds messages of is there (what its pullers have not acknowledged by then, a hung
        handler's, goes to the keeper, marked redelivered); else ``deadline`` itself."""
        durable, reliable = self.durable, self.reliable
        if durable is None or reliable is None:
            return deadline
        held = durable.queues
        if not any(queue in held and self._unsettled(queue, held[queue].buffer) for queue in self._kept_queues()):
            return deadline
        now = time.monotonic()
        return now + max(deadline - now, 0.0) / 2

    def _unsettled(self, queue: str, buffer: Any) -> bool:
        """Whether durable messages of ``queue`` wait: in ``buffer`` (its), in flight, or to
        be dealt again (but for those held aside, which no puller or keeper there takes)."""
        assert self.reliable is not None
        return bool(buffer or self.reliable.to_deal_again(queue) or self.reliable.in_flight(queue))

    def _kept_queues(self) -> set[str]:
        """The queues another node keeps (see `Node.keep`)."""
        return {queue for queue, ids in self.directory.offers["keepers"].items() if any(k != self.node_id for k in ids)}

    def send_queued(self, deadline: float) -> bool:
        """Send what is queued; True while some remains and ``deadline`` has not passed."""
        assert self.outbound is not None
        if not self.outbound.queued():
            return False
        self.outbound.flush()
        return bool(self.outbound.queued()) and time.monotonic() < deadline

    def hand_over(self, deadline: float) -> bool:
        """Deal the durable messages this stopping node still stores to the keepers of their
        queues (they store them, then acknowledge); True while some remain to hand over to
        a keeper that is there, and ``deadline`` has not passed. What no keeper takes stays
        in this node's store."""
        durable, reliable, outbound = self.durable, self.reliable, self.outbound
        if durable is None or reliable is None or outbound is None or time.monotonic() >= deadline:
            return False
        if not outbound.handing_over:
            outbound.handing_over = True  # from now on durable messages go to keepers only
            for queue in list(durable.queues):
                reliable.recall(queue)
        kept = self._kept_queues()
        durable.unpark(kept)  # (queues parked, nobody having pulled them, that a keeper takes: read back too)
        busy = False
        for queue, buffer in durable.refill(every=True).items():  # (a stop: every queue, in flight ones too)
            if queue not in kept:
                continue
            reliable.flush(queue, buffer, to_keepers=True, stored=True)
            busy = busy or self._unsettled(queue, buffer)
        return busy

    def close_outbound(self) -> None:
        """Count what could not be sent, fail the waits and outstanding requests."""
        assert self.outbound is not None and self.reliable is not None and self.membership is not None
        left = self.outbound.unsent_in_memory()
        if left:
            self.stats.add("pipeline", "dropped", left)  # the inbox counts drops too
            log.warning("node %s stopped with %d queued message(s) unsent (no room or no puller)", self.name, left)
            self.outbound.forget_queued()  # (counted: they hold callers' bytes no longer)
        self.reliable.close()
        self.waiters.close()
        if self.requests is not None:
            self.requests.fail_outstanding()

    def withdraw_offers(self) -> bool:
        """Leave the groups by which peers choose this node for a request or a push (its
        services and queues): from then on they send it none, while this node still
        handles and answers those on their way. True if it told any peer."""
        assert self.membership is not None
        chosen = [g for g in self.membership.groups if g.startswith(_CHOSEN_BY)]
        for group in _in_leaving_order(chosen):
            self.membership.leave(group)
        return bool(chosen) and bool(self.membership.ready_peers())

    def arrivals(self) -> int:
        """How many requests and pushes this node has received so far (any thread)."""
        counts = self.stats.pattern
        return counts["service"]["received"] + counts["pipeline"]["received"]

    def say_goodbye(self) -> None:
        """Tell every peer this node leaves (`Membership.say_goodbye`)."""
        assert self.membership is not None
        self.membership.say_goodbye()

    def close_sockets(self, deadline: float) -> None:
        """Close membership and the outbound sockets; what they hold may go out until ``deadline``."""
        assert self.outbound is not None and self.publisher is not None and self.pusher is not None
        assert self.membership is not None
        # bounded: dead peers cannot hold up the stop beyond the deadline; the goodbyes (and
        # a greeting still in flight) get a moment even when draining used the deadline up
        linger_ms = max(0, int((deadline - time.monotonic()) * 1000))
        self.membership.close(max(linger_ms, min(_GOODBYE_LINGER_MS, int(self.config.linger_s * 1000))))
        self.outbound.cancel()
        if self.durable is not None:
            self.durable.flush_acknowledged()
        self.publisher.close(linger_ms)
        self.pusher.close(linger_ms)
        self.space.notify()
        if self.requests is not None:
            self.requests.close()
        if self._zap is not None:  # (bound on: the inbound sockets of a handler that outlives the stop stay open)
            self._zap.pause()

    def close_metrics(self) -> None:
        """Stop serving metrics (blocks up to half a second: never on the loop), its port
        forgotten by `inherited` first (it comes free now, not at the context's end)."""
        if self.metrics is not None:
            place = (self.metrics.address, self.metrics.port)
            if place in self._listening:
                self._listening.remove(place)
                inherited.let_go([place])
            self.metrics.close()

    def destroy_context(self) -> None:
        """Terminate the ZeroMQ context (off the loop: it waits out the lingers set above)."""
        try:
            if self._abandoned is not None:
                self._abandoned.detach()
            self.ctx.destroy(0)
        finally:
            inherited.let_go(self._listening)
            self._listening.clear()
            if self.store is not None:
                self.store.close()
        log.info("node %s (%s) stopped", self.name, self.node_id[:8])

    # -- the loop -------------------------------------------------------------------------------

    def on_loop_thread(self) -> bool:
        """True on the thread that runs the loop."""
        return threading.get_ident() == self.loop_thread

    def call_on_loop(self, fn: Callable[..., Any], *args: Any, timeout: float | None = 10.0) -> Any:
        """Run ``fn(*args)`` on the loop from another thread and return its result.

        Raises what ``fn`` raised, `MeshTimeoutError` if the loop does not answer in time,
        `ZmqMeshError` when called on the loop's own thread.
        """
        if self.on_loop_thread():
            raise ZmqMeshError("a blocking Node call was made on the node's own I/O thread")
        return run_on(self.loop, fn, *args, timeout=timeout)

    def watch(self, predicate: Callable[[], bool], deadline: float | None, what: str,
              given: futures.Future[None] | None = None) -> futures.Future[None]:
        """A future (``given``, or a new one) the loop completes once ``predicate()`` holds
        (checked at once, and again on every change), or fails with `MeshTimeoutError` at
        ``deadline`` (None: never) or `NodeClosedError` when the node stops; `forget_watch`
        if it is given up. Any thread; raises `NodeClosedError` if the loop is gone."""
        waiter: futures.Future[None] = futures.Future() if given is None else given
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)

        def expire() -> None:
            if not waiter.done():
                self.waiters.remove(waiter)
                waiter.set_exception(self.timed_out(what, timeout))

        def start() -> None:
            self.waiters.add(predicate, waiter)
            if timeout is not None and not waiter.done():
                timer = self.loop.call_later(timeout, expire)
                waiter.add_done_callback(lambda _done: timer.cancel())

        try:
            self.call_soon(start)
        except RuntimeError:  # the loop is gone
            raise NodeClosedError("the node is not running") from None
        return waiter

    def forget_watch(self, waiter: futures.Future[None]) -> None:
        """Forget a `watch` whose caller gave up on it (interrupted by a signal, say): the
        loop cancels it, with its timer, and stops checking its condition (any thread;
        nothing to do once the loop is gone)."""
        def forget() -> None:
            waiter.cancel()  # (its done-callback cancels its timer, here on the loop)
            self.waiters.remove(waiter)

        try:
            self.call_soon(forget)
        except RuntimeError:  # the loop is gone, and what it watched with it
            pass

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the loop soon (from any thread). Raises `RuntimeError` once the loop is closed."""
        if self.on_loop_thread():
            self.loop.call_soon(fn, *args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def timed_out(self, what: str, timeout: float | None) -> MeshTimeoutError:
        """The error for a wait that ran out: what was awaited, in which mesh, and what
        was found (the peers known, and where this node looks for them)."""
        known = self.directory.peer_count()
        return MeshTimeoutError(
            f"waited {timeout or 0:.3g} s for {what} in mesh {self.config.mesh!r}: not met; "
            f"{known} peer{'' if known == 1 else 's'} known ({self.discovery})")

    def ensure_running(self) -> None:
        """Raise `NodeClosedError` unless the node is running."""
        if self.closed:
            raise NodeClosedError("the node is not running (start it first, or it was stopped)")

    # -- describing this node ----------------------------------------------------------------------

    def self_peer(self) -> Peer:
        """This node, described as its peers see it."""
        offers = self.registry.offers()
        membership = self.membership
        return Peer(
            id=self.node_id,
            name=self.name,
            address=membership.advertise_address if membership else "",
            endpoint=membership.endpoint if membership else "",
            groups=frozenset(self._own_groups()),
            services=offers["services"],
            queues=offers["queues"],
            topics=offers["topics"],
            headers=dict(membership.headers) if membership else {},
            last_seen=time.time(),
        )

    def inbox_options(self) -> dict[str, Any]:
        """What this engine's `Dispatcher` is made of, but its sockets: the keyword
        arguments both inbox drivers (`ThreadInbox`, `LoopInbox`) pass on with them."""
        return dict(config=self.config, registry=self.registry, directory=self.directory, codec=self.codec,
                    stats=self.stats, describe=self.describe, store=self.store,
                    keeper=self.durable.submit if self.durable is not None else None,
                    history=self.history, node_closed=lambda: self.closed)

    def describe(self) -> dict[str, Any]:
        """What the built-in stats service answers: id, name, counters and gauges."""
        return {"id": self.node_id, "name": self.name, **self.counters()}

    def counters(self) -> dict[str, Any]:
        """The counters (`Stats.snapshot`, but for what the node sent itself under
        ``"peers"``) and, under ``"gauges"``, the levels of now: the
        peers present, the messages not yet sent or not yet acknowledged (``queued``), and
        per queue the messages waiting in its send queue (``queue_backlog``), the bytes
        waiting in the send queues together (``send_queue_bytes``, which
        ``send_queue_max_bytes`` bounds), and the bytes durable messages take in memory,
        about (``durable_buffered_bytes``)."""
        pusher = self.pusher
        backlog = {name: len(q) for name, q in list(pusher.queues.items())} if pusher is not None else {}
        outbound = self.outbound
        counted = self.stats.snapshot()
        counted["peers"].pop(self.node_id, None)  # (what it sent itself: no peer's)
        return {**counted, "gauges": {
            "peers": self.directory.peer_count(),
            "queued": outbound.queued() if outbound is not None and not self.closed else 0,
            "queue_backlog": backlog,
            "send_queue_bytes": pusher.queued_bytes() if pusher is not None else 0,
            "durable_buffered_bytes": self.durable.held.at_most if self.durable is not None else 0,
        }}

    # -- membership events (on the loop) -----------------------------------------------------------

    def peer_ready(self, peer: PeerState) -> None:
        """A peer joined: update the tables and connections once per loop turn, however
        many joined in it (a mesh forming brings many HELLOs at once, and each update
        looks at the connections of every subscriber and puller), then tell the join callbacks, which find the tables updated."""
        self._joined.append(peer)
        self.peer_groups_changed(peer)

    def peer_gone(self, peer: PeerState, reason: str) -> None:
        """A peer left: fail its requests, redeal its unacknowledged work, tell the callbacks."""
        if self._joined:  # (the joins before it are told first, in order)
            self._deferred_rebuild()
        snapshot = self.directory.snapshot(peer)
        if self._changed.get(peer.id) is peer:
            del self._changed[peer.id]
        self._rebuild((peer.id,))
        if self.requests is not None:
            self.requests.peer_gone(peer.id)
        if self.reliable is not None:
            self.reliable.peer_gone(peer.id, failed=not reason.startswith("left"))  # (a goodbye: no failure)
        self.stats.forget_peer(peer.id)
        self._post_peer_event(False, snapshot)

    def peer_groups_changed(self, peer: PeerState) -> None:
        """A peer's offers may have changed: rebuild once per loop turn, not per JOIN."""
        self._changed[peer.id] = peer
        if not self._rebuild_pending:
            self._rebuild_pending = True
            self.loop.call_soon(self._deferred_rebuild)

    def zre_message(self, kind: str, peer: PeerState, group: str, frames: list[bytes]) -> None:
        """A WHISPER or SHOUT for the user's callbacks: after the joins of the peers that
        joined before it (its sender's too, which it read after that peer's HELLO), and with
        the tables holding its sender (``msg.sender``)."""
        if self._joined:
            self._deferred_rebuild()
        self._post(kind, Message(kind, group, frames, peer.id, self.directory.lookup_peer))

    def _deferred_rebuild(self) -> None:
        # (called early, by `peer_gone` or `zre_message`, the call still queued on the loop
        # finds no joins, and only rebuilds)
        self._rebuild_pending = False
        if not self.closed:
            self._rebuild()
            joined, self._joined = self._joined, []
            for peer in joined:
                self._post_peer_event(True, self.directory.snapshot(peer))
        else:
            self._joined = []

    def _post(self, event: str, arg: Any) -> None:
        callbacks = self.registry.callbacks[event]
        if callbacks and not self.inbox_stopped():
            assert self.inbox is not None
            self.inbox.post([Call(cb, arg, None, "zre") for cb in callbacks])

    def _post_peer_event(self, joined: bool, peer: Peer) -> None:
        """Hand the inbox a peer's join or leave, also with no handler for it: a leave
        may withdraw the join still waiting (a stranger coming and going again and again
        queued them without bound)."""
        if not self.inbox_stopped():
            assert self.inbox is not None
            callbacks = self.registry.callbacks["join" if joined else "leave"]
            self.inbox.post_peer_event(joined, peer.id, [Call(cb, peer, None, "zre") for cb in callbacks])

    def inbox_stopped(self) -> bool:
        """True once the inbox no longer takes work."""
        return self.inbox is None or self.inbox.stopping

    def _rebuild(self, gone: tuple[str, ...] = ()) -> None:
        """Bring the offer tables and connections up to date after any membership or registry
        change: the peers come or changed since the last time, and those ``gone``. What was
        not applied (a peer whose entry could not be worked out, an update or a sync that
        raised: bugs, logged) stays pending, and the next change applies it; the rest goes
        on (a leave still fails the requests of the peer gone)."""
        self._gone.update(gone)
        try:
            unread = self.directory.update(self.registry.offers(), self._changed.values(), self._gone)
            self._changed, self._gone = {peer.id: peer for peer in unread}, set()
            self._unsynced.update(self.directory.touched)
            if self.publisher is not None:
                self.publisher.sync_connections(self._unsynced)
            if self.pusher is not None:
                self.pusher.sync_connections(self._unsynced)
            self._unsynced = set()
        except Exception:
            said = self._rebuild_log.due()
            if said:
                log.error("applying the peers' changes to the tables and connections failed (%d times since the "
                          "last line): kept for the next change", said, exc_info=True)
        if self.outbound is not None:
            self.outbound.wake()  # waiting durable or redelivered messages may have a puller now
        if self.inbox is not None:
            self.inbox.peers_changed()  # replaying subscriptions may have a publisher to follow
        self.waiters.check()

    def _expire_history(self) -> None:
        """Forget, every second, what the history keeps past its age (loop only)."""
        if self.closed or self.history is None:
            return
        if any(p.max_age_s is not None for p in self.config.history):
            try:
                self.history.expire()
            finally:
                self.loop.call_later(_EXPIRE_EVERY_S, self._expire_history)

    # -- registry and groups ----------------------------------------------------------------------

    def registry_changed(self) -> None:
        """Apply a handler registered or removed at run time (from any thread), once for
        every change made before the loop comes to it: each application reads the whole
        registry, and one per change made a burst of 1,990 registrations hold the loop
        for 0.7-1.3 s (the cost grew with the square of the burst)."""
        if self.closed or self._registry_pending:
            return
        self._registry_pending = True
        try:
            self.call_soon(self._apply_registry)
        except BaseException:
            self._registry_pending = False
            raise

    def _apply_registry(self) -> None:
        self._registry_pending = False  # (first: a change made from now on queues another)
        if self.closed:
            return
        assert self.membership is not None and self.inbox is not None
        wanted = self._own_groups()
        current = set(self.membership.groups)
        joining = _in_joining_order(wanted - current)
        # (a queue's new ack timeout joined before its old one is left: a pull made again with
        # another timeout is never seen without one)
        for group in joining:
            if _announcing_rank(group) == 0:
                self.membership.join(group)
        for group in _in_leaving_order(current - wanted):
            self.membership.leave(group)
        for group in joining:
            if _announcing_rank(group) > 0:
                self.membership.join(group)
        self.inbox.registry_changed()
        self._rebuild()

    def _own_groups(self) -> set[str]:
        groups = set(self._user_groups)
        for kind, names in self.registry.offers().items():
            groups.update(OFFER_PREFIXES[kind] + name for name in names)
        return groups

    def join_group(self, group: str) -> None:
        """Join a user ZRE group (loop only; the caller checked its name: `api.check_group`)."""
        assert self.membership is not None
        self._user_groups.add(group)
        self.membership.join(group)

    def leave_group(self, group: str) -> None:
        """Leave a user ZRE group (loop only; the caller checked its name: `api.check_group`)."""
        assert self.membership is not None
        self._user_groups.discard(group)
        self.membership.leave(group)

    def whisper(self, peer_id: str, frames: list[bytes]) -> None:
        """Send a ZRE WHISPER (loop only; see `Membership.whisper`)."""
        assert self.membership is not None
        self.membership.whisper(peer_id, frames)

    def shout(self, group: str, frames: list[bytes]) -> int:
        """Send a ZRE SHOUT (loop only; see `Membership.shout`)."""
        assert self.membership is not None
        return self.membership.shout(group, frames)
