"""ZRE membership: the mailbox, one DEALER link per peer, groups, and failure detection.

Runs entirely on the node's event loop. It finds peers (beacons, seeds, gossip, and
HELLOs from unknown peers), greets them, tracks their groups, and declares them gone:

* at once on a polite goodbye (a port-0 beacon, or zmqmesh's ``bye`` control whisper);
* within ``disconnect_grace_s`` when the TCP link drops and cannot be re-established
  (a crashed process on this host; seen through a socket monitor);
* within ``peer_timeout_s`` when the peer falls silent (a stopped process, a cut link):
  a peer silent for ``heartbeat_interval_s`` is PINGed; a beacon counts as a sign of
  life only while the link is up, which ZMTP heartbeats keep honest.

Hostile or malformed input is counted in `Stats.rejected` and dropped; a sequence gap
drops the peer as RFC 36 requires. Nothing here raises into the event loop.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils import z85

from . import zre
from .errors import MessageTooLargeError, ZmqMeshError
from .message import Peer
from .security import KeyPair, make_client, make_server
from .zre import Command, ZreMessage

if TYPE_CHECKING:
    from .codec import Codec
    from .config import NodeConfig
    from .discovery import BeaconSocket
    from .reactor import EventLoop, TimerLike
    from .stats import Stats

__all__ = ["Membership", "PeerState", "CONTROL_MAGIC", "OFFER_PREFIXES", "HEADER"]

log = logging.getLogger("zmqmesh.membership")

CONTROL_MAGIC = b"\x00zmqmesh-control"
"""First frame of the WHISPERs zmqmesh nodes exchange among themselves (never sent to plain ZRE peers)."""

HEADER = {
    "version": "X-ZMQMESH-VERSION",
    "mesh": "X-ZMQMESH-MESH",
    "pub": "X-ZMQMESH-PUB",
    "sub": "X-ZMQMESH-SUB",
    "pull": "X-ZMQMESH-PULL",
    "service": "X-ZMQMESH-SERVICE",
    "host": "X-ZMQMESH-HOST",
    "pid": "X-ZMQMESH-PID",
    "key": "X-ZMQMESH-KEY",
}
OFFER_PREFIXES = {
    "services": "zmqmesh/svc/",
    "queues": "zmqmesh/queue/",
    "topics": "zmqmesh/sub/",
    "ackqueues": "zmqmesh/ackqueue/",  # queues pulled at-least-once
    "idempotent": "zmqmesh/idem/",  # services safe to retry on another provider
}

_ENDPOINT = re.compile(r"^tcp://(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})$")
_MAILBOX_BURST = 512
_FOREIGN_MEMORY_S = 30.0
_MAX_PENDING_PEERS = 128  # peers greeted but not yet answered: bounds what a beacon flood costs
_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


def parse_endpoint(endpoint: str) -> tuple[str, int] | None:
    """``(ip, port)`` of a ``tcp://a.b.c.d:port`` endpoint, or ``None`` if it is not one."""
    match = _ENDPOINT.fullmatch(endpoint)
    if not match:
        return None
    port = int(match.group(2))
    return (match.group(1), port) if 0 < port < 65536 else None


def _monitor_event(frames: list[bytes]) -> int | None:
    """The event id of a socket-monitor message, or None if it is not one.

    libzmq sends two frames: a 16-bit event id and a 32-bit value in native byte order,
    then the endpoint. (pyzmq's own parser lives in a module that imports asyncio.)
    """
    if len(frames) != 2 or len(frames[0]) != 6:
        return None
    return int.from_bytes(frames[0][:2], sys.byteorder)


