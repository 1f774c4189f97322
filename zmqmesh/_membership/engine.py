"""ZRE membership: the mailbox, the peers, their groups, and their comings and goings.

Runs entirely on the node's event loop. It finds peers (beacons, seeds, gossip, and
HELLOs from unknown peers), greets them over their `Links`, tracks their groups, and
declares them gone:

* at once on a polite goodbye (a port-0 beacon, or zmqmesh's ``bye`` control whisper);
* when the `FailureDetector` says so (a dropped link, or silence).

It knows nothing of what the groups mean to the patterns above it: it reports through
`MembershipEvents`. Hostile or malformed input is counted in `Stats.rejected` and
dropped; a sequence gap drops the peer as RFC 36 requires. Nothing here raises into the
event loop.

`Membership` is what the node talks to: it keeps what this node says of itself (its
HELLO: endpoint, groups, status, headers), sends what the node asks, and composes the
parts that do the rest, one job each:

* `Mailbox` (mailbox.py): the mailbox ROUTER, bound and read in bursts;
* `Commands` (commands.py): each command the mailbox receives, checked and handled;
* `Greeter` (greeting.py): the HELLOs taken in, and peers greeted again;
* `Roster` (roster.py): the peers kept, within bounds, and those declared gone;
* `PeerGroups` (peer_groups.py): the peers' groups, within a budget of memory;
* `Liveness` (liveness.py): PINGs, proofs, link events and the sweep (`FailureDetector`);
* `Gossip` (gossip.py): peers told of the others, and what they tell taken in;
* `Links`, `Beacons`, `Seeds`, `Admission`, `Timers`: the links to peers, discovery,
  who may become a peer, and the timers cancelled at `Membership.close`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import zmq

from .._io.beacon import BeaconSocket
from .._io.reactor import EventLoop
from .._stats import Stats
from .._wire.codec import Codec
from .._wire.zre import Command, ZreMessage
from ..config import NodeConfig
from ..errors import ConfigError, MessageTooLargeError, ZmqMeshError
from . import control
from .admission import Admission
from .commands import Commands
from .detector import FailureDetector
from .discovery import Beacons, Seeds
from .events import MembershipEvents
from .gossip import Gossip
from .greeting import Greeter
from .links import Links
from .liveness import Liveness
from .mailbox import Mailbox
from .peer import PeerState
from .peer_groups import MAX_HELLO_GROUP_BYTES, PeerGroups
from .roster import MAX_PEERS, MAX_UNPROVEN_PEERS, ZMQ_SOCKETS_PER_PEER, Roster
from .timers import Timers

if TYPE_CHECKING:
    from .._io.curve import KeyPair

__all__ = ["Membership", "MAX_GROUP_BYTES", "MAX_PEERS", "MAX_UNPROVEN_PEERS", "ZMQ_SOCKETS_PER_PEER"]

log = logging.getLogger("zmqmesh.membership")

_SEED_RETRY_S = 1.0


class Membership:
    """The ZRE engine of one node. Create, `bind`, `start`, and `close` on the node's loop.

    It wires its parts together (see the module) and keeps this node's own side: its
    groups and status, told to every peer, and the HELLO its links send first.
    """

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
        self.keys = keys
        self.loopback_only = advertise_address.startswith("127.")
        self.timers = Timers(loop)
        self.peer_groups = PeerGroups(stats=stats, events=events)
        self.router = Mailbox(loop=loop, ctx=ctx, config=config, keys=keys, stats=stats)
        self.admission = Admission(
            mesh=config.mesh, accept_plain_zre=config.accept_plain_zre,
            keys_public=keys.public if keys else None, allowed=allowed,
            loopback_only=self.loopback_only, stats=stats,
        )
        self.detector = FailureDetector(config.heartbeat_interval_s, config.peer_timeout_s, config.disconnect_grace_s)
        self.links = Links(ctx=ctx, loop=loop, config=config, uuid=uuid, keys=keys, stats=stats, on_link=self._on_link)
        self.seeds = Seeds(seeds=config.seeds, links=self.links, hello=self._hello,
                           later=self.timers.later, retry_s=_SEED_RETRY_S)
        self.roster = Roster(loop=loop, uuid=uuid, secure=keys is not None, admission=self.admission, stats=stats,
                             events=events, links=self.links, seeds=self.seeds, peer_groups=self.peer_groups,
                             hello=self._hello, peer_timeout_s=config.peer_timeout_s)
        self.peers = self.roster.peers
        self.liveness = Liveness(detector=self.detector, links=self.links, roster=self.roster, seeds=self.seeds,
                                 stats=stats, timers=self.timers, disconnect_grace_s=config.disconnect_grace_s,
                                 read_first=self.router.read_before_verdicts, name=name)
        self.gossip = Gossip(codec=codec, links=self.links, roster=self.roster, stats=stats, timers=self.timers,
                             heartbeat_interval_s=config.heartbeat_interval_s)
        self.greeter = Greeter(uuid=uuid, secure=keys is not None, admission=self.admission, stats=stats,
                               events=events, links=self.links, roster=self.roster, peer_groups=self.peer_groups,
                               timers=self.timers, heartbeat_interval_s=config.heartbeat_interval_s,
                               hello=self._hello, ping=self.liveness.ping, gossip_to=self.gossip.tell)
        self.groups: set[str] = set()
        self._group_chars = 0  # (of `groups`, as a peer counts them: `MAX_HELLO_GROUP_BYTES`)
        self._groups_past_hello = False
        self.commands = Commands(codec=codec, stats=stats, events=events, links=self.links, roster=self.roster,
                                 own_groups=self.groups, peer_groups=self.peer_groups,
                                 on_hello=self.greeter.on_hello, take_gossip=self.gossip.take)
        self.beacons = None if beacon is None else Beacons(
            loop=loop, sock=beacon, uuid=uuid, key=keys.public_bytes() if keys else None, stats=stats,
            interval_s=config.beacon_interval_s, later=self.timers.later, on_beacon=self.roster.on_beacon,
            rest_s=self.roster.beacon_rest,
        )
        self.status = 0
        self.headers: dict[str, str] = {}
        self.endpoint = ""
        self.port = 0

    # -- life cycle ----------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the mailbox ROUTER to ``mailbox_port``, or to a random port in 0xC000-0xFFFF
        (as ZRE asks). Raises `ZmqMeshError` if it cannot."""
        self.port = self.router.bind(self.bind_address)
        self.endpoint = f"tcp://{self.advertise_address}:{self.port}"

    @property
    def mailbox(self) -> zmq.Socket[Any]:
        """The mailbox ROUTER (bound by `bind`), for the node to watch its handshakes."""
        assert self.router.socket is not None, "bind() first"
        return self.router.socket

    def start(self, headers: dict[str, str], groups: set[str]) -> None:
        """Start reading the mailbox and beacons, beaconing, heartbeating, and greeting seeds."""
        self.headers = headers
        own = set(groups)
        self.groups.clear()  # (the same set for good: `Commands` reads it)
        self.groups.update(own)
        self._group_chars = sum(map(len, own))
        self._check_group_chars()
        self.router.start(self.commands.handle)
        if self.beacons is not None:
            self.beacons.start(self.port)  # the first beacon goes out at once
        self.liveness.sweep()
        self.gossip.start()
        self.seeds.start(self.endpoint, self.roster.endpoint_known)
        self.router.read_soon()

    def say_goodbye(self) -> None:
        """Tell everyone we leave: ``bye`` to zmqmesh peers, a port-0 beacon to everyone, and
        without beacons (seeds only) Zyre's GOODBYE to plain ZRE peers. A peer greeted but
        not heard from yet may still take our HELLO in: Zyre's GOODBYE follows it on the
        same link. From now on no one new is greeted: a peer greeted after the goodbyes
        would list this node until its silent timeout."""
        self.roster.leaving = True
        for peer in list(self.peers.values()):
            if peer.ready and peer.is_zmqmesh:
                self.links.send(peer, ZreMessage(Command.WHISPER, 0, content=control.bye(self.codec)))
            elif (peer.ready and self.beacons is None) or (not peer.ready and peer.link is not None):
                self.links.send(peer, ZreMessage(Command.GOODBYE, 0))
        self.seeds.say_goodbye()
        if self.beacons is not None:
            self.beacons.goodbye()

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket and cancel every timer (idempotent; fires no events).

        The links keep ``linger_ms`` to deliver what is still queued (the goodbyes).
        """
        if self.timers.closed:
            return
        self.timers.close()
        self.roster.close(linger_ms)
        self.seeds.close(linger_ms)
        self.router.close()
        if self.beacons is not None:
            self.beacons.close()

    # -- what the node asks of membership ------------------------------------------------

    def ready_peers(self) -> list[PeerState]:
        """Peers that completed their greeting."""
        return self.roster.ready()

    def join(self, group: str) -> None:
        """Join a ZRE group and tell every peer (JOIN with the new status).

        Raises `ConfigError` (a ``ValueError``) for a name that is empty or longer than 255 bytes.
        """
        if group in self.groups:
            return
        _check_group(group)
        self.groups.add(group)
        self._group_chars += len(group)
        self._check_group_chars()
        self.status = (self.status + 1) % 256
        for peer in list(self.peers.values()):
            self.links.send(peer, ZreMessage(Command.JOIN, 0, group=group, status=self.status))

    def leave(self, group: str) -> None:
        """Leave a ZRE group and tell every peer."""
        if group not in self.groups:
            return
        self.groups.discard(group)
        self._group_chars -= len(group)
        self._check_group_chars()
        self.status = (self.status + 1) % 256
        for peer in list(self.peers.values()):
            self.links.send(peer, ZreMessage(Command.LEAVE, 0, group=group, status=self.status))

    def whisper(self, peer_id: str, frames: list[bytes]) -> None:
        """Send a WHISPER to one ready peer. Raises `ZmqMeshError` if it is unknown or its
        send buffer is full, `MessageTooLargeError` past ``max_message_bytes``."""
        peer = self.roster.ready_peer(peer_id)
        self._check_size(frames)
        if not self.links.send(peer, ZreMessage(Command.WHISPER, 0, content=frames)):
            raise ZmqMeshError(f"peer {peer_id} is not accepting messages (send buffer full)")
        self.stats.pattern["zre"]["sent"] += 1

    def shout(self, group: str, frames: list[bytes]) -> int:
        """SHOUT to every ready peer in ``group``; returns how many peers it went to.

        Raises `MessageTooLargeError` past ``max_message_bytes``.
        """
        self._check_size(frames)
        sent = 0
        for peer in list(self.peers.values()):
            if peer.ready and group in peer.groups:
                if self.links.send(peer, ZreMessage(Command.SHOUT, 0, group=group, content=frames)):
                    sent += 1
        self.stats.pattern["zre"]["sent"] += sent
        return sent

    def foreign_count(self) -> int:
        """How many nodes of other meshes are remembered (and ignored) now."""
        return self.admission.foreign_count()

    def _check_size(self, frames: list[bytes]) -> None:
        if sum(len(f) for f in frames) > self.config.max_message_bytes:
            raise MessageTooLargeError("whisper/shout content exceeds max_message_bytes")

    def _check_group_chars(self) -> None:
        """Say it, once each time it happens, when this node's groups pass what a peer takes
        in a HELLO (`MAX_HELLO_GROUP_BYTES`): a peer refuses that HELLO, and the JOINs past it,
        so no peer that greets it from then on sees the node (nor what it offers past that).
        Logged as an error and counted (``stats()["zre"]["groups_past_hello"]``): the names
        a node offers are bounded by their count (`MAX_OFFERS`), not by their length."""
        past = self._group_chars > MAX_HELLO_GROUP_BYTES
        if past and not self._groups_past_hello:
            self.stats.add("zre", "groups_past_hello")
            log.error("this node's ZRE groups take %d characters, past the %d a peer takes in a HELLO: peers "
                      "refuse it, and do not see this node; offer fewer or shorter names",
                      self._group_chars, MAX_HELLO_GROUP_BYTES)
        self._groups_past_hello = past

    # -- what its parts ask of it -----------------------------------------------------------

    def _hello(self) -> ZreMessage:
        """The HELLO a new link sends first: this node's endpoint, groups, status, name, headers."""
        return ZreMessage(
            Command.HELLO, 0, endpoint=self.endpoint, groups=sorted(self.groups),
            status=self.status, name=self.name, headers=self.headers,
        )

    def remove(self, peer: PeerState, reason: str) -> None:
        """Forget a peer, close its link, and report it gone if it had been ready."""
        self.roster.remove(peer, reason)

    def _on_link(self, peer: PeerState, up: bool) -> None:
        """The links report to `Liveness`, which is made after them (it sends over them)."""
        self.liveness.on_link(peer, up)


MAX_GROUP_BYTES = 255
"""Longest ZRE group name, in UTF-8 bytes (a ZRE string: its length in one byte)."""


def _check_group(group: str) -> None:
    if not group or len(group.encode()) > MAX_GROUP_BYTES:
        raise ConfigError(f"a group name must be 1 to {MAX_GROUP_BYTES} bytes of UTF-8")
