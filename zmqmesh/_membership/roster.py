"""The peers a node keeps: whom it takes in, within bounds, and whom it declares gone."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from .._io.reactor import EventLoop
from .._stats import Stats
from .._wire.zre import ZreMessage
from ..errors import ZmqMeshError
from .admission import Admission
from .discovery import Seeds
from .events import MembershipEvents
from .links import Links
from .peer import PeerState
from .peer_groups import PeerGroups

__all__ = ["Roster", "MAX_PEERS", "MAX_UNPROVEN_PEERS", "ZMQ_SOCKETS_PER_PEER", "BEACON_TRUST_TIMEOUTS"]

log = logging.getLogger("zmqmesh.membership")

MAX_PEERS = 1024
"""Peers a node keeps at most (ready or greeted); past it, newcomers are refused, counted.
(Each costs some 2 to 8 file descriptors: ``ulimit -n`` must leave room for them.)"""
ZMQ_SOCKETS_PER_PEER = 3
"""ZeroMQ sockets a peer costs: its link, the link's monitor and libzmq's end of it."""
MAX_UNPROVEN_PEERS = 128
"""Peers kept that have not yet proven themselves (answered a PING sent to the endpoint
they claim, over a link that came up): strangers past it make way for each other."""

BEACON_TRUST_TIMEOUTS = 10
"""A beacon counts as a ready peer's sign of life (sparing it a PING) only within so many
``peer_timeout_s`` of its last word over its link: anyone can send its beacon (its uuid
and port are public, a source address is forged at will on one host), and replayed by a
stranger every quarter second, it kept a SIGSTOPped peer listed without end (15 s watched,
against 2.3 s without), its requests timing out. Past it, an idle peer is PINGed as a
silent one is: one PING each way per peer every ~30 s by default."""
_CROWD = 16
"""Peers from which a node reads beacons in batches, resting between reads (see `Beacons`):
in a smaller mesh each is read at once, so that a newcomer is met without delay."""
_BUSY_REST_S = 0.1
"""The rest between two reads of beacons while peers come and go: a newcomer of a launch
is met within it."""
_SETTLED_REST_S = 0.5
"""The rest once no peer came or went for `_SETTLE_S`: a newcomer is met within it, or
sooner, when it hears a beacon of ours first and greets us. Each read wakes the loop: 32
idle nodes on loopback took 0.46-0.48 % of a CPU each with this rest, 0.68-0.91 % with
the busy one."""
_SETTLE_S = 10.0
"""How long after a peer came or went the membership counts as settled."""


class Roster:
    """The table of peers, ready or still being greeted, by uuid (``peers``): takes in a
    peer heard of (a beacon, gossip, a HELLO) and opens its link, within `MAX_PEERS` and
    `MAX_UNPROVEN_PEERS`; forgets one, closing its link; reports a ready one gone through
    ``events``. Refusals are counted in ``stats``.

    ``hello()`` is the HELLO a new link sends first; ``secure``: this node has CURVE keys.
    From ``leaving`` on (set when the node says goodbye) it takes in no one new.
    """

    def __init__(self, *, loop: EventLoop, uuid: bytes, secure: bool, admission: Admission, stats: Stats,
                 events: MembershipEvents, links: Links, seeds: Seeds, peer_groups: PeerGroups,
                 hello: Callable[[], ZreMessage], peer_timeout_s: float) -> None:
        self.loop = loop
        self.uuid = uuid
        self.secure = secure
        self.admission = admission
        self.stats = stats
        self.events = events
        self.links = links
        self.seeds = seeds
        self.peer_groups = peer_groups
        self.hello = hello
        self.beacon_trust_s = BEACON_TRUST_TIMEOUTS * peer_timeout_s
        self.peers: dict[bytes, PeerState] = {}
        self.ids: set[str] = set()
        """The ids (hex) of ``peers``, kept with it: a peer's gossip is checked against them
        (a newcomer hears a list of the mesh from every peer it meets)."""
        self.leaving = False
        """Said goodbye: takes in no one new."""
        self._changed_at = loop.time()  # (when a peer last came or went)

    def ready(self) -> list[PeerState]:
        """Peers that completed their greeting."""
        return [p for p in self.peers.values() if p.ready]

    def ready_peer(self, peer_id: str) -> PeerState:
        """The ready peer of id ``peer_id`` (hex). Raises `ZmqMeshError` if there is none."""
        try:
            peer = self.peers.get(bytes.fromhex(peer_id))
        except ValueError:
            peer = None
        if peer is None or not peer.ready:
            raise ZmqMeshError(f"no such peer: {peer_id}")
        return peer

    def endpoint_known(self, endpoint: str) -> bool:
        """Whether a peer kept is linked at ``endpoint``."""
        return any(p.endpoint == endpoint for p in self.peers.values())

    def learn(self, uuid: bytes, endpoint: str, key: str | None = None, *, answered: bool = False
              ) -> PeerState | None:
        """Start greeting a peer heard of; None if it must be ignored. ``answered``: it sent
        a HELLO over a connection of its own (not a beacon or gossip, which anyone can forge
        at no cost, and which are rate-limited per address)."""
        if uuid == self.uuid or uuid in self.peers or self.admission.is_foreign(uuid) or self.leaving:
            return None
        if not self.admission.key_allowed(key):
            self.stats.reject("curve_key_not_allowed" if self.secure else "secure_peer_ignored")
            return None
        address = self.admission.endpoint_ok(endpoint)
        if address is None:
            return None
        seed = self.seeds.adopt(endpoint, key)
        if seed is not None:  # a seed we already greet: its link becomes the peer's
            seed.uuid = uuid
            seed.id = uuid.hex()
            seed.touch()
            self.peers[uuid] = seed
            self.ids.add(seed.id)
            self._changed_at = self.loop.time()
            return seed
        if not answered and not self.admission.may_greet(address):
            return None
        if not self._make_room():
            return None
        peer = PeerState(uuid, endpoint, address)
        peer.key = key
        try:
            self.links.open(peer, self.hello())
        except zmq.ZMQError as exc:
            self.stats.reject("link_failed")
            log.warning("cannot open a link to %s: %s", endpoint, exc)
            return None
        self.peers[uuid] = peer
        self.ids.add(peer.id)
        self._changed_at = self.loop.time()
        return peer

    def places_left(self) -> int:
        """How many more peers may be kept without one making way: within
        `MAX_UNPROVEN_PEERS` not yet proven and `MAX_PEERS` in all."""
        unproven = sum(1 for p in self.peers.values() if not p.proven)
        return min(MAX_UNPROVEN_PEERS - unproven, MAX_PEERS - len(self.peers))

    def _make_room(self) -> bool:
        """Room for one more peer: past `MAX_UNPROVEN_PEERS` not yet proven (or `MAX_PEERS`
        in all), the oldest unproven peer makes way: first one that never answered our
        greeting and whose link never came up, then one that never answered, then one whose
        link never came up, then any. A real peer proves itself within a round trip, so
        strangers crowd out only each other. False (counted) when every peer is proven and
        there are `MAX_PEERS`."""
        if len(self.peers) < MAX_UNPROVEN_PEERS or self.places_left() > 0:
            return True  # (fewer peers than that: places left without counting, peer by peer, the unproven)
        unproven = [p for p in self.peers.values() if not p.proven]
        if not unproven:
            self.stats.reject("too_many_peers")
            return False
        # the oldest of those that never answered our greeting, whose link never came up first
        victim = min(unproven, key=lambda p: (p.ready, p.link_up))
        self.stats.reject("unproven_peer_evicted")
        self.drop(victim, "made way: it never answered at its endpoint")
        return True

    def remove(self, peer: PeerState, reason: str) -> None:
        """Forget a peer, close its link, and report it gone if it had been ready."""
        if not self._forget(peer):
            return
        if peer.ready:
            self.stats.membership["left"] += 1
            log.info("peer %r (%s) gone: %s", peer.name, peer.id[:8], reason)
            try:
                self.events.peer_gone(peer, reason)
            except Exception:
                log.exception("error while handling the departure of %s", peer.id)
        self.seeds.peer_left(peer.endpoint)

    def drop(self, peer: PeerState, reason: str) -> None:
        """Remove a ready peer (reported), or forget one still being greeted (not reported)."""
        if peer.ready:
            self.remove(peer, reason)
        else:
            self._forget(peer)

    def _forget(self, peer: PeerState) -> bool:
        """Take ``peer`` out of the table, its groups out of the budget, and close its link;
        False if it was not there (already replaced or forgotten)."""
        if self.peers.get(peer.uuid) is not peer:
            return False
        del self.peers[peer.uuid]
        self.ids.discard(peer.id)
        self.peer_groups.release(peer)
        self._changed_at = self.loop.time()
        self.links.close(peer)
        return True

    def close(self, linger_ms: int) -> None:
        """Close every peer's link (``linger_ms`` lets queued commands go out) and forget
        them all, reporting none."""
        for peer in list(self.peers.values()):
            self.links.close(peer, linger_ms)
        self.peers.clear()
        self.ids.clear()
        self.peer_groups.clear()

    def on_beacon(self, uuid: bytes, endpoint: str | None, key: str | None, source: str) -> None:
        """A beacon from ``source`` (``endpoint`` None: a goodbye): a peer unknown is taken
        in, a ready one linked at ``endpoint`` is heard from, and a plain ZRE peer's goodbye
        from its own address removes it."""
        peer = self.peers.get(uuid)
        if endpoint is None:
            if peer is None:
                return
            # anyone can send a beacon under any uuid (the peers' beacons make them public),
            # from any address on a LAN: a zmqmesh peer's goodbye comes over its link (a
            # "bye"), so a goodbye beacon is not taken from one; a plain ZRE peer's counts
            # only from its address (else its link's GOODBYE, or its silence, tells)
            if source != peer.address:
                self.stats.reject("beacon_goodbye_ignored")  # (a routine one, from its address, is not counted)
            elif not peer.is_zmqmesh:
                self.remove(peer, "left (goodbye beacon)")
            return
        if peer is None:
            self.learn(uuid, endpoint, key)
        elif peer.ready and peer.link_up and peer.endpoint == endpoint and \
                time.monotonic() - peer.last_word <= self.beacon_trust_s:
            # A beacon says the process runs; that its link works, the kernel's probes on
            # the link say (they clear link_up within peer_timeout_s). Together they spare
            # a PING per peer per second; that it still answers, only its word over the
            # link says (`BEACON_TRUST_TIMEOUTS`).
            peer.seen()

    def beacon_rest(self) -> float:
        """How long the beacon socket rests unwatched once read dry (`Beacons`): not at all
        below `_CROWD` peers; `_BUSY_REST_S` within `_SETTLE_S` of a peer coming or going
        (a launch, a restart); `_SETTLED_REST_S` after that."""
        if len(self.peers) < _CROWD:
            return 0.0
        if self.loop.time() - self._changed_at < _SETTLE_S:
            return _BUSY_REST_S
        return _SETTLED_REST_S