class PeerState:
    """Everything this node tracks about one peer (internal; users see `Peer` snapshots)."""

    def __init__(self, uuid: bytes, endpoint: str, address: str) -> None:
        self.uuid = uuid
        self.id = uuid.hex()
        self.endpoint = endpoint
        self.address = address
        self.link: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None
        self.key: str | None = None
        self.out_sequence = 0
        self.in_sequence = 0
        self.ready = False
        self.name = ""
        self.headers: dict[str, str] = {}
        self.groups: set[str] = set()
        self.status = 0
        self.last_rx = time.monotonic()
        self.last_seen = time.time()
        self.ping_sent: float | None = None
        self.link_up = False
        self.disconnected_at: float | None = None
        self.is_zmqmesh = False
        self._snapshot: Peer | None = None

    def touch(self) -> None:
        """Record traffic from the peer (a sign of life)."""
        self.last_rx = time.monotonic()
        self.last_seen = time.time()
        self.ping_sent = None

    def offers(self, kind: str) -> frozenset[str]:
        """Names this peer offers of ``kind`` ("services", "queues", "topics"), from its groups."""
        prefix = OFFER_PREFIXES[kind]
        return frozenset(g[len(prefix) :] for g in self.groups if g.startswith(prefix))

    def endpoint_of(self, key: str) -> str | None:
        """A pattern endpoint from the peer's HELLO headers (checked when the HELLO came)."""
        return self.headers.get(HEADER[key])

    def snapshot(self) -> Peer:
        """An immutable `Peer` view (cached until the peer's groups or headers change)."""
        snap = self._snapshot
        if snap is None or snap.last_seen != self.last_seen:
            snap = Peer(
                id=self.id,
                name=self.name,
                address=self.address,
                endpoint=self.endpoint,
                groups=frozenset(self.groups),
                services=self.offers("services"),
                queues=self.offers("queues"),
                topics=self.offers("topics"),
                headers=dict(self.headers),
                last_seen=self.last_seen,
                is_zmqmesh=self.is_zmqmesh,
            )
            self._snapshot = snap
        return snap

    def changed(self) -> None:
        """Invalidate the cached snapshot."""
        self._snapshot = None


class MembershipEvents:
    """What membership tells the rest of the node; every hook runs on the event loop."""

    def peer_ready(self, peer: PeerState) -> None:
        """A peer completed its greeting."""

    def peer_gone(self, peer: PeerState, reason: str) -> None:
        """A ready peer left, crashed, or was dropped."""

    def peer_groups_changed(self, peer: PeerState) -> None:
        """A ready peer joined or left a group."""

    def zre_message(self, kind: str, peer: PeerState, group: str, frames: list[bytes]) -> None:
        """A user WHISPER or SHOUT arrived."""


