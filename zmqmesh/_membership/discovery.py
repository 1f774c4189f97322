"""How peers are found: UDP beacons and the seeds the user named.

Gossip (peers telling each other of peers) travels as control whispers; see `control`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from .._io.beacon import BeaconSocket
from .._io.reactor import EventLoop
from .._stats import Stats
from .._wire import zre
from .._wire.frames import parse_endpoint
from .._wire.zre import Command, ZreMessage
from .links import Links
from .peer import PeerState

__all__ = ["Beacons", "Seeds"]

log = logging.getLogger("zmqmesh.membership")


def _no_key(raw: bytes) -> str:
    raise AssertionError("a plain node handles no beacon with a key")  # (`_handle` refuses them first)


class Beacons:
    """Sends this node's beacon at once and every ``interval_s``; reports the others'.

    ``on_beacon(uuid, endpoint, key, source)`` is called for each well-formed beacon of
    another node of the same security (``endpoint`` is None for a goodbye beacon;
    ``source``: the address it came from). Malformed
    beacons and those of the other security are counted and dropped.

    In a mesh of N nodes every node hears N beacons a second, and each would wake the loop
    on its own. So once the socket is read dry, it is left unwatched for ``rest_s()``
    seconds (0: watched, each beacon read as it comes), and what arrived meanwhile is read
    in one go; a newcomer's first beacon may then wait that long. A flood that fills a
    whole burst is read on at once.
    """

    def __init__(self, *, loop: EventLoop, sock: BeaconSocket, uuid: bytes, key: bytes | None, stats: Stats,
                 interval_s: float, later: Callable[..., None],
                 on_beacon: Callable[[bytes, str | None, str | None, str], None],
                 rest_s: Callable[[], float]) -> None:
        self.loop = loop
        self.sock = sock
        self.uuid = uuid
        self.key = key
        self.stats = stats
        self.interval_s = interval_s
        self.later = later
        self.on_beacon = on_beacon
        self.rest_s = rest_s
        self.port = 0
        self._closed = False
        self._key_text = _no_key
        if key is not None:  # (a secure node: a plain one, which hears no keys, never loads z85)
            from zmq.utils import z85

            self._key_text = lambda raw: z85.encode(raw).decode()

    def start(self, port: int) -> None:
        """Listen, and beacon mailbox ``port`` now and every interval."""
        self.port = port
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self._send()

    def goodbye(self) -> None:
        """Beacon port 0: every node hearing it forgets this one at once."""
        self.sock.send(zre.encode_beacon(self.uuid, 0, self.key))

    def close(self) -> None:
        """Stop beaconing and listening (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.remove_reader(self.sock.fileno())
        except Exception:
            pass
        self.sock.close()

    def _send(self) -> None:
        if self._closed:
            return
        self.sock.send(zre.encode_beacon(self.uuid, self.port, self.key))
        self.later(self.interval_s, self._send)

    def _on_readable(self) -> None:
        if self._read() and not self._closed:  # (not called while resting: no reader)
            rest = self.rest_s()
            if rest > 0:
                self.loop.remove_reader(self.sock.fileno())
                self.later(rest, self._read_resting)

    def _read_resting(self) -> None:
        """While resting: read what arrived during the rest, and rest again, on a timer
        alone (a reader added and removed each time cost as much as the read, 90 us)."""
        if self._closed:
            return
        drained = self._read()
        if self._closed:
            return
        rest = self.rest_s()
        if rest <= 0:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
        else:  # (a burst that did not drain the socket goes on at once)
            self.later(rest if drained else 0.0, self._read_resting)

    def _read(self) -> bool:
        """Handle the beacons waiting (a bounded burst); whether that was all of them."""
        datagrams, drained = self.sock.receive()
        for data, source in datagrams:
            try:
                self._handle(data, source)
            except Exception:  # never let one datagram take the node down
                self.stats.reject("beacon_handler_error")
                log.exception("error handling a beacon from %s", source)
        return drained

    def _handle(self, data: bytes, source: str) -> None:
        try:
            beacon = zre.decode_beacon(data)
        except zre.ZreError:
            self.stats.reject("beacon_malformed")
            return
        if beacon.uuid == self.uuid:
            return
        if (beacon.key is None) != (self.key is None):
            self.stats.reject("beacon_other_security")  # secure and plain nodes don't mix
            return
        key = self._key_text(beacon.key) if beacon.key is not None else None
        self.on_beacon(beacon.uuid, f"tcp://{source}:{beacon.port}" if beacon.port else None, key, source)


class Seeds:
    """Links to the seeds the user named (``tcp://ip:port`` or ``KEY@tcp://ip:port``),
    greeted until they answer and again after they leave."""

    def __init__(self, *, seeds: tuple[str, ...], links: Links, hello: Callable[[], ZreMessage],
                 later: Callable[..., None], retry_s: float) -> None:
        self.seeds = seeds
        self.links = links
        self.hello = hello
        self.later = later
        self.retry_s = retry_s
        self.pending: dict[str, PeerState] = {}
        self.own_endpoint = ""
        self.known: Callable[[str], bool] = lambda endpoint: False
        self._closed = False

    def start(self, own_endpoint: str, known: Callable[[str], bool]) -> None:
        """Greet every seed; ``known(endpoint)`` tells an endpoint already linked as a peer."""
        self.own_endpoint = own_endpoint
        self.known = known
        for seed in self.seeds:
            self.open(seed)

    def open(self, seed: str) -> None:
        """Greet one seed, unless it is this node, already linked, or malformed (logged)."""
        key, endpoint = (seed[:40], seed[41:]) if seed[40:41] == "@" else (None, seed)
        if self._closed or endpoint == self.own_endpoint:
            return
        if endpoint in self.pending or self.known(endpoint):
            return
        parsed = parse_endpoint(endpoint)
        if parsed is None:
            log.warning("ignoring seed %r: not a tcp://ip:port endpoint", endpoint)
            return
        peer = PeerState(b"", endpoint, parsed[0], seed=seed)
        peer.key = key
        try:
            self.links.open(peer, self.hello())
        except zmq.ZMQError as exc:
            log.warning("cannot greet seed %s: %s", endpoint, exc)
            return
        self.pending[endpoint] = peer

    def adopt(self, endpoint: str, key: str | None) -> PeerState | None:
        """The link already greeting ``endpoint``, handed over to a peer that answered."""
        seed = self.pending.get(endpoint)
        if seed is None or seed.key != key:
            return None
        del self.pending[endpoint]
        return seed

    def peer_left(self, endpoint: str) -> None:
        """A peer at ``endpoint`` left: greet it again later if it is one of the seeds."""
        for seed in self.seeds:
            if seed.endswith(endpoint) and (seed == endpoint or seed[40:41] == "@"):
                self.later(self.retry_s, self.open, seed)

    def regreet_silent(self, now: float, timeout_s: float) -> None:
        """Open a fresh link to each seed that has not answered within ``timeout_s``."""
        for endpoint, seed in list(self.pending.items()):
            if now - seed.last_rx > timeout_s:
                self.links.close(seed)
                del self.pending[endpoint]
                if seed.seed is not None:
                    self.open(seed.seed)

    def say_goodbye(self) -> None:
        """Greet no seed any more, and send Zyre's GOODBYE after the HELLO on each link to a
        seed that has not answered yet (it may still take the HELLO in)."""
        self._closed = True
        for seed in self.pending.values():
            self.links.send(seed, ZreMessage(Command.GOODBYE, 0))

    def close(self, linger_ms: int) -> None:
        """Close the seed links (idempotent)."""
        self._closed = True
        for seed in self.pending.values():
            self.links.close(seed, linger_ms)
        self.pending.clear()