class Membership:
    """The ZRE engine of one node. Create, `start`, and `close` on the node's loop."""

    def __init__(
        self,
        *,
        loop: EventLoop,
        ctx: zmq.Context[Any],
        config: NodeConfig,
        uuid: bytes,
        name: str,
        codec: Codec,
        stats: Stats,
        events: MembershipEvents,
        bind_address: str,
        advertise_address: str,
        beacon: BeaconSocket | None,
        keys: KeyPair | None = None,
        allowed: frozenset[str] = frozenset(),
    ) -> None:
        self.loop = loop
        self.ctx = ctx
        self.config = config
        self.uuid = uuid
        self.name = name
        self.codec = codec
        self.stats = stats
        self.events = events
        self.bind_address = bind_address
        self.advertise_address = advertise_address
        self.beacon = beacon
        self.keys = keys
        self.allowed = allowed | ({keys.public} if keys else set())
        self._beacon_key = keys.public_bytes() if keys else None
        self.peers: dict[bytes, PeerState] = {}
        self.groups: set[str] = set()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.endpoint = ""
        self.port = 0
        self._mailbox: zmq.Socket[Any] | None = None
        self._foreign: dict[bytes, float] = {}
        self._seed_links: dict[str, PeerState] = {}
        self._timers: list[TimerLike] = []
        self._closed = False
        self.loopback_only = advertise_address.startswith("127.")

    # -- life cycle ----------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the mailbox ROUTER to ``mailbox_port``, or to a random port in 0xC000-0xFFFF (as ZRE asks)."""
        mailbox = self.ctx.socket(zmq.ROUTER)
        mailbox.setsockopt(zmq.LINGER, 0)
        mailbox.setsockopt(zmq.RCVHWM, self.config.recv_hwm)
        mailbox.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes + 4096)
        # a peer reconnecting after a cut link takes over its routing id at once, instead
        # of being shut out by its own half-open previous connection
        mailbox.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.keys is not None:
            make_server(mailbox, self.keys)
        try:
            if self.config.mailbox_port:
                mailbox.bind(f"tcp://{self.bind_address}:{self.config.mailbox_port}")
                self.port = self.config.mailbox_port
            else:
                try:
                    self.port = mailbox.bind_to_random_port(
                        f"tcp://{self.bind_address}", min_port=0xC000, max_port=0xFFFF, max_tries=200
                    )
                except zmq.ZMQBindError:
                    self.port = _bind_ephemeral(mailbox, self.bind_address)
        except zmq.ZMQError as exc:
            mailbox.close(0)
            raise ZmqMeshError(f"cannot bind the mailbox on {self.bind_address}: {exc}") from exc
        self.endpoint = f"tcp://{self.advertise_address}:{self.port}"
        self._mailbox = mailbox

    def start(self, headers: dict[str, str], groups: set[str]) -> None:
        """Start reading the mailbox and beacons, beaconing, heartbeating, and greeting seeds."""
        assert self._mailbox is not None, "bind() first"
        self.headers = headers
        self.groups = set(groups)
        self.loop.add_reader(self._mailbox.FD, self._on_mailbox)
        if self.beacon is not None:
            self.loop.add_reader(self.beacon.fileno(), self._on_beacon)
            self._send_beacon()  # the first beacon goes out at once
        self._tick()
        for seed in self.config.seeds:
            self._open_seed_link(seed)
        self.loop.call_soon(self._on_mailbox)

    def say_goodbye(self) -> None:
        """Tell everyone we leave: ``bye`` to zmqmesh peers, a port-0 beacon to everyone."""
        for peer in list(self.peers.values()):
            if peer.ready and peer.is_zmqmesh:
                self._send_control(peer, {"t": "bye"})
        if self.beacon is not None:
            self.beacon.send(zre.encode_beacon(self.uuid, 0, self._beacon_key))

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket and cancel every timer (idempotent; fires no events).

        The links keep ``linger_ms`` to deliver what is still queued (the goodbyes).
        """
        if self._closed:
            return
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for peer in list(self.peers.values()) + list(self._seed_links.values()):
            self._close_link(peer, linger_ms)
        self.peers.clear()
        self._seed_links.clear()
        if self._mailbox is not None:
            self._remove_reader(self._mailbox.FD)
            self._mailbox.close(0)
            self._mailbox = None
        if self.beacon is not None:
            self._remove_reader(self.beacon.fileno())
            self.beacon.close()

    # -- what the node asks of membership ------------------------------------------------

    def ready_peers(self) -> list[PeerState]:
        """Peers that completed their greeting."""
        return [p for p in self.peers.values() if p.ready]

    def join(self, group: str) -> None:
        """Join a ZRE group and tell every peer (JOIN with the new status)."""
        if group in self.groups:
            return
        _check_group(group)
        self.groups.add(group)
        self.status = (self.status + 1) % 256
        for peer in list(self.peers.values()):
            self._send(peer, ZreMessage(Command.JOIN, 0, group=group, status=self.status))

    def leave(self, group: str) -> None:
        """Leave a ZRE group and tell every peer."""
        if group not in self.groups:
            return
        self.groups.discard(group)
        self.status = (self.status + 1) % 256
        for peer in list(self.peers.values()):
            self._send(peer, ZreMessage(Command.LEAVE, 0, group=group, status=self.status))

    def whisper(self, peer_id: str, frames: list[bytes]) -> None:
        """Send a WHISPER to one ready peer. Raises `ZmqMeshError` if it is unknown."""
        peer = self._ready_peer(peer_id)
        self._check_size(frames)
        if not self._send(peer, ZreMessage(Command.WHISPER, 0, content=frames)):
            raise ZmqMeshError(f"peer {peer_id} is not accepting messages (send buffer full)")
        self.stats.pattern["zre"]["sent"] += 1

    def shout(self, group: str, frames: list[bytes]) -> int:
        """SHOUT to every ready peer in ``group``; returns how many peers it went to."""
        self._check_size(frames)
        sent = 0
        for peer in list(self.peers.values()):
            if peer.ready and group in peer.groups:
                if self._send(peer, ZreMessage(Command.SHOUT, 0, group=group, content=frames)):
                    sent += 1
        self.stats.pattern["zre"]["sent"] += sent
        return sent

    def _check_size(self, frames: list[bytes]) -> None:
        if sum(len(f) for f in frames) > self.config.max_message_bytes:
            raise MessageTooLargeError("whisper/shout content exceeds max_message_bytes")

    def _ready_peer(self, peer_id: str) -> PeerState:
        try:
            peer = self.peers.get(bytes.fromhex(peer_id))
        except ValueError:
            peer = None
        if peer is None or not peer.ready:
            raise ZmqMeshError(f"no such peer: {peer_id}")
        return peer

    # -- links ----------------------------------------------------------------------------

    def _new_link(self, peer: PeerState) -> None:
        link = self.ctx.socket(zmq.DEALER)
        try:
            self._setup_link(peer, link)
        except zmq.ZMQError:
            link.close(0)
            if peer.monitor is not None:
                peer.monitor.close(0)
                peer.monitor = None
            peer.link = None
            raise

    def _setup_link(self, peer: PeerState, link: zmq.Socket[Any]) -> None:
        link.setsockopt(zmq.ROUTING_ID, b"\x01" + self.uuid)
        link.setsockopt(zmq.LINGER, 0)
        link.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        link.setsockopt(zmq.SNDTIMEO, 0)
        link.setsockopt(zmq.RECONNECT_IVL, 100)
        link.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        hb_ms = int(self.config.heartbeat_interval_s * 1000)
        link.setsockopt(zmq.HEARTBEAT_IVL, hb_ms)
        link.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.config.peer_timeout_s * 1000))
        monitor = peer.monitor = link.get_monitor_socket(_MONITOR_EVENTS)
        if self.keys is not None:
            assert peer.key is not None, "secure links need the peer's key"
            make_client(link, self.keys, peer.key)
        link.connect(peer.endpoint)
        peer.link = link
        peer.monitor = monitor
        peer.out_sequence = 0
        self.loop.add_reader(monitor.FD, self._on_monitor, peer)
        self.loop.call_soon(self._on_monitor, peer)  # the descriptor is edge-triggered
        self._send_hello(peer)

    def _close_link(self, peer: PeerState, linger_ms: int = 0) -> None:
        if peer.monitor is not None:
            self._remove_reader(peer.monitor.FD)
            try:
                peer.link.disable_monitor()  # type: ignore[union-attr]
            except zmq.ZMQError:
                pass
            peer.monitor.close(0)
            peer.monitor = None
        if peer.link is not None:
            peer.link.close(linger_ms)
            peer.link = None
        peer.link_up = False

    def _send_hello(self, peer: PeerState) -> None:
        hello = ZreMessage(
            Command.HELLO,
            0,
            endpoint=self.endpoint,
            groups=sorted(self.groups),
            status=self.status,
            name=self.name,
            headers=self.headers,
        )
        self._send(peer, hello)

    def _send(self, peer: PeerState, msg: ZreMessage) -> bool:
        if peer.link is None:
            return False
        msg.sequence = zre.next_sequence(peer.out_sequence)
        try:
            peer.link.send_multipart(zre.encode_command(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.stats.membership["send_blocked"] += 1
            return False
        except zmq.ZMQError as exc:
            log.debug("send to %s failed: %s", peer.id, exc)
            return False
        peer.out_sequence = msg.sequence
        return True

    def _send_control(self, peer: PeerState, body: dict[str, Any]) -> None:
        frames = [CONTROL_MAGIC, self.codec.encode(body)]
        self._send(peer, ZreMessage(Command.WHISPER, 0, content=frames))

    def key_allowed(self, key: str | None) -> bool:
        """Whether a peer with this public key may be greeted (always True for a plain node)."""
        if self.keys is None:
            return key is None
        return key is not None and key in self.allowed

    def _learn(self, uuid: bytes, endpoint: str, key: str | None = None) -> PeerState | None:
        """Start greeting a peer heard of (beacon, gossip); None if it must be ignored."""
        if uuid == self.uuid or uuid in self.peers or self._is_foreign(uuid):
            return None
        if not self.key_allowed(key):
            self.stats.reject("curve_key_not_allowed" if self.keys else "secure_peer_ignored")
            return None
        parsed = parse_endpoint(endpoint)
        if parsed is None or (self.loopback_only and not parsed[0].startswith("127.")):
            self.stats.reject("bad_endpoint")
            return None
        seed = self._seed_links.get(endpoint)
        if seed is not None and seed.key == key:  # a seed we already greet: adopt its link
            del self._seed_links[endpoint]
            seed.uuid = uuid
            seed.id = uuid.hex()
            seed.touch()
            self.peers[uuid] = seed
            return seed
        if sum(1 for p in self.peers.values() if not p.ready) >= _MAX_PENDING_PEERS:
            self.stats.reject("too_many_pending_peers")
            return None
        peer = PeerState(uuid, endpoint, parsed[0])
        peer.key = key
        try:
            self._new_link(peer)
        except zmq.ZMQError as exc:
            self.stats.reject("link_failed")
            log.warning("cannot open a link to %s: %s", endpoint, exc)
            return None
        self.peers[uuid] = peer
        return peer

    def _open_seed_link(self, seed: str) -> None:
        key, endpoint = (seed[:40], seed[41:]) if seed[40:41] == "@" else (None, seed)
        if self._closed or endpoint == self.endpoint:
            return
        if self.keys is not None and key is None:
            log.warning("ignoring seed %r: a secure node needs the seed's key (KEY@tcp://...)", seed)
            return
        if endpoint in self._seed_links or any(p.endpoint == endpoint for p in self.peers.values()):
            return
        parsed = parse_endpoint(endpoint)
        if parsed is None:
            log.warning("ignoring seed %r: not a tcp://ip:port endpoint", endpoint)
            return
        peer = PeerState(b"", endpoint, parsed[0])
        peer.key = key
        peer.seed = seed  # type: ignore[attr-defined]
        try:
            self._new_link(peer)
        except zmq.ZMQError as exc:
            log.warning("cannot greet seed %s: %s", endpoint, exc)
            return
        self._seed_links[endpoint] = peer

    def _is_foreign(self, uuid: bytes) -> bool:
        expiry = self._foreign.get(uuid)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._foreign[uuid]
            return False
        return True

    def remove(self, peer: PeerState, reason: str) -> None:
        """Forget a peer, close its link, and report it gone if it had been ready."""
        if self.peers.get(peer.uuid) is not peer:
            return
        del self.peers[peer.uuid]
        self._close_link(peer)
        if peer.ready:
            self.stats.membership["left"] += 1
            log.info("peer %s (%s) gone: %s", peer.name, peer.id[:8], reason)
            try:
                self.events.peer_gone(peer, reason)
            except Exception:
                log.exception("error while handling the departure of %s", peer.id)
        for seed in self.config.seeds:
            if seed.endswith(peer.endpoint) and (seed == peer.endpoint or seed[40:41] == "@"):
                self._later(1.0, self._open_seed_link, seed)

    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        if not self._closed:
            self._timers.append(self.loop.call_later(delay, fn, *args))
            if len(self._timers) > 64:
                self._timers = [t for t in self._timers if not t.cancelled() and t.when() > self.loop.time()]

    # -- incoming -------------------------------------------------------------------------

    def _on_beacon(self) -> None:
        assert self.beacon is not None
        for data, source in self.beacon.receive():
            try:
                self._handle_beacon(data, source)
            except Exception:  # never let one datagram take the node down
                self.stats.reject("beacon_handler_error")
                log.exception("error handling a beacon from %s", source)

    def _handle_beacon(self, data: bytes, source: str) -> None:
        try:
            beacon = zre.decode_beacon(data)
        except zre.ZreError:
            self.stats.reject("beacon_malformed")
            return
        if beacon.uuid == self.uuid:
            return
        if (beacon.key is None) != (self.keys is None):
            self.stats.reject("beacon_other_security")  # secure and plain nodes don't mix
            return
        key = z85.encode(beacon.key).decode() if beacon.key is not None else None
        peer = self.peers.get(beacon.uuid)
        if beacon.port == 0:
            if peer is not None:
                self.remove(peer, "left (goodbye beacon)")
            return
        if peer is None:
            self._learn(beacon.uuid, f"tcp://{source}:{beacon.port}", key)
        elif peer.ready and peer.link_up and peer.endpoint == f"tcp://{source}:{beacon.port}":
            # A beacon proves the process runs; that its link works, the ZMTP heartbeats on
            # the link prove (they clear link_up within peer_timeout_s). Together they spare
            # a PING per peer per second.
            peer.touch()

    def _on_mailbox(self) -> None:
        mailbox = self._mailbox
        if mailbox is None:
            return
        for _ in range(_MAILBOX_BURST):
            try:
                frames = mailbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.debug("mailbox receive failed: %s", exc)
                return
            try:
                self._handle(frames)
            except Exception:  # never let one message take the node down
                self.stats.reject("zre_handler_error")
                log.exception("error handling a ZRE message")
        self.loop.call_soon(self._on_mailbox)  # more may be waiting: yield, then go on

    def _handle(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(identity) != 17 or identity[0] != 1:
            self.stats.reject("zre_bad_identity")
            return
        try:
            msg = zre.decode_command(frames[1:])
        except zre.ZreError as exc:
            self.stats.reject("zre_malformed")
            log.debug("malformed ZRE message: %s", exc)
            return
        uuid = identity[1:]
        peer = self.peers.get(uuid)
        if msg.command == Command.HELLO:
            self._on_hello(uuid, peer, msg)
            return
        if peer is None or not peer.ready:
            self.stats.reject("zre_before_hello")
            return
        expected = zre.next_sequence(peer.in_sequence)
        if msg.sequence != expected and not (
            # pyre wraps its sequence at 65535 instead of 65536: tolerate that from plain peers
            not peer.is_zmqmesh and peer.in_sequence == 65534 and msg.sequence == 0
        ):
            self.stats.reject("zre_sequence_gap")
            log.warning(
                "sequence gap from %s (expected %d, got %d): dropping the peer",
                peer.id[:8], expected, msg.sequence,
            )
            self.remove(peer, "sequence gap")
            return
        peer.in_sequence = msg.sequence
        peer.touch()
        cmd = msg.command
        if cmd == Command.WHISPER:
            if msg.content and msg.content[0] == CONTROL_MAGIC:
                if peer.is_zmqmesh:
                    self._on_control(peer, msg.content)
                else:
                    self.stats.reject("control_from_plain_peer")
            else:
                self.stats.pattern["zre"]["received"] += 1
                self.events.zre_message("whisper", peer, "", msg.content)
        elif cmd == Command.SHOUT:
            if msg.group in self.groups:
                self.stats.pattern["zre"]["received"] += 1
                self.events.zre_message("shout", peer, msg.group, msg.content)
        elif cmd in (Command.JOIN, Command.LEAVE):
            if msg.status != (peer.status + 1) % 256:
                self.stats.reject("zre_status_mismatch")
            peer.status = msg.status
            if cmd == Command.JOIN:
                peer.groups.add(msg.group)
            else:
                peer.groups.discard(msg.group)
            peer.changed()
            self.events.peer_groups_changed(peer)
        elif cmd == Command.PING:
            self._send(peer, ZreMessage(Command.PING_OK, 0))

    def _on_hello(self, uuid: bytes, peer: PeerState | None, msg: ZreMessage) -> None:
        if uuid == self.uuid or self._is_foreign(uuid):
            return
        parsed = parse_endpoint(msg.endpoint)
        if parsed is None or (self.loopback_only and not parsed[0].startswith("127.")):
            self.stats.reject("bad_endpoint")
            return
        mesh = msg.headers.get(HEADER["mesh"])
        if (mesh is None and not self.config.accept_plain_zre) or (
            mesh is not None and mesh != self.config.mesh
        ):
            now = time.monotonic()
            if len(self._foreign) > 1024:
                self._foreign = {u: t for u, t in self._foreign.items() if t > now}
            self._foreign[uuid] = now + _FOREIGN_MEMORY_S
            self.stats.membership["foreign_ignored"] += 1
            if peer is not None:
                if peer.ready:
                    self.remove(peer, "moved to another mesh")
                else:
                    self.peers.pop(uuid, None)
                    self._close_link(peer)
            return
        if msg.sequence != 1:
            self.stats.reject("zre_hello_sequence")
        key = msg.headers.get(HEADER["key"]) if self.keys is not None else None
        if peer is None:
            peer = self._learn(uuid, msg.endpoint, key)
            if peer is None:
                return
        elif peer.ready:
            # The peer greeted us again: it had lost us. Restart our side of the link so
            # that our sequence starts afresh too.
            self._close_link(peer)
            peer.endpoint = msg.endpoint
            self._new_link(peer)
        peer.in_sequence = msg.sequence
        peer.name = msg.name
        peer.headers = self._checked_headers(msg.headers)
        peer.groups = set(msg.groups)
        peer.status = msg.status
        peer.is_zmqmesh = mesh is not None
        peer.touch()
        peer.changed()
        if peer.ready:
            self.events.peer_groups_changed(peer)
            return
        self._retire_ghosts(peer)
        peer.ready = True
        self.stats.membership["joined"] += 1
        log.info("peer %s (%s) joined from %s", peer.name, peer.id[:8], peer.endpoint)
        self.events.peer_ready(peer)
        if peer.is_zmqmesh:
            self._gossip_to(peer)

    def _checked_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """The headers of a HELLO, less pattern endpoints this node must not connect to."""
        checked = dict(headers)
        for key in ("pub", "sub", "pull", "service"):
            value = checked.get(HEADER[key])
            if value is None:
                continue
            parsed = parse_endpoint(value)
            if parsed is None or (self.loopback_only and not parsed[0].startswith("127.")):
                self.stats.reject("bad_endpoint")
                del checked[HEADER[key]]
        return checked

    def _retire_ghosts(self, newcomer: PeerState) -> None:
        """A restarted node replaces its previous incarnation at once."""
        host = newcomer.headers.get(HEADER["host"])
        for old in list(self.peers.values()):
            if old is newcomer or not old.ready:
                continue
            same_endpoint = old.endpoint == newcomer.endpoint
            same_node_down = (
                old.disconnected_at is not None  # its link was up and dropped: not a slow start
                and old.name == newcomer.name
                and host is not None
                and old.headers.get(HEADER["host"]) == host
                and old.address == newcomer.address
            )
            if same_endpoint or same_node_down:
                self.remove(old, "replaced by a restarted node")

    def _gossip_to(self, peer: PeerState) -> None:
        known = [[p.id, p.endpoint, p.key or ""] for p in self.peers.values() if p.ready and p is not peer]
        if known:
            self._send_control(peer, {"t": "peers", "peers": known})

    def _on_control(self, peer: PeerState, content: list[bytes]) -> None:
        try:
            body = self.codec.decode(content[1]) if len(content) == 2 else None
        except Exception:
            body = None
        if not isinstance(body, dict):
            self.stats.reject("control_malformed")
            return
        kind = body.get("t")
        if kind == "bye":
            self.remove(peer, "left")
        elif kind == "peers":
            entries = body.get("peers")
            if not isinstance(entries, list):
                self.stats.reject("control_malformed")
                return
            for entry in entries[:10_000]:
                if (
                    isinstance(entry, list)
                    and len(entry) in (2, 3)
                    and all(isinstance(e, str) for e in entry)
                    and len(entry[0]) == 32
                ):
                    try:
                        uuid = bytes.fromhex(entry[0])
                    except ValueError:
                        continue
                    self._learn(uuid, entry[1], (entry[2] or None) if len(entry) == 3 else None)
        else:
            self.stats.reject("control_unknown")

    def _on_monitor(self, peer: PeerState) -> None:
        monitor = peer.monitor
        while monitor is not None:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            event = _monitor_event(frames)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                peer.link_up = True
                peer.disconnected_at = None
            elif event == zmq.EVENT_DISCONNECTED:
                peer.link_up = False
                if peer.disconnected_at is None:
                    peer.disconnected_at = time.monotonic()
                    self._later(self.config.disconnect_grace_s, self._check_disconnected, peer)
            monitor = peer.monitor

    def _check_disconnected(self, peer: PeerState) -> None:
        if peer.disconnected_at is None or self.peers.get(peer.uuid) is not peer:
            return
        if peer.ready:
            self.remove(peer, "connection lost")
        else:
            self.peers.pop(peer.uuid, None)
            self._close_link(peer)

    # -- timers ---------------------------------------------------------------------------

    def _send_beacon(self) -> None:
        if self._closed or self.beacon is None:
            return
        self.beacon.send(zre.encode_beacon(self.uuid, self.port, self._beacon_key))
        self._later(self.config.beacon_interval_s, self._send_beacon)

    def _tick(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        cfg = self.config
        for peer in list(self.peers.values()):
            silent = now - peer.last_rx
            if silent > cfg.peer_timeout_s:
                if peer.ready:
                    self.remove(peer, f"silent for {silent:.1f} s")
                else:
                    self.peers.pop(peer.uuid, None)
                    self._close_link(peer)
            elif peer.ready and silent > cfg.heartbeat_interval_s and (
                peer.ping_sent is None or now - peer.ping_sent > cfg.heartbeat_interval_s
            ):
                peer.ping_sent = now
                self._send(peer, ZreMessage(Command.PING, 0))
        for endpoint, seed in list(self._seed_links.items()):
            if now - seed.last_rx > cfg.peer_timeout_s:  # re-greet a seed that never answered
                self._close_link(seed)
                del self._seed_links[endpoint]
                self._open_seed_link(seed.seed)  # type: ignore[attr-defined]
        self._later(min(cfg.heartbeat_interval_s / 2, 0.5), self._tick)

    def _remove_reader(self, fd: int) -> None:
        try:
            self.loop.remove_reader(fd)
        except Exception:
            pass


def _check_group(group: str) -> None:
    if not group or len(group.encode()) > 255:
        raise ValueError("a group name must be 1 to 255 bytes of UTF-8")


def _bind_ephemeral(sock: zmq.Socket[Any], address: str) -> int:
    sock.bind(f"tcp://{address}:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])
